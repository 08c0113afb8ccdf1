"""Metric functions against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from recipes import aggregate, run_seeds
from recipes.evaluation import (
    accuracy,
    avg_gap,
    avg_gap_robust,
    cross_entropy,
    loss_attack_accuracy,
    markdown_table,
    mia_auc,
    mia_efficacy,
    relative_distance,
    rte_speedup,
    true_label_confidence,
)


def test_accuracy_and_confidence():
    probs = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    labels = np.array([0, 1, 1, 0])
    assert accuracy(probs, labels) == 50.0  # rows 0 and 1 right
    assert np.allclose(true_label_confidence(probs, labels), [0.7, 0.8, 0.4, 0.1])
    assert np.allclose(cross_entropy(probs, labels), -np.log([0.7, 0.8, 0.4, 0.1]))
    assert math.isnan(accuracy(probs[:0], labels[:0]))


def test_avg_gap_is_the_mean_absolute_difference():
    retrain = {"ua": 5.0, "ra": 100.0, "ta": 94.0, "mia": 12.0}
    method = {"ua": 1.0, "ra": 99.0, "ta": 96.0, "mia": 15.0}
    assert avg_gap(method, retrain) == pytest.approx((4 + 1 + 2 + 3) / 4)
    assert avg_gap(retrain, retrain) == 0


def test_avg_gap_robust_uses_the_loss_auc_instead_of_the_svc():
    retrain = {"ua": 5.0, "ra": 100.0, "ta": 94.0, "mia": 12.0, "mia_auc": 48.0}
    method = {"ua": 1.0, "ra": 99.0, "ta": 96.0, "mia": 90.0, "mia_auc": 56.0}
    assert avg_gap_robust(method, retrain) == pytest.approx((4 + 1 + 2 + 8) / 4)
    assert avg_gap_robust(retrain, retrain) == 0


def test_mia_auc_against_hand_made_losses():
    same = np.array([0.1, 0.5, 0.5, 2.0])
    assert mia_auc(same, same.copy()) == pytest.approx(50.0)  # identical sets, ties included
    assert mia_auc(np.array([0.3, 0.3]), np.array([0.3, 0.3, 0.3])) == pytest.approx(50.0)  # all tied
    assert mia_auc(np.array([0.01, 0.02]), np.array([1.0, 2.0, 3.0])) == 100.0  # forget rows fit better
    assert mia_auc(np.array([4.0, 5.0]), np.array([1.0, 2.0, 3.0])) == 0.0
    # of the 2 x 2 (forget, test) pairs, (1, 2) and (1, 3) won, (3, 2) lost, (3, 3) tied: 2.5 / 4
    assert mia_auc(np.array([1.0, 3.0]), np.array([2.0, 3.0])) == pytest.approx(100 * 2.5 / 4)
    assert math.isnan(mia_auc(np.array([]), np.array([1.0])))
    assert math.isnan(mia_auc(np.array([1.0]), np.array([])))


def test_mia_efficacy_separates_members_from_non_members():
    rng = np.random.default_rng(0)
    members = rng.uniform(0.95, 1.0, 200)  # confident on training rows
    non_members = rng.uniform(0.0, 0.5, 200)  # unsure on unseen rows
    assert mia_efficacy(members, non_members, rng.uniform(0.0, 0.4, 50)) == 100.0  # look unseen
    assert mia_efficacy(members, non_members, rng.uniform(0.96, 1.0, 50)) == 0.0  # look trained on


def test_loss_attack_is_near_chance_when_indistinguishable_and_high_when_not():
    rng = np.random.default_rng(0)
    same = loss_attack_accuracy(rng.exponential(1, 300), rng.exponential(1, 300))
    assert 35 <= same <= 65
    apart = loss_attack_accuracy(rng.uniform(0, 0.1, 300), rng.uniform(2, 3, 300))
    assert apart == 100.0
    assert math.isnan(loss_attack_accuracy(np.array([0.1]), np.array([1.0])))


def test_relative_distance_and_rte():
    init, orig = torch.zeros(2), torch.tensor([3.0, 4.0])  # training change has norm 5
    assert relative_distance(torch.tensor([3.0, 4.0]), orig, orig, init) == 0
    assert relative_distance(torch.zeros(2), orig, orig, init) == pytest.approx(1.0)
    assert relative_distance(torch.tensor([6.0, 8.0]), init, orig, init) == pytest.approx(2.0)
    assert rte_speedup(120.0, 0.5) == 240.0


def test_markdown_table_lists_every_row():
    table = markdown_table({"class": {"retrain": {"ua": 100.0}, "original": {"ua": 1.234}}}, metrics=["ua"])
    assert table.splitlines()[2] == "| class | retrain | 100.00 |"
    assert table.splitlines()[3] == "| class | original | 1.23 |"


def test_markdown_table_shows_the_robust_columns_only_where_rows_have_them():
    assert "mia_auc" not in markdown_table({"class": {"retrain": {"ua": 100.0, "avg_gap": 0.0}}})
    header = markdown_table({"class": {"retrain": {"mia_auc": 50.0, "avg_gap_robust": 0.0}}}).splitlines()[0]
    assert "| mia | mia_auc | avg_gap | avg_gap_robust |" in header


def test_aggregate_over_seeds(tmp_path):
    import json

    for seed, gap in [(0, 1.0), (1, 3.0)]:
        (tmp_path / str(seed)).mkdir()
        (tmp_path / str(seed) / "results.json").write_text(json.dumps({"class": {"retrain": {"avg_gap": gap}}}))
    aggregate.main([str(tmp_path / "0"), str(tmp_path / "1"), "--out", str(tmp_path / "agg")])
    agg = json.loads((tmp_path / "agg" / "aggregate.json").read_text())
    assert agg["class"]["retrain"]["avg_gap"] == {"mean": 2.0, "std": 1.0, "n": 2}


def test_aggregate_keeps_a_method_missing_from_some_runs():
    runs = [
        {"random_1": {"retrain": {"avg_gap": 0.0}, "a": {"avg_gap": 1.0}}},
        {"random_1": {"retrain": {"avg_gap": 0.0}, "a": {"avg_gap": 3.0}, "b": {"avg_gap": 5.0}}},
    ]
    agg = aggregate.aggregate(runs)
    assert agg["random_1"]["a"]["avg_gap"] == {"mean": 2.0, "std": 1.0, "n": 2}
    assert agg["random_1"]["b"]["avg_gap"] == {"mean": 5.0, "std": 0.0, "n": 1}


def test_count_parts_against_hand_computed_values(tmp_path):
    import json

    runs = [  # (|dUA| + |dMIA|) / 4 of "m": (4 + 0) / 4 = 1 and (0 + 8) / 4 = 2; "h" only in the first run
        {
            "random_1": {
                "retrain": {"ua": 0.0, "mia": 10.0},
                "m": {"ua": 4.0, "mia": 10.0},
                "h": {"ua": 2.0, "mia": 8.0},
            }
        },
        {"random_1": {"retrain": {"ua": 8.0, "mia": 10.0}, "m": {"ua": 8.0, "mia": 18.0}}},
    ]
    parts = aggregate.count_parts(runs)
    # Retrain of the other run, both ways: (|0 - 8| + |10 - 10|) / 4 = 2
    assert parts == {
        "random_1": {
            aggregate.ANOTHER_REQUEST: {"mean": 2.0, "n": 2},
            "m": {"mean": 1.5, "n": 2},
            "h": {"mean": 1.0, "n": 1},
        }
    }
    assert aggregate.count_parts(runs[:1]) == {}  # one run has no other request to compare with
    for seed, run in enumerate(runs):
        (tmp_path / str(seed)).mkdir()
        (tmp_path / str(seed) / "results.json").write_text(json.dumps(run))
    aggregate.main([str(tmp_path / "0"), str(tmp_path / "1"), "--out", str(tmp_path / "agg")])
    table = (tmp_path / "agg" / "counts.md").read_text().splitlines()
    assert table[2] == f"| {aggregate.ANOTHER_REQUEST} | 2.00 |"
    assert table[3] == "| m | 1.50 |"
    assert table[4] == "| h | 1.00 (1 of 2 runs) |"


def test_paired_interval():
    diffs = [-1.0, -2.0, 0.5, -0.5, -3.0]
    first, again = aggregate.paired_interval(diffs), aggregate.paired_interval(diffs)
    assert first == again  # seed 0 by default
    assert first["n"] == 5 and first["mean_diff"] == pytest.approx(-1.2)
    assert first["lo"] <= first["mean_diff"] <= first["hi"]
    assert -3.0 <= first["lo"] < first["hi"] <= 0.5
    assert aggregate.paired_interval(diffs, seed=1) != first
    one = aggregate.paired_interval([2.5])  # one seed: no interval
    assert one["mean_diff"] == 2.5 and one["n"] == 1 and np.isnan(one["lo"]) and np.isnan(one["hi"])
    flat = aggregate.paired_interval([0.25] * 4)
    assert flat["lo"] == flat["hi"] == pytest.approx(0.25) and flat["n"] == 4
    assert math.isnan(aggregate.paired_interval([])["mean_diff"])


def _paired_runs():
    def rows(ref, base, other=None):
        out = {
            "retrain": {"avg_gap_robust": 0.0},
            "hf_amnesia": {"avg_gap_robust": ref},
            "finetune": {"avg_gap_robust": base},
            "hf_amnesia@1": {"avg_gap_robust": 9.0},
            "retrain@1": {"avg_gap_robust": 0.0},
        }
        if other is not None:
            out["neggrad"] = {"avg_gap_robust": other}
        return out

    return [
        {"random_1": rows(1.0, 3.0, other=2.0)},  # neggrad only in the first run
        {"random_1": rows(2.0, 3.0), "class": {"retrain": {"avg_gap_robust": 0.0}, "finetune": {"avg_gap": 1.0}}},
    ]


def test_paired_table_pairs_by_run_and_skips_retrain_reference_and_sequences(tmp_path):
    import json

    paired = aggregate.paired_table(_paired_runs())
    assert list(paired) == ["random_1"]  # "class" has no reference
    assert set(paired["random_1"]) == {"finetune", "neggrad"}
    assert paired["random_1"]["finetune"] == aggregate.paired_interval([1.0 - 3.0, 2.0 - 3.0])
    assert paired["random_1"]["neggrad"]["mean_diff"] == -1.0 and paired["random_1"]["neggrad"]["n"] == 1
    swapped = aggregate.paired_table(_paired_runs(), reference="finetune")
    assert swapped["random_1"]["hf_amnesia"]["mean_diff"] == pytest.approx(1.5)
    for seed, run in enumerate(_paired_runs()):
        (tmp_path / str(seed)).mkdir()
        (tmp_path / str(seed) / "results.json").write_text(json.dumps(run))
    aggregate.main([str(tmp_path / "0"), str(tmp_path / "1"), "--out", str(tmp_path / "agg")])
    assert json.loads((tmp_path / "agg" / "paired.json").read_text()) == json.loads(json.dumps(paired))
    assert "| random_1 | neggrad | -1.00 | n < 2 | 1 |" in (tmp_path / "agg" / "paired.md").read_text()
    assert "| finetune |" in (tmp_path / "agg" / "gaps_robust.md").read_text()


def test_run_seeds_dry_run_prints_a_command_per_seed_and_skips_finished_ones(tmp_path, capsys):
    (tmp_path / "seed_101").mkdir()
    (tmp_path / "seed_101" / "results.json").write_text("{}")
    assert run_seeds.parse_seeds("100,101,105") == [100, 101, 105]
    argv = ["--recipe", "mnist", "--seeds", "100-102", "--out", str(tmp_path), "--dry_run", "--", "--use_cpu"]
    assert run_seeds.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [line for line in lines if "mnist.py" in line]
    assert len(commands) == 2
    for seed, command in zip((100, 102), commands):
        assert command.endswith(f"--use_cpu --seed {seed} --output_dir {tmp_path / f'seed_{seed}'}")
    assert any(line.startswith("seed 101: skipped") for line in lines)
    assert not (tmp_path / "aggregate").exists()  # a dry run writes nothing


def test_run_seeds_goes_on_after_a_failing_seed_and_aggregates_the_finished(tmp_path, monkeypatch, capsys):
    import json
    import subprocess

    (tmp_path / "seed_1").mkdir()
    (tmp_path / "seed_1" / "results.json").write_text(json.dumps(_paired_runs()[0]))
    ran = []
    monkeypatch.setattr(
        run_seeds.subprocess, "run", lambda command: ran.append(command) or subprocess.CompletedProcess(command, 2)
    )
    assert run_seeds.main(["--recipe", "cifar100", "--seeds", "1-3", "--out", str(tmp_path)]) == 1
    assert [command[-3] for command in ran] == ["2", "3"]  # --seed S --output_dir OUT/seed_S
    assert "failed seeds: 2, 3" in capsys.readouterr().out
    agg = json.loads((tmp_path / "aggregate" / "aggregate.json").read_text())
    assert agg["random_1"]["hf_amnesia"]["avg_gap_robust"]["n"] == 1


def test_compare_results_ignores_timing_and_finds_every_other_difference(tmp_path):
    import json

    from recipes.compare_results import differences, main

    before = {"class": {"hf_amnesia": {"ua": 1.0, "seconds": 3.0, "mia": float("nan"), "trace": [1, float("nan")]}}}
    after = {"class": {"hf_amnesia": {"ua": 1.0, "seconds": 9.0, "mia": float("nan"), "trace": [1, float("nan")]}}}
    assert differences(before, after) == []  # timing keys aside, NaN equals NaN, lists compared by element
    after["class"]["hf_amnesia"]["ua"] = 2.0
    after["class"]["retrain"] = {}
    assert differences(before, after) == [("class/hf_amnesia/ua", 1.0, 2.0), ("class/retrain", "<missing>", {})]
    for name, data in (("a.json", before), ("b.json", after)):
        (tmp_path / name).write_text(json.dumps(data))
    assert main([str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0
    assert main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
