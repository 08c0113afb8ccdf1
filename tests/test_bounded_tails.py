"""Bounded momentum tails against exact ones, and the planner's figures against a real run."""

import json

import numpy as np
import pytest
import torch
from tiny import TinyCNN, image_dataset, text_dataset, tiny_bert, tiny_config
from transformers import TrainerCallback

from hf_amnesia import AmnesiacTrainer, ConfigError, StoreReader, plan
from hf_amnesia.attribution import open_tail_bound
from hf_amnesia.cli import main as cli_main
from hf_amnesia.forgetting import forget_update
from hf_amnesia.store.files import generation_paths

ROWS, BATCH, ACCUMULATION, EPOCHS = 32, 4, 2, 10  # 40 optimizer steps of 8 rows


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


class OpenBytes(TrainerCallback):
    def __init__(self):
        self.trainer, self.seen = None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(self.trainer._recorder.ledger.open_bytes())
        self.summed = self.trainer._recorder.sums is not None


def _bert_run(out, open_steps=None):
    """Tiny BERT, AdamW with decay, clipping, warmup and a linear schedule, the whole delta kept;
    `open_steps`: a tail memory budget of exactly that many steps."""
    model = tiny_bert()
    theta0, m = _flat(model), sum(p.numel() for p in model.parameters())
    budget = {} if open_steps is None else {"tail_memory_budget_mb": open_tail_bound(open_steps, 8, m, m) / 2**20}
    args = tiny_config(
        out, keep_fraction=1.0, store_dtype="float32", per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATION, num_train_epochs=EPOCHS, learning_rate=5e-3, weight_decay=0.1,
        warmup_steps=3, lr_scheduler_type="linear", max_grad_norm=0.5, seed=0, **budget,
    )  # fmt: skip
    watch = OpenBytes()
    trainer = AmnesiacTrainer(model=model, args=args, train_dataset=text_dataset(ROWS), callbacks=[watch])
    watch.trainer = trainer
    trainer.train()
    reader = StoreReader(args.store_dir)
    q = torch.tensor(reader.manifest.decay, dtype=torch.float64)
    change = _flat(model) - q.repeat_interleave(torch.tensor(reader.manifest.layout.numels)) * theta0
    completeness = float((forget_update(reader, reader.all_ids()) - change).norm() / change.norm())
    per_sample = {int(i): forget_update(reader, [int(i)]) for i in reader.all_ids()[:8]}
    return reader.manifest, completeness, per_sample, max(watch.seen), model


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory):
    return _bert_run(tmp_path_factory.mktemp("exact"))


def test_bounded_tails_stay_within_the_budget_and_close_to_the_exact_deltas(tmp_path, exact_run):
    manifest, completeness, exact, exact_peak, _ = exact_run
    assert manifest.bounded_tail_steps is None and completeness <= 1e-4
    bounded_manifest, bounded_err, bounded, peak, model = _bert_run(tmp_path, open_steps=8)
    assert bounded_manifest.bounded_tail_steps == 8  # the store says how it was recorded
    m = bounded_manifest.num_params
    assert peak == open_tail_bound(7, 8, m, m) < exact_peak  # at a step's end its oldest tail has closed
    # Measured 0.040 (completeness) and 0.061 (largest per-sample difference) for this 40-step run:
    # the frozen denominator is the estimate's error (docs/limits.md, Bounded tails).
    assert bounded_err <= 0.1
    worst = max(float((bounded[i] - exact[i]).norm() / exact[i].norm()) for i in exact)
    assert worst <= 0.15
    # the planner states the same mode, steps and peak
    figures = plan(model, ROWS, BATCH, EPOCHS, keep_fraction=1.0, gradient_accumulation_steps=ACCUMULATION,
                   tail_memory_budget_mb=open_tail_bound(8, 8, m, m) / 2**20)  # fmt: skip
    assert figures.bounded and figures.open_steps == 8 and figures.tail_memory_bytes == open_tail_bound(8, 8, m, m)


def test_a_budget_as_long_as_the_run_is_exact(tmp_path, exact_run):
    _, _, exact, _, _ = exact_run
    manifest, completeness, same, _, _ = _bert_run(tmp_path, open_steps=40)  # no tail outlives training
    assert manifest.bounded_tail_steps is None and completeness <= 1e-4  # nothing was estimated
    assert max(float((same[i] - exact[i]).norm() / exact[i].norm()) for i in exact) <= 1e-4


@pytest.mark.parametrize("keep_fraction,layout", [(0.3, "rows"), (0.05, "entries")])
def test_the_planner_states_the_store_and_tails_of_a_real_run(tmp_path, keep_fraction, layout):
    torch.manual_seed(0)
    # beta1 0.5: W = 24 steps; 40 rows in batches of 4 for 3 epochs: 30 steps
    args = tiny_config(tmp_path, keep_fraction=keep_fraction, keep_layout=layout, adam_beta1=0.5, num_train_epochs=3)
    model = TinyCNN()
    figures = plan(model, 40, 4, 3, keep_fraction=keep_fraction, keep_layout=layout, beta1=0.5)
    watch = OpenBytes()
    trainer = AmnesiacTrainer(model=model, args=args, train_dataset=image_dataset(40), callbacks=[watch])
    watch.trainer = trainer
    trainer.train()
    manifest = StoreReader(args.store_dir).manifest
    assert (figures.k, figures.num_params, figures.steps, figures.window) == (manifest.k, manifest.num_params, 30, 24)
    assert not figures.bounded and manifest.bounded_tail_steps is None
    assert max(watch.seen) == open_tail_bound(23, 4, manifest.k, manifest.num_params)
    assert figures.tail_memory_bytes == open_tail_bound(24, 4, manifest.k, manifest.num_params)
    ids, rows, sums = generation_paths(args.store_dir, 0, 1)
    payload = rows.stat().st_size + len(np.load(ids)) * 8 + len(np.load(sums)) * 4
    assert figures.store_bytes == payload == 40 * (manifest.k * 2 + 12)
    # a datasets.Dataset whose sums fit: summed in memory by default, nothing copied off per step
    assert watch.summed and figures.sums_bytes == 40 * manifest.k * 4 and figures.transfer_bytes_per_step == 0
    forced = plan(model, 40, 4, 3, keep_fraction=keep_fraction, keep_layout=layout, sum_deltas_in_memory=False)
    assert forced.sums_bytes == 0 and forced.transfer_bytes_per_step == 4 * manifest.k * 4


def test_plan_refuses_bad_settings_and_prints_from_a_config(tmp_path, capsys):
    with pytest.raises(ConfigError, match="keep_layout"):
        plan(TinyCNN(), 10, 2, keep_layout="columns")
    with pytest.raises(ConfigError, match="num_rows"):
        plan(TinyCNN(), 0, 2)
    config = tiny_bert().config
    config.architectures = ["BertForSequenceClassification"]  # as save_pretrained writes it
    config.save_pretrained(tmp_path)
    assert cli_main(["plan", str(tmp_path), "--rows", "1000", "--batch-size", "8", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["num_params"] == sum(p.numel() for p in tiny_bert().parameters())
    assert figures["steps"] == 125 and figures["store_dtype"] == "float16"
    assert cli_main(["plan", str(tmp_path / "missing"), "--rows", "10", "--batch-size", "2"]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.parametrize("budget", [0, -1, float("inf"), float("nan")])
def test_the_tail_budget_must_be_positive_and_finite(tmp_path, budget):
    with pytest.raises(ConfigError, match="tail_memory_budget_mb"):
        tiny_config(tmp_path, tail_memory_budget_mb=budget)
    with pytest.raises(ConfigError, match="tail_memory_budget_mb"):
        plan(TinyCNN(), 10, 2, tail_memory_budget_mb=budget)


def test_the_planner_says_when_one_step_exceeds_the_budget():
    model = TinyCNN()
    m = sum(p.numel() for p in model.parameters())
    tiny = plan(model, 400, 4, 3, keep_fraction=1.0, tail_memory_budget_mb=open_tail_bound(1, 4, m, m) / 2**21)
    assert tiny.over_budget and tiny.open_steps == 1 and tiny.bounded
    assert "one step alone exceeds" in str(tiny)
    assert not plan(model, 400, 4, 3).over_budget


def test_sums_in_memory_by_default_for_a_hf_dataset_whose_sums_fit():
    from hf_amnesia.recording import AUTO_SUMS_BYTES, sums_in_memory

    rows = image_dataset(8)
    assert sums_in_memory(None, rows, k=100)
    assert not sums_in_memory(None, rows, k=AUTO_SUMS_BYTES // (4 * 8) + 1)  # more than 1 GiB of sums
    assert not sums_in_memory(None, list(rows), k=100)  # not a datasets.Dataset: reading ids costs a pass
    assert sums_in_memory(True, None, k=10**9) and not sums_in_memory(False, rows, k=1)


def _three_step_budget():
    """A tail memory budget of exactly 3 steps for crash_train's TinyCNN runs (batch 4, keep 0.3)."""
    figures = plan(TinyCNN(), 20, 4, 3, keep_fraction=0.3)
    return open_tail_bound(3, 4, figures.k, figures.num_params) / 2**20


def test_a_resumed_run_keeps_the_bounded_mode_of_its_start(tmp_path):
    from scripts.crash_train import config
    from tiny import Crash, CrashAt

    def train(callbacks=None, resume=None, **overrides):  # 20 rows in batches of 4 for 3 epochs: 15 steps
        torch.manual_seed(0)
        trainer = AmnesiacTrainer(
            model=TinyCNN(), args=config(tmp_path, **overrides), train_dataset=image_dataset(20), callbacks=callbacks
        )
        trainer.train(resume_from_checkpoint=resume)

    with pytest.raises(Crash):
        train([CrashAt(6)], tail_memory_budget_mb=_three_step_budget())
    train(resume=str(tmp_path / "checkpoint-4"))  # the default budget: exact from here on
    assert StoreReader(tmp_path / "_amnesia_store").manifest.bounded_tail_steps == 3


def test_stopping_before_the_planned_steps_warns_that_bounded_deltas_are_too_large(tmp_path, caplog):
    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 8

    torch.manual_seed(0)
    args = tiny_config(tmp_path, keep_fraction=0.3, num_train_epochs=3, tail_memory_budget_mb=_three_step_budget())
    trainer = AmnesiacTrainer(model=TinyCNN(), args=args, train_dataset=image_dataset(20), callbacks=[StopAt()])
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "training stopped at step 8 of the 15 planned" in caplog.text
    assert StoreReader(args.store_dir).manifest.bounded_tail_steps == 3
