"""The audit log: complete writes, a torn tail moved aside loudly, a damaged log refused before any change."""

import hashlib
import json
import logging
import os

import pytest
import torch
from tiny import TinyCNN, image_dataset, tiny_config

from hf_amnesia import AmnesiacTrainer, StoreError
from hf_amnesia.cli import main
from hf_amnesia.store.audit import append_audit, load_audit, read_audit
from hf_amnesia.store.files import AUDIT, AUDIT_TORN, write_atomic


@pytest.fixture()
def served(tmp_path):
    """A trained CNN with its store, one request already committed to `model/`."""
    torch.manual_seed(0)
    data = image_dataset(24, classes=3, seed=0, with_ids=True)
    trainer = AmnesiacTrainer(
        model=TinyCNN(), args=tiny_config(tmp_path / "run", keep_fraction=0.2), train_dataset=data
    )
    trainer.train()
    trainer.forget([100], scale=1.0, repair_steps=0, save_to=tmp_path / "model")
    return trainer, tmp_path / "run" / "_amnesia_store", tmp_path / "model"


def _hashes(*folders):
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != ".lock"
    }


def test_a_torn_last_record_is_moved_aside_and_the_next_request_is_served(served, caplog, capsys):
    trainer, store, model_dir = served
    torn = b'{"request": "0123abcd", "ti'  # an append cut short: no newline
    with open(store / AUDIT, "ab") as f:
        f.write(torn)
    assert main(["audit", str(store)]) == 0  # readable, and says what it found
    out = capsys.readouterr()
    assert "1 forget request(s)" in out.out and "unfinished record" in out.err
    with caplog.at_level(logging.WARNING):
        report = trainer.forget([107], scale=1.0, repair_steps=0, save_to=model_dir)
    assert report.committed and "unfinished record" in caplog.text
    records = read_audit(store)
    assert [r["forgotten"] for r in records] == [1, 1] and records[-1]["request"] == report.request
    assert (store / AUDIT).read_bytes().endswith(b"}\n")
    assert (store / AUDIT_TORN).read_bytes() == torn + b"\n"  # kept, not lost


def test_a_damaged_audit_log_is_refused_before_anything_changes(served, capsys):
    trainer, store, model_dir = served
    log = store / AUDIT
    log.write_bytes(b"not a record\n" + log.read_bytes())
    before = _hashes(store, model_dir)
    weights = torch.nn.utils.parameters_to_vector(trainer.model.parameters()).detach().clone()
    with pytest.raises(StoreError, match=r"audit log .* damaged at line\(s\) \[1\]"):
        trainer.forget([107], scale=1.0, repair_steps=0, save_to=model_dir)
    assert _hashes(store, model_dir) == before
    assert torch.equal(torch.nn.utils.parameters_to_vector(trainer.model.parameters()), weights)
    assert trainer.forgotten_ids() == [100]
    assert main(["audit", str(store), "--json"]) == 0  # the readable records still show
    out = capsys.readouterr()
    assert [r["forgotten"] for r in json.loads(out.out)] == [1] and "line(s) [1]" in out.err
    assert load_audit(store).damaged == [1]


def test_short_writes_are_completed(tmp_path, monkeypatch):
    real = os.write

    def at_most_five_bytes(fd, data):  # what a signal or a nearly full disk may do
        return real(fd, bytes(data[:5]))

    monkeypatch.setattr(os, "write", at_most_five_bytes)
    write_atomic(tmp_path / "state.json", b"x" * 101)
    assert (tmp_path / "state.json").read_bytes() == b"x" * 101
    record = {"request": "feed", "count": 3, "note": "y" * 40}
    append_audit(tmp_path, record)
    append_audit(tmp_path, record)  # once per request
    assert read_audit(tmp_path) == [record]
