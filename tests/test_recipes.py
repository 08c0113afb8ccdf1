"""The recipes run end to end on tiny generated data with the hub schemas (offline)."""

import gzip
import json
import os

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage
from tiny import run_two_processes

RECIPES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "recipes")

METHODS = {
    "original",
    "retrain",
    "retrain_other_seed",
    "hf_amnesia",
    "hold_only",
    "hf_amnesia_deleted",
    "hf_amnesia_exact",
    "hf_amnesia_exact+repair",
    "hf_amnesia_auto_no_repair",
    "hf_amnesia_norm",
    "per_batch",
    "per_batch+repair",
    "per_batch_subset",
    "per_batch_subset+repair",
    "finetune",
    "neggrad",
    "neggrad+repair",
}
METRICS = {
    "ua",
    "ra",
    "ta",
    "mia",
    "mia_auc",
    "avg_gap",
    "avg_gap_robust",
    "seconds",
    "storage_bytes",
    "dist_original",
    "dist_retrain",
}
TINY = [
    "--num_train_epochs",
    "1",
    "--per_device_train_batch_size",
    "16",
    "--use_cpu",
    "--keep_fraction",
    "0.05",
    "--logging_strategy",
    "no",
]


def _mnist_rows(n, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, y in enumerate(labels):  # a learnable bright block per class
        images[i, 2 * y : 2 * y + 6, 4:20] = 250
    return images, labels


def make_mnist_parquet(folder, n_train=60, n_test=30):
    features = Features({"image": Image(), "label": ClassLabel(num_classes=10)})
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = _mnist_rows(n, seed)
        ds = Dataset.from_dict(
            {"image": [PILImage.fromarray(a) for a in images], "label": labels.tolist()}, features=features
        )
        (folder / "mnist").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(folder / "mnist" / f"{split}-00000-of-00001.parquet"))
    return folder


def _idx_bytes(array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_mnist_idx(folder, n_train=60, n_test=30):
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = _mnist_rows(n, seed)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(_idx_bytes(images))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    return folder


def make_cifar_parquet(folder, n_train=48, n_test=24):
    features = Features(
        {"img": Image(), "fine_label": ClassLabel(num_classes=100), "coarse_label": ClassLabel(num_classes=20)}
    )
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        rng = np.random.default_rng(seed)
        fine = np.arange(n) % 6
        images = rng.integers(0, 255, size=(n, 32, 32, 3), dtype=np.uint8)
        images[np.arange(n), :, :, fine % 3] = 255
        ds = Dataset.from_dict(
            {
                "img": [PILImage.fromarray(a) for a in images],
                "fine_label": fine.tolist(),
                "coarse_label": (fine // 5).tolist(),
            },
            features=features,
        )
        folder.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return folder


def _check_outputs(out, scenarios=("class", "random_10", "random_1", "canary_1"), methods=METHODS):
    results = json.loads((out / "results.json").read_text())
    assert list(results) == list(scenarios)
    for scenario in [s for s in scenarios if s != "sequence_5"]:
        assert set(results[scenario]) == methods
        for method, row in results[scenario].items():
            assert METRICS <= set(row), (scenario, method)
            assert all(np.isfinite(row[m]) for m in METRICS)
        assert results[scenario]["retrain"]["avg_gap"] == 0
        assert results[scenario]["hf_amnesia"]["storage_bytes"] > 0
        assert results[scenario]["hf_amnesia"]["scale"] > 0  # chosen on the validation split
        for method in ("hold_only", "hf_amnesia_deleted"):  # the store-free twin; forget after the rows went
            assert set(results[scenario][method]) == set(results[scenario]["hf_amnesia"]), (scenario, method)
        assert results[scenario]["hold_only"]["storage_bytes"] == 0 and results[scenario]["hold_only"]["scale"] == 0
        assert (
            results[scenario]["hf_amnesia_deleted"]["storage_bytes"] == results[scenario]["hf_amnesia"]["storage_bytes"]
        )
    assert results["class"]["retrain"]["ua"] == 100.0  # Retrain never saw the class
    assert (out / "results.md").read_text().count("|") > 100
    assert (out / "results.png").stat().st_size > 1000
    return results


def test_mnist_recipe_from_parquet(tmp_path):
    from recipes import mnist

    data = make_mnist_parquet(tmp_path / "data")
    out = tmp_path / "out"
    mnist.main(["--dataset_name", str(data), "--output_dir", str(out), *TINY])
    _check_outputs(out)


def test_mnist_recipe_from_idx_files(tmp_path):
    from recipes import mnist
    from recipes.study import RESEARCH_METHODS

    data = make_mnist_idx(tmp_path / "idx")
    out = tmp_path / "out"
    mnist.main(
        ["--dataset_name", str(data), "--output_dir", str(out), "--scenarios", "class,sequence_5", "--model", "mlp"]
        + ["--methods", ",".join(["all", *RESEARCH_METHODS])]  # the ablations run only when named
        + TINY
    )
    results = _check_outputs(out, scenarios=("class", "sequence_5"), methods=METHODS | set(RESEARCH_METHODS))
    _check_sequence(results)
    third, other = results["class"]["retrain_third_seed"], results["class"]["retrain_other_seed"]
    assert third["dist_retrain"] > 0 and third["dist_retrain"] != other["dist_retrain"]  # a third seed, its own model


def _check_sequence(results):
    rows = results["sequence_5"]
    steps = sum(name.startswith("retrain@") for name in rows)  # five requests, or one per canary if fewer
    assert 1 <= steps <= 5 and set(rows) == {
        f"{m}@{k}" for m in {n.split("@")[0] for n in rows} for k in range(1, steps + 1)
    }
    for step in range(1, steps + 1):
        assert rows[f"retrain@{step}"]["avg_gap"] == 0
        assert np.isfinite(rows[f"hf_amnesia@{step}"]["avg_gap"]) and rows[f"hf_amnesia@{step}"]["scale"] >= 0
        for method in ("hold_only", "hf_amnesia_deleted"):
            assert set(rows[f"{method}@{step}"]) == set(rows[f"hf_amnesia@{step}"]), (method, step)
            assert np.isfinite(rows[f"{method}@{step}"]["avg_gap"])


def test_canaries_get_a_wrong_label():
    from datasets import Dataset

    from recipes.scenarios import plant_canaries

    data = Dataset.from_dict({"x": list(range(400)), "labels": [i % 4 for i in range(400)]}).with_format("torch")
    planted, rows = plant_canaries(data, "labels", 0.01, seed=0)
    before, after = np.asarray(data["labels"]), np.asarray(planted["labels"])
    assert len(rows) == 4 and (before[rows] != after[rows]).all()
    assert np.array_equal(np.delete(before, rows), np.delete(after, rows))
    assert planted.format["type"] == "torch" and set(after.tolist()) <= {0, 1, 2, 3}


def test_canary_copies_share_their_label_and_carry_their_own_ids():
    from recipes.scenarios import plan_forget_sets, plant_canaries

    data = Dataset.from_dict({"x": list(range(400)), "labels": [i % 4 for i in range(400)], "id": list(range(400))})
    planted, rows = plant_canaries(data.with_format("torch"), "labels", 0.01, seed=0, copies=3, next_id=1000)
    single, single_rows = plant_canaries(data, "labels", 0.01, seed=0)
    assert rows.shape == (4, 3) and len(planted) == 408 and np.array_equal(rows[:, 0], single_rows[:, 0])
    labels, xs, ids = (np.asarray(planted[c]) for c in ("labels", "x", "id"))
    assert (labels[rows] == np.asarray(single["labels"])[rows[:, :1]]).all()  # every copy keeps the wrong label
    assert (xs[rows] == xs[rows[:, :1]]).all() and len(set(ids.tolist())) == 408  # same features, distinct ids
    assert set(ids[rows[:, 1:]].ravel().tolist()) == set(range(1000, 1008))
    planned = plan_forget_sets(ids, labels, 0, 0, ["canary_1", "random_10"], canaries=ids[rows])
    assert np.array_equal(planned["canary_1"], np.sort(ids[rows].ravel()))  # the request names every copy
    assert len(planned["random_10"]) == 41 and not set(planned["random_10"]) & set(ids[rows].ravel())


def test_mnist_idx_reader_round_trips(tmp_path):
    from recipes.data import read_idx

    images, _ = _mnist_rows(5, 0)
    (tmp_path / "x.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    assert np.array_equal(read_idx(tmp_path / "x.gz"), images)


def test_cifar100_recipe_from_parquet(tmp_path):
    from recipes import cifar100

    data = make_cifar_parquet(tmp_path / "data")
    out = tmp_path / "out"
    cifar100.main(["--dataset_name", str(data), "--output_dir", str(out), "--model_width", "4", *TINY])
    _check_outputs(out)


def test_cifar100_from_save_to_disk(tmp_path):
    from datasets import DatasetDict, load_dataset

    from recipes import cifar100

    parquet = make_cifar_parquet(tmp_path / "pq", n_train=12, n_test=6)
    splits = load_dataset(
        "parquet", data_files={s: str(parquet / f"{s}-00000-of-00001.parquet") for s in ("train", "test")}
    )
    DatasetDict(splits).save_to_disk(str(tmp_path / "disk"))
    train, test = cifar100.get_datasets(cifar100.CifarArguments(dataset_name=str(tmp_path / "disk")), seed=0)
    assert tuple(train[0]["pixel_values"].shape) == (3, 32, 32) and len(train) == 12 and len(test) == 6


def test_bad_dataset_folder_says_what_to_do(tmp_path):
    from recipes.data import load_image_dataset

    with pytest.raises(FileNotFoundError, match="train-\\*.parquet"):
        load_image_dataset(str(tmp_path))


def test_quickstart_runs_shortened(tmp_path):
    from recipes import quickstart

    results = quickstart.main(["--output_dir", str(tmp_path), "--num_train_epochs", "2", "--max_train_samples", "300"])
    assert set(results) == {"class", "random_10", "random_1", "canary_1"}
    assert (tmp_path / "results.json").exists()
    facts = json.loads((tmp_path / "run.json").read_text())  # what ran: the code's commit and the command line
    assert {"commit", "dirty", "argv", "hf_amnesia_version"} <= set(facts) and facts["seed"] == 42
    assert facts["argv"][1:] == ["--output_dir", str(tmp_path), "--num_train_epochs", "2", "--max_train_samples", "300"]
    # a rerun into the same folder starts from a fresh store (the old run's deltas are not mixed in)
    again = quickstart.main(
        ["--output_dir", str(tmp_path), "--num_train_epochs", "1", "--max_train_samples", "200", "--scenarios", "class"]
    )
    assert again["class"]["retrain"]["avg_gap"] == 0


@pytest.mark.slow
def test_mnist_recipe_in_two_processes(tmp_path):
    data = make_mnist_parquet(tmp_path / "data")
    out = tmp_path / "out"
    run_two_processes(
        os.path.join(RECIPES, "mnist.py"), "--dataset_name", str(data), "--output_dir", str(out), *TINY, port=29541
    )
    _check_outputs(out)
    meta = json.loads((out / "run.json").read_text())
    assert meta["world_size"] == 2


def test_a_method_the_study_does_not_run_is_refused_before_training(tmp_path):
    from datasets import Dataset

    from hf_amnesia import AmnesiaConfig
    from recipes.study import StudyArguments, run_study

    rows = Dataset.from_dict({"x": [[0.0]] * 8, "labels": [0, 1] * 4})
    config = AmnesiaConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    study = StudyArguments(methods="hf_amnesia,hf_amnesia_ceil10", scenarios="class")
    with pytest.raises(ValueError, match=r"\['hf_amnesia_ceil10'\], which the study does not run"):
        run_study(lambda: None, rows, rows, config, study)
    assert not (tmp_path / "_amnesia_store").exists()
