"""Kind 5: resuming cannot undo a forget or mix two runs, and a broken store is found before training.

Resuming from a checkpoint taken before a committed forget (the purged ids would come back),
resuming an interrupted store from another run's checkpoint, a finished run resumed, or training
on a store whose newest generation is missing: each is refused up front with `StoreError`, before
any training step, with every store file as it was.
"""

from __future__ import annotations

import functools
import shutil

import pytest
from adversary import _scratch, copy_case, hashes, load, trainer_for
from tiny import text_dataset, tiny_bert, tiny_config
from transformers import TrainerCallback

from hf_amnesia import AmnesiacTrainer
from hf_amnesia.errors import StoreError


class _Steps(TrainerCallback):
    """Counts optimizer steps; raises at `stop_at` (an interrupted run)."""

    def __init__(self, stop_at=None):
        self.steps, self.stop_at = 0, stop_at

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        if state.global_step == self.stop_at:
            raise KeyboardInterrupt("interrupted")


def _args(run, **overrides):
    return tiny_config(
        run,
        keep_fraction=0.1,
        store_dtype="float32",
        num_train_epochs=2,
        learning_rate=5e-3,
        save_strategy="steps",
        save_steps=2,
        tail_tolerance=1e-12,  # tails stay open: nothing reaches the log before the end
        **overrides,
    )


def _train(root, seed, stop_at=None):
    model = tiny_bert(seed=seed)
    trainer = AmnesiacTrainer(
        model=model, args=_args(root / "run"), train_dataset=text_dataset(16), callbacks=[_Steps(stop_at)]
    )
    try:
        trainer.train()
    except KeyboardInterrupt:
        return root
    model.save_pretrained(str(root / "model"))
    return root


@functools.cache
def _checkpointed():
    """A finished run with checkpoints every 2 steps (`run/checkpoint-N`)."""
    return _train(_scratch("checkpointed"), seed=0)


@functools.cache
def _interrupted():
    """A run of another seed interrupted at step 5 (its store is marked unfinished)."""
    return _train(_scratch("interrupted"), seed=1, stop_at=5)


def _resume(run, checkpoint):
    steps = _Steps()
    trainer = AmnesiacTrainer(model=tiny_bert(), args=_args(run), train_dataset=text_dataset(16), callbacks=[steps])
    return trainer, steps, lambda: trainer.train(resume_from_checkpoint=str(checkpoint))


def test_k5_resume_from_checkpoint_before_a_forget(tmp_path):
    """The review's case: the resumed run accepted, and the purged ids came back."""
    case = copy_case(tmp_path, _checkpointed())
    trainer_for(load(case.model), case.store, case.out).forget([2, 5], scale=1.0, repair_steps=0, save_to=case.model)
    before = hashes(case.store)
    _, steps, resume = _resume(case.root / "run", case.root / "run" / "checkpoint-4")
    with pytest.raises(StoreError):
        resume()
    assert steps.steps == 0 and hashes(case.store) == before


def test_k5_resume_interrupted_store_from_another_runs_checkpoint(tmp_path):
    interrupted = shutil.copytree(_interrupted(), tmp_path / "interrupted")
    other = shutil.copytree(_checkpointed(), tmp_path / "other")
    store = interrupted / "run" / "_amnesia_store"
    assert list(store.glob("*.recording"))
    before = hashes(store)
    _, steps, resume = _resume(interrupted / "run", other / "run" / "checkpoint-4")
    with pytest.raises(StoreError):
        resume()
    assert steps.steps == 0 and hashes(store) == before


def test_k5_resume_from_checkpoint_without_recorder_state(tmp_path):
    interrupted = shutil.copytree(_interrupted(), tmp_path / "interrupted")
    checkpoint = interrupted / "run" / "checkpoint-4"
    for state in checkpoint.glob("amnesia_recorder-*"):
        state.unlink()
    store = interrupted / "run" / "_amnesia_store"
    before = hashes(store)
    _, steps, resume = _resume(interrupted / "run", checkpoint)
    with pytest.raises(StoreError, match="recorder state"):
        resume()
    assert steps.steps == 0 and hashes(store) == before


def test_k5_resume_a_finished_run(tmp_path):
    case = copy_case(tmp_path, _checkpointed())
    before = hashes(case.store)
    _, steps, resume = _resume(case.root / "run", case.root / "run" / "checkpoint-4")
    with pytest.raises(StoreError):
        resume()
    assert steps.steps == 0 and hashes(case.store) == before


@pytest.mark.parametrize("missing", ["ids.npy", "rows", "sums.npy"])
def test_k5_missing_newest_generation_refused_up_front(tmp_path, missing):
    """The review's case: found only at the final compaction, after all the training compute."""
    case = copy_case(tmp_path)
    (path,) = case.store.glob(f"shard-00000.g*.{missing}")
    path.unlink()
    before = hashes(case.store)
    steps = _Steps()
    args = tiny_config(case.root / "run", num_train_epochs=1)
    trainer = AmnesiacTrainer(model=load(case.model), args=args, train_dataset=text_dataset(16), callbacks=[steps])
    with pytest.raises(StoreError):
        trainer.train()
    assert steps.steps == 0 and hashes(case.store) == before


def test_k5_new_run_of_another_model_into_the_store(tmp_path):
    case = copy_case(tmp_path)
    before = hashes(case.store)
    steps = _Steps()
    args = tiny_config(case.root / "run", num_train_epochs=1)
    trainer = AmnesiacTrainer(model=tiny_bert(seed=3), args=args, train_dataset=text_dataset(16), callbacks=[steps])
    with pytest.raises(StoreError, match="other weights"):
        trainer.train()
    assert steps.steps == 0 and hashes(case.store) == before
