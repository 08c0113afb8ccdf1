"""Kind 8: errors mean one thing each, and none is a raw traceback.

CLI exit codes: 0 served, 2 refused with nothing changed, 3 committed but not finished (stderr
says to run `hf-amnesia recover STORE`; the API raises `ForgetIncompleteError`), 4 served in
part. A full disk (`HF_AMNESIA_FAIL_AT`) before the commit point is a refusal, after it an
unfinished request that `recover` completes. Any damaged store file gives `StoreError`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from adversary import (
    IDS,
    assert_model_equals_clean_forget,
    audit_records,
    cli,
    copy_case,
    fail_at,
    forget_argv,
    hashes,
    load,
    params,
    shard_file,
    trainer_for,
)

from hf_amnesia.errors import ForgetIncompleteError, StoreError

AFTER_COMMIT = ["forget:committed", "swap", "purge"]


def test_k8_full_disk_before_commit_cli(tmp_path, capsys, monkeypatch):
    case = copy_case(tmp_path)
    before = hashes(case.root)
    fail_at(monkeypatch, "forget:staged")
    result = cli(capsys, *forget_argv(case, *IDS))
    assert result.code == 2 and "Traceback" not in result.err, result
    assert hashes(case.root) == before


def test_k8_full_disk_before_commit_api(tmp_path, monkeypatch):
    """The request is refused (the disk's OSError, or a StoreError saying so): the weights in memory,
    their forgotten-id record and every file as before."""
    case = copy_case(tmp_path)
    model = load(case.model)
    trainer = trainer_for(model, case.store, case.out)
    weights = params(model)
    before = hashes(case.root)
    fail_at(monkeypatch, "forget:staged")
    with pytest.raises((OSError, StoreError)):
        trainer.forget(IDS, scale=1.0, repair_steps=0, save_to=case.model)
    assert hashes(case.root) == before
    assert all(torch.equal(weights[k], v) for k, v in params(model).items())
    assert trainer.forgotten_ids() == []


@pytest.mark.parametrize("point", AFTER_COMMIT)
def test_k8_full_disk_after_commit_cli(tmp_path, capsys, monkeypatch, point):
    """The review's case: served after the commit point, yet a raw OSError and exit 1."""
    case = copy_case(tmp_path)
    fail_at(monkeypatch, point)
    result = cli(capsys, *forget_argv(case, *IDS))
    assert result.code == 3 and "Traceback" not in result.err, result
    assert f"hf-amnesia recover {case.store}" in result.err
    monkeypatch.delenv("HF_AMNESIA_FAIL_AT")
    assert cli(capsys, "recover", case.store).code == 0
    assert_model_equals_clean_forget(case.model, IDS)
    assert len(audit_records(case.store)) == 1


@pytest.mark.parametrize("point", AFTER_COMMIT)
def test_k8_full_disk_after_commit_api(tmp_path, monkeypatch, point):
    from hf_amnesia.store.journal import recover

    case = copy_case(tmp_path)
    fail_at(monkeypatch, point)
    with pytest.raises(ForgetIncompleteError, match="hf-amnesia recover"):
        trainer_for(load(case.model), case.store, case.out).forget(IDS, scale=1.0, repair_steps=0, save_to=case.model)
    monkeypatch.delenv("HF_AMNESIA_FAIL_AT")
    assert recover(case.store) is True
    assert_model_equals_clean_forget(case.model, IDS)
    assert len(audit_records(case.store)) == 1


def _write(name, content):
    def damage(store):
        path = store / name
        path.unlink(missing_ok=True)
        if content == "dir":
            path.mkdir()
        else:
            path.write_bytes(content)

    return damage


def _json_without(name, key):
    def damage(store):
        path = store / name
        data = json.loads(path.read_text())
        del data[key]
        path.write_text(json.dumps(data))

    return damage


def _generation_file(suffix, content):
    def damage(store):
        path = shard_file(store, suffix)
        if isinstance(content, np.ndarray):
            path.unlink()
            np.save(path, content)  # keeps the name: np.save adds no suffix to a name ending in .npy
        elif content is None:
            path.unlink()
        else:
            path.write_bytes(content)

    return damage


_JOURNAL = {"state": "committed", "request": "ab12", "save_to": "/nowhere", "purged_ids": [2]}

DAMAGED = {
    "manifest_not_json": _write("manifest.json", b"{not json"),
    "manifest_empty": _write("manifest.json", b""),
    "manifest_json_list": _write("manifest.json", b"[1, 2]"),
    "manifest_without_layout": _json_without("manifest.json", "layout"),
    "manifest_without_dtype": _json_without("manifest.json", "dtype"),
    "manifest_is_a_directory": _write("manifest.json", "dir"),
    "shard_state_not_json": _write("shard-00000.json", b"\x00\x01"),
    "shard_state_without_rows": _json_without("shard-00000.json", "rows"),
    "shard_state_json_list": _write("shard-00000.json", b"[]"),
    "ids_npy_garbage": _generation_file("ids.npy", b"garbage"),
    "ids_npy_of_floats": _generation_file("ids.npy", np.arange(16, dtype=np.float64)),
    "sums_npy_garbage": _generation_file("sums.npy", b"\x93NUMPY garbage"),
    "rows_file_missing": _generation_file("rows", None),
    "rows_file_truncated": _generation_file("rows", b"\x00" * 100),
    "journal_not_json": _write("forget-journal.json", b"{"),
    "journal_without_audit": _write("forget-journal.json", json.dumps(_JOURNAL).encode()),
    "audit_log_is_a_directory": _write("audit.jsonl", "dir"),
}


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_k8_damaged_store_file_refused(tmp_path, capsys, damage):
    case = copy_case(tmp_path)
    DAMAGED[damage](case.store)
    before = hashes(case.root)
    result = cli(capsys, *forget_argv(case, *IDS))
    assert result.code == 2 and "Traceback" not in result.err, result
    assert hashes(case.root) == before


@pytest.mark.parametrize(
    "damage",
    list(DAMAGED),
)
def test_k8_damaged_store_file_verify(tmp_path, capsys, damage):
    case = copy_case(tmp_path)
    DAMAGED[damage](case.store)
    before = hashes(case.root)
    result = cli(capsys, "verify", case.store)
    assert result.code == 2 and "Traceback" not in result.err and "all checksums match" not in result.out, result
    assert hashes(case.root) == before


@pytest.mark.parametrize(
    "command",
    ["verify", "recover", "forget"],
)
def test_k8_not_a_store(tmp_path, capsys, command):
    case = copy_case(tmp_path)
    nowhere = tmp_path / "not_a_store"
    before = hashes(case.root, nowhere)
    argv = (
        ["forget", "--model", case.model, "--store", nowhere, "--ids", "2"]
        if command == "forget"
        else [command, nowhere]
    )
    result = cli(capsys, *argv)
    assert result.code == 2 and "Traceback" not in result.err, result
    assert hashes(case.root, nowhere) == before
