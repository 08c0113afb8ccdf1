"""Kind 6: two forgets from one model with different `--save-to`, and training against forgets.

The first request purges its ids' rows; the second, from the same original model, cannot subtract
those ids any more. It must say so (`ForgetReport.purged_elsewhere`, CLI JSON key
`"purged_elsewhere"`, exit 4: served in part, these ids still influence this model) instead of
calling them unknown with exit 0; with `strict` it is refused with nothing changed. Training
holds the store's lock, so a forget waits for it.
"""

from __future__ import annotations

import fcntl
import os

import pytest
from adversary import (
    assert_model_equals_clean_forget,
    audit_records,
    cli,
    copy_case,
    forget_argv,
    hashes,
    load,
    trainer_for,
)
from tiny import text_dataset, tiny_bert, tiny_config
from transformers import TrainerCallback

from hf_amnesia import AmnesiacTrainer
from hf_amnesia.errors import ForgetRequestError


def _first(case, capsys):
    """The first request: ids 1 and 2 forgotten from the model, saved to `first/`."""
    first = case.root / "first"
    assert cli(capsys, *forget_argv(case, 1, 2, extra=["--save-to", first])).code == 0
    return first


def test_k6_overlapping_save_to_cli_served_in_part(tmp_path, capsys):
    case = copy_case(tmp_path)
    _first(case, capsys)
    second = case.root / "second"
    result = cli(capsys, *forget_argv(case, 2, 3, extra=["--save-to", second]))
    assert result.code == 4 and "Traceback" not in result.err, result
    assert result.json()["purged_elsewhere"] == [2] and result.json()["unknown"] == []
    assert result.json()["forgotten"] == 1
    assert_model_equals_clean_forget(second, [3])
    assert len(audit_records(case.store)) == 2


def test_k6_overlapping_save_to_cli_strict_refused(tmp_path, capsys):
    case = copy_case(tmp_path)
    _first(case, capsys)
    second = case.root / "second"
    before = hashes(case.root)
    result = cli(capsys, *forget_argv(case, 2, 3, extra=["--save-to", second, "--strict"]))
    assert result.code == 2 and "Traceback" not in result.err, result
    assert hashes(case.root) == before and not second.exists()


def test_k6_overlapping_save_to_api_purged_elsewhere(tmp_path, capsys):
    case = copy_case(tmp_path)
    _first(case, capsys)
    second = case.root / "second"
    report = trainer_for(load(case.model), case.store, case.out).forget(
        [2, 3], scale=1.0, repair_steps=0, save_to=second
    )
    assert report.purged_elsewhere == [2] and report.unknown == [] and report.forgotten == [3]
    assert_model_equals_clean_forget(second, [3])
    assert len(audit_records(case.store)) == 2


def test_k6_overlapping_save_to_api_strict_refused(tmp_path, capsys):
    case = copy_case(tmp_path)
    _first(case, capsys)
    second = case.root / "second"
    trainer = trainer_for(load(case.model), case.store, case.out)
    before = hashes(case.root)
    with pytest.raises(ForgetRequestError):
        trainer.forget([2, 3], scale=1.0, repair_steps=0, save_to=second, strict=True)
    assert hashes(case.root) == before and not second.exists()
    assert trainer.forgotten_ids() == []


def test_k6_overlapping_after_no_purge_served(tmp_path, capsys):
    """With --no-purge the first request leaves the rows: the second is served in full."""
    case = copy_case(tmp_path)
    first = case.root / "first"
    assert cli(capsys, *forget_argv(case, 1, 2, extra=["--save-to", first, "--no-purge"])).code == 0
    second = case.root / "second"
    result = cli(capsys, *forget_argv(case, 2, 3, extra=["--save-to", second]))
    assert result.code == 0 and result.json()["forgotten"] == 2, result
    assert_model_equals_clean_forget(second, [2, 3])
    assert len(audit_records(case.store)) == 2


class _TryLock(TrainerCallback):
    """At the second step, try to take the store's lock as a forget job would (without waiting)."""

    def __init__(self, store):
        self.store, self.held = store, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != 2:
            return
        fd = os.open(os.path.join(self.store, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            self.held = False
        except BlockingIOError:
            self.held = True
        finally:
            os.close(fd)


def test_k6_training_holds_the_store_lock(tmp_path):
    args = tiny_config(tmp_path / "run", keep_fraction=0.1, store_dtype="float32")
    probe = _TryLock(args.store_dir)
    AmnesiacTrainer(model=tiny_bert(), args=args, train_dataset=text_dataset(16), callbacks=[probe]).train()
    assert probe.held is True
