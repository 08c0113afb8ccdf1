"""Resuming from a checkpoint gives the same store and weights as an uninterrupted run."""

import numpy as np
import pytest
import torch
from scripts.crash_train import SUMS_IN_MEMORY, config
from tiny import Crash, CrashAt, TinyCNN, image_dataset

from hf_amnesia import AmnesiacTrainer, StoreReader
from hf_amnesia.recorder import DeltaSums

TOL = 1e-6


def _args(out, **kw):
    return config(out, **kw)


def _train(out, callbacks=(), resume=None, **kw):
    torch.manual_seed(0)
    model = TinyCNN()
    trainer = AmnesiacTrainer(
        model=model, args=_args(out, **kw), train_dataset=image_dataset(20), callbacks=list(callbacks)
    )
    trainer.train(resume_from_checkpoint=resume)
    return model


def _store(out):
    reader = StoreReader(out / "_amnesia_store")
    return {int(i): reader.read(int(i)) for i in reader.all_ids()}


MODES = {"log_every_step": {"sum_deltas_in_memory": False}, "sums_in_memory": SUMS_IN_MEMORY}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("crash_step", [6])
def test_resume_equals_uninterrupted(tmp_path, crash_step, mode):
    full = _train(tmp_path / "full", **MODES[mode])
    with pytest.raises(Crash):
        _train(tmp_path / "cut", callbacks=[CrashAt(crash_step)], **MODES[mode])
    checkpoint = tmp_path / "cut" / "checkpoint-4"
    assert checkpoint.exists()
    resumed = _train(tmp_path / "cut", resume=str(checkpoint), **MODES[mode])
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert (a - b).abs().max() <= TOL, name
    store_full, store_cut = _store(tmp_path / "full"), _store(tmp_path / "cut")
    assert sorted(store_full) == sorted(store_cut) == list(range(20))
    worst = max(float((store_full[i] - store_cut[i]).abs().max()) for i in store_full)
    assert worst <= TOL
    assert np.isfinite(worst)


@pytest.mark.parametrize("tolerance", [0.8, 1e-12], ids=["tails_close_during_training", "tails_close_at_the_end"])
def test_sums_in_memory_store_the_same_deltas(tmp_path, monkeypatch, tolerance):
    """Summing in memory (written at the checkpoints every 4 steps and at the end) stores what
    one log record per step stores: the same sums, up to float32 rounding of the order."""
    written = []
    real = DeltaSums.drain

    def drain(self):
        for ids, values in real(self):
            written.append(len(ids))
            yield ids, values

    monkeypatch.setattr(DeltaSums, "drain", drain)
    per_step = _train(tmp_path / "log", sum_deltas_in_memory=False, tail_tolerance=tolerance)
    summed = _train(tmp_path / "sums", sum_deltas_in_memory=True, tail_tolerance=tolerance)
    if tolerance == 0.8:
        assert len(written) > 1  # sums were written at a checkpoint too, not only at the end
    for a, b in zip(per_step.parameters(), summed.parameters()):
        assert torch.equal(a, b)  # recording does not touch training
    store_log, store_sums = _store(tmp_path / "log"), _store(tmp_path / "sums")
    assert sorted(store_log) == sorted(store_sums) == list(range(20))
    scale = max(float(v.abs().max()) for v in store_log.values())
    worst = max(float((store_log[i] - store_sums[i]).abs().max()) for i in store_log)
    assert scale > 0 and worst <= 1e-6 * scale


def test_unfinished_store_without_resume_is_refused(tmp_path):
    with pytest.raises(Crash):
        _train(tmp_path, callbacks=[CrashAt(5)])
    from hf_amnesia import StoreError

    with pytest.raises(StoreError, match="did not finish"):
        _train(tmp_path)
