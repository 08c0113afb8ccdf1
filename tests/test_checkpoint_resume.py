"""Resuming from a checkpoint gives the same store and weights as an uninterrupted run."""

import os
import sys

import numpy as np
import pytest
import torch
from tiny import TinyCNN, image_dataset
from transformers import TrainerCallback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from crash_train import config  # noqa: E402

from hf_amnesia import AmnesiacTrainer, StoreReader

TOL = 1e-6


class Crash(RuntimeError):
    pass


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash(f"simulated crash at step {self.step}")


def _args(out, **kw):
    return config(out, **kw)


def _train(out, callbacks=(), resume=None):
    torch.manual_seed(0)
    model = TinyCNN()
    trainer = AmnesiacTrainer(model=model, args=_args(out), train_dataset=image_dataset(20), callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return model


def _store(out):
    reader = StoreReader(out / "_amnesia_store")
    return {int(i): reader.read(int(i)) for i in reader.all_ids()}


@pytest.mark.parametrize("crash_step", [6])
def test_resume_equals_uninterrupted(tmp_path, crash_step):
    full = _train(tmp_path / "full")
    with pytest.raises(Crash):
        _train(tmp_path / "cut", callbacks=[CrashAt(crash_step)])
    checkpoint = tmp_path / "cut" / "checkpoint-4"
    assert checkpoint.exists()
    resumed = _train(tmp_path / "cut", resume=str(checkpoint))
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert (a - b).abs().max() <= TOL, name
    store_full, store_cut = _store(tmp_path / "full"), _store(tmp_path / "cut")
    assert sorted(store_full) == sorted(store_cut) == list(range(20))
    worst = max(float((store_full[i] - store_cut[i]).abs().max()) for i in store_full)
    assert worst <= TOL
    assert np.isfinite(worst)


def test_unfinished_store_without_resume_is_refused(tmp_path):
    with pytest.raises(Crash):
        _train(tmp_path, callbacks=[CrashAt(5)])
    from hf_amnesia import StoreError

    with pytest.raises(StoreError, match="did not finish"):
        _train(tmp_path)
