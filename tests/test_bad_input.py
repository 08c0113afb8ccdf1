"""Bad input: each row of docs/reliability.md gets a clear error or documented behaviour and
changes nothing on disk or in the weights."""

import errno
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import TinyCNN, image_dataset, tiny_config
from transformers import TrainerCallback

from hf_amnesia import (
    AmnesiacTrainer,
    ForgetRequestError,
    StoreError,
    StoreReader,
    UnsupportedTrainingError,
)


def _args(out, **kw):
    return tiny_config(out, **{"keep_fraction": 0.2, "learning_rate": 1e-2, **kw})


def _disk(folder):
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.name != ".lock":
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    model = TinyCNN()
    # 16 steps of 4 rows cover rows 0..63 only once; max_steps=3 leaves most rows untrained.
    trainer = AmnesiacTrainer(model=model, args=_args(out, max_steps=3), train_dataset=image_dataset(40))
    trainer.train()
    return trainer


@pytest.fixture
def guard(trained):
    """Checks that a case changed neither the weights nor the store files."""
    trainer = trained
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    disk = _disk(trainer.args.store_dir)
    yield trainer
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.model.parameters())), "weights changed"
    assert _disk(trainer.args.store_dir) == disk, "store files changed"
    assert trainer.forgotten_ids() == []


BAD_IDS = {
    "none": (None, "None"),
    "string": ("12", "string"),
    "float_list": ([1.5, 2.0], "integers"),
    "nested": ([[1, 2], [3, 4]], "one-dimensional"),
    "ragged": ([[1], [2, 3]], "flat list"),
    "negative": ([3, -1], "non-negative"),
    "bool": ([True, False], "integers"),
    "none_inside": ([1, None], "integers"),
    "numpy_float": (np.array([1.0, 2.0]), "integers"),
    "torch_float": (torch.tensor([1.0, 2.0]), "integers"),
    "object": (object(), "list, array, tensor"),
    "uint64_wrapping_negative": (np.array([3, 2**63], dtype=np.uint64), "below 2\\*\\*63"),
    "mixed_blames_the_string": ([1, 2, "x"], "got str 'x'"),
    "mixed_blames_the_float": ([1, 2, 5.5], "got float 5.5"),
}


@pytest.mark.parametrize("case", sorted(BAD_IDS))
def test_malformed_ids(guard, case):
    ids, match = BAD_IDS[case]
    with pytest.raises(ForgetRequestError, match=match):
        guard.forget(ids, scale=1.0, repair_steps=0)


def test_unknown_and_never_trained_ids_are_reported(guard):
    reader = StoreReader(guard.args.store_dir)
    trained_ids = set(reader.all_ids().tolist())
    assert len(trained_ids) == 12  # max_steps=3 x batch 4: rows never trained on are not in the store
    untrained = sorted(set(range(40)) - trained_ids)[:2]
    with pytest.raises(ForgetRequestError, match="not in the store"):
        guard.forget(untrained + [10_000], strict=True, scale=1.0, repair_steps=0)


def test_duplicates_collapse(trained):
    trainer = trained
    theta = [p.detach().clone() for p in trainer.model.parameters()]
    one = sorted(StoreReader(trainer.args.store_dir).all_ids().tolist())[0]
    report = trainer.forget([one, one, one], scale=1.0, repair_steps=0)
    assert report.forgotten == [one]
    with torch.no_grad():
        for p, t in zip(trainer.model.parameters(), theta):
            p.copy_(t)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "1", True, None])
def test_bad_scale(guard, scale):
    with pytest.raises(ForgetRequestError, match="scale"):
        guard.forget([0], scale=scale)


@pytest.mark.parametrize("steps", [-1, 1.5, "3", True])
def test_bad_repair_steps(guard, steps):
    with pytest.raises(ForgetRequestError, match="repair_steps"):
        guard.forget([0], repair_steps=steps, scale=1.0)


def test_save_to_inside_the_store(guard):
    with pytest.raises(ForgetRequestError, match="outside the store"):
        guard.forget([0], save_to=str(Path(guard.args.store_dir) / "model"), scale=1.0, repair_steps=0)


def test_corrupted_row_is_caught_before_subtracting(tmp_path, trained):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(trained.args.store_dir, store)
    rows = next(store.glob("shard-00000.g*.rows"))
    data = bytearray(rows.read_bytes())
    data[5] ^= 0xFF  # row 0
    rows.write_bytes(bytes(data))
    trainer = AmnesiacTrainer(model=trained.model, args=_args(tmp_path, store_dir=str(store)))
    weights = [p.detach().clone() for p in trained.model.parameters()]
    ids = np.load(next(store.glob("shard-00000.g*.ids.npy")))
    with pytest.raises(StoreError, match="checksum"):
        trainer.forget(ids.tolist(), scale=1.0, repair_steps=0)
    assert all(torch.equal(a, b) for a, b in zip(weights, trained.model.parameters()))


def test_missing_shard_is_caught(tmp_path, trained):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(trained.args.store_dir, store)
    for path in store.glob("shard-00000.g*.rows"):
        path.unlink()
    trainer = AmnesiacTrainer(model=trained.model, args=_args(tmp_path, store_dir=str(store)))
    weights = [p.detach().clone() for p in trained.model.parameters()]
    with pytest.raises(StoreError, match="missing"):
        trainer.forget([0], scale=1.0, repair_steps=0)
    assert all(torch.equal(a, b) for a, b in zip(weights, trained.model.parameters()))


def test_store_dir_that_is_a_file(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    trainer = AmnesiacTrainer(
        model=TinyCNN(), args=_args(tmp_path, store_dir=str(blocker / "store")), train_dataset=image_dataset(8)
    )
    with pytest.raises(StoreError, match="cannot write the store"):
        trainer.train()
    assert blocker.read_text() == "not a folder"
    with pytest.raises(StoreError, match="is a file"):
        AmnesiacTrainer(model=TinyCNN(), args=_args(tmp_path, store_dir=str(blocker))).forget(
            [0], scale=1.0, repair_steps=0
        )


class _DiskFull(TrainerCallback):
    """Makes the store's log refuse writes from step 2 on, as a full disk would (with `on_close`,
    closing it fails too, as flushing a buffered log on a full disk does)."""

    def __init__(self, trainer, on_close=False):
        self.trainer, self.on_close = trainer, on_close

    def on_step_end(self, args, state, control, **kwargs):
        on_close = self.on_close

        class Full:
            def write(self, data):
                raise OSError(errno.ENOSPC, "No space left on device")

            def close(self):
                real.close()
                if on_close:
                    raise OSError(errno.ENOSPC, "No space left on device")

            def __getattr__(self, name):
                return getattr(real, name)

        real = self.trainer._recorder.shard._log
        self.trainer._recorder.shard._log = Full()


@pytest.mark.parametrize("on_close", [False, True], ids=["log_write", "log_write_and_close"])
def test_disk_full_during_recording_stops_with_a_clear_error(tmp_path, on_close):
    trainer = AmnesiacTrainer(
        model=TinyCNN(), args=_args(tmp_path, tail_tolerance=0.5), train_dataset=image_dataset(16)
    )
    trainer.add_callback(_DiskFull(trainer, on_close))
    with pytest.raises(StoreError, match="Free disk space"):  # not the OSError of closing the log
        trainer.train()
    # The run is marked unfinished: only a resume from its checkpoint may continue it.
    with pytest.raises(StoreError, match="did not finish"):
        AmnesiacTrainer(model=TinyCNN(), args=_args(tmp_path), train_dataset=image_dataset(16)).train()


def test_iterable_dataset_is_refused(tmp_path):
    from datasets import Dataset

    iterable = Dataset.from_dict({"pixel_values": [[[[0.0]]]], "labels": [0]}).to_iterable_dataset()
    with pytest.raises(UnsupportedTrainingError, match="iterable"):
        AmnesiacTrainer(model=TinyCNN(), args=_args(tmp_path), train_dataset=iterable)


def test_collator_that_drops_the_id_column(tmp_path):
    def collate(rows):
        return {
            "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "labels": torch.stack([r["labels"] for r in rows]),
        }

    trainer = AmnesiacTrainer(
        model=TinyCNN(),
        args=_args(tmp_path, remove_unused_columns=False),
        train_dataset=image_dataset(8),
        data_collator=collate,
    )
    with pytest.raises(UnsupportedTrainingError, match="no 'dataset_id' column"):
        trainer.train()


@pytest.mark.parametrize(
    "text,encoding,match",
    [
        ("1_5\n", "utf-8", "'1_5' is not an integer id"),
        ("+3 4", "utf-8", "'\\+3' is not an integer id"),
        ("7 \u0663", "utf-8", "is not an integer id"),  # an Arabic-Indic digit, which int() accepts
        ("1 2 3", "utf-16", "cannot read the ids file"),
    ],
    ids=["underscore", "plus_sign", "non_ascii_digit", "utf16_file"],
)
def test_the_cli_refuses_ids_int_would_bend(tmp_path, capsys, text, encoding, match):
    from hf_amnesia.cli import main

    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(text, encoding=encoding)
    assert main(["forget", "--model", str(tmp_path), "--store", str(tmp_path), "--ids-file", str(ids_file)]) == 2
    assert re.search(match, capsys.readouterr().err)
    missing = str(tmp_path / "missing")
    assert main(["forget", "--model", str(tmp_path), "--store", str(tmp_path), "--ids-file", missing]) == 2
    assert "cannot read the ids file" in capsys.readouterr().err
