"""A resume that would undo a forget, mix two runs or two stores, or fail at the end for a missing
generation is refused up front: `StoreError`, no training step, every file byte-identical."""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from scripts.crash_train import config
from tiny import Crash, CrashAt, TinyCNN, image_dataset
from transformers import TrainerCallback

from hf_amnesia import AmnesiacTrainer, StoreError
from hf_amnesia.store import Manifest


class Steps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps += 1


def _trainer(out, store=None, weights=None, callbacks=()):
    torch.manual_seed(0)
    model = TinyCNN()
    if weights is not None:
        model.load_state_dict(weights)
    args = config(out, **({"store_dir": str(store)} if store else {}))
    return AmnesiacTrainer(model=model, args=args, train_dataset=image_dataset(24), callbacks=list(callbacks))


def _crashed_run(out, store=None, weights=None, step=5):
    """A run interrupted at `step`, after its checkpoint-4 (tails still open: its log is empty)."""
    with pytest.raises(Crash):
        _trainer(out, store, weights, [CrashAt(step)]).train()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run (checkpoints every 4 steps) with its store under `out`, and its final weights."""
    root = tmp_path_factory.mktemp("finished")
    trainer = _trainer(root / "out")
    trainer.train()
    save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, str(root / "final.safetensors"))
    return root


def _copy(finished, tmp_path):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    return tmp_path / "out", tmp_path / "out" / "_amnesia_store", load_file(str(tmp_path / "final.safetensors"))


def _files(*folders):
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in folders
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file()
    }


def _refused(tmp_path, out, checkpoint, match, store=None):
    """Resume from `checkpoint` into the store: refused with `match`, before any step or write."""
    before = _files(tmp_path)
    steps = Steps()
    trainer = _trainer(out, store, callbacks=[steps])
    with pytest.raises(StoreError, match=match):
        trainer.train(resume_from_checkpoint=checkpoint)
    assert steps.steps == 0
    assert _files(tmp_path) == before


def test_resume_after_a_committed_forget_is_refused(tmp_path, finished):
    out, store, weights = _copy(finished, tmp_path)
    model = TinyCNN()
    model.load_state_dict(weights)
    forgetter = AmnesiacTrainer(model=model, args=config(out))
    forgetter.forget([0, 3, 7], save_to=tmp_path / "forgot", scale=1.0, repair_steps=0)
    assert Manifest.load(store).commits == 1
    _refused(tmp_path, out, True, r"1 forget request\(s\) were committed .* would bring back the rows")


def test_resume_from_another_runs_checkpoint_is_refused(tmp_path, finished):
    out, store, weights = _copy(finished, tmp_path)
    _crashed_run(tmp_path / "second", store, weights)  # a second run into the store, interrupted
    _refused(tmp_path, tmp_path / "second", str(out / "checkpoint-4"), "belongs to another training run", store)


def test_resume_into_another_store_is_refused(tmp_path, finished):
    out, _, _ = _copy(finished, tmp_path)
    _crashed_run(tmp_path / "other")
    other_store = tmp_path / "other" / "_amnesia_store"
    _refused(tmp_path, tmp_path / "other", str(out / "checkpoint-4"), "into another store", other_store)


def test_resume_with_a_missing_generation_is_refused(tmp_path, finished):
    out, store, weights = _copy(finished, tmp_path)
    _crashed_run(tmp_path / "second", store, weights)  # it resumes from generation 1, the first run's rows
    (store / "shard-00000.g000001.rows").unlink()
    checkpoint = str(tmp_path / "second" / "checkpoint-4")
    _refused(tmp_path, tmp_path / "second", checkpoint, r"is missing shard-00000\.g000001\.rows", store)


def test_resume_from_a_checkpoint_without_the_stores_identity_is_refused(tmp_path):
    _crashed_run(tmp_path / "out")
    path = tmp_path / "out" / "checkpoint-4" / "amnesia_recorder-00000.safetensors"
    state = load_file(str(path))
    save_file({k: v for k, v in state.items() if k not in ("store_id", "run_id", "commits")}, str(path))
    _refused(tmp_path, tmp_path / "out", True, "did not record the store and the run")


def test_resume_of_the_stores_own_run_still_works(tmp_path):
    _crashed_run(tmp_path / "out")
    _trainer(tmp_path / "out").train(resume_from_checkpoint=True)
    store = tmp_path / "out" / "_amnesia_store"
    assert Manifest.load(store).final_weights is not None and not list(store.glob("*.recording"))
