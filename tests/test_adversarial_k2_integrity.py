"""Kind 2: damaged metadata is refused before any change, and `hf-amnesia verify` names it.

A careless edit or a flipped bit in any file the forget path trusts (the ids of a generation, the
row checksums, the manifest, a shard's state, the forget journal, an audit line, the store key, the
lineage file) must give `StoreError` before anything changes, and `hf-amnesia verify STORE` must
exit 2 naming the damaged file. A store of the old format version 1 is refused with a message
that points at `hf-amnesia migrate`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from adversary import (
    IDS,
    audit_records,
    cli,
    copy_case,
    edit_json,
    fail_at,
    forget_argv,
    hashes,
    load,
    shard_file,
    trainer_for,
    write_format_1_store,
)

from hf_amnesia.errors import AmnesiaError, StoreError


def _flip_id_15_into_79(store):
    path = shard_file(store, "ids.npy")
    raw = bytearray(path.read_bytes())
    ids = np.load(path)
    at = len(raw) - ids.nbytes + int(np.flatnonzero(ids == 15)[0]) * 8
    raw[at] ^= 0x40  # 15 ^ 64 == 79
    path.write_bytes(bytes(raw))
    return path.name


def _flip_sums_byte(store, dataset_id):
    path = shard_file(store, "sums.npy")
    raw = bytearray(path.read_bytes())
    sums = np.load(path)
    raw[len(raw) - sums.nbytes + dataset_id * 4] ^= 0x01
    path.write_bytes(bytes(raw))
    return path.name


def _manifest(change):
    def damage(store):
        edit_json(store / "manifest.json", change)
        return "manifest.json"

    return damage


def _shard_state(change):
    def damage(store):
        edit_json(store / "shard-00000.json", change)
        return "shard-00000.json"

    return damage


def _set(key, value):
    return lambda data: data.__setitem__(key, value(data[key]))


EDITS = {
    "manifest_seed": _manifest(_set("seed", lambda v: v + 1)),
    "manifest_decay": _manifest(_set("decay", lambda v: [v[0] * 1.01, *v[1:]])),
    "manifest_keep_fraction": _manifest(_set("keep_fraction", lambda v: 0.2)),
    "manifest_k": _manifest(_set("k", lambda v: v + 1)),
    "manifest_dtype": _manifest(_set("dtype", lambda v: "float16")),
    "manifest_num_shards": _manifest(_set("num_shards", lambda v: 2)),
    "manifest_final_weights": _manifest(_set("final_weights", lambda v: "0" * 32)),
    "shard_purged_id_added": _shard_state(_set("purged", lambda v: [*v, 5])),
    "shard_generation": _shard_state(_set("generation", lambda v: v + 1)),
    "shard_rows": _shard_state(_set("rows", lambda v: v - 1)),
    "shard_log_consumed": _shard_state(_set("log_consumed", lambda v: v + 8)),
    "sums_byte_of_another_id": lambda store: _flip_sums_byte(store, 0),
    "ids_byte": _flip_id_15_into_79,
}


def test_k2_flipped_ids_byte(tmp_path, capsys):
    """The review's case: `forget --ids 79 --strict` subtracted the row of id 15."""
    case = copy_case(tmp_path)
    _flip_id_15_into_79(case.store)
    before = hashes(case.root)
    result = cli(capsys, *forget_argv(case, 79, extra=["--strict"]))
    assert result.code == 2 and "Traceback" not in result.err, result
    assert hashes(case.root) == before


def test_k2_flipped_ids_byte_verify(tmp_path, capsys):
    case = copy_case(tmp_path)
    name = _flip_id_15_into_79(case.store)
    result = cli(capsys, "verify", case.store)
    assert result.code == 2 and name in result.err and "Traceback" not in result.err, result
    assert "all checksums match" not in result.out


@pytest.mark.parametrize("edit", list(EDITS))
def test_k2_metadata_edit_refused(tmp_path, edit):
    case = copy_case(tmp_path)
    EDITS[edit](case.store)
    model = load(case.model)
    before = hashes(case.root)
    with pytest.raises(StoreError):
        trainer_for(model, case.store, case.out).forget(IDS, scale=1.0, repair_steps=0, save_to=case.model)
    assert hashes(case.root) == before


@pytest.mark.parametrize("edit", list(EDITS))
def test_k2_metadata_edit_verify(tmp_path, capsys, edit):
    case = copy_case(tmp_path)
    name = EDITS[edit](case.store)
    before = hashes(case.root)
    result = cli(capsys, "verify", case.store)
    assert result.code == 2 and name in result.err and "Traceback" not in result.err, result
    assert hashes(case.root) == before


def test_k2_sums_byte_of_the_requested_id(tmp_path):
    case = copy_case(tmp_path)
    _flip_sums_byte(case.store, 5)
    before = hashes(case.root)
    with pytest.raises(StoreError, match="checksum"):
        trainer_for(load(case.model), case.store, case.out).forget(IDS, scale=1.0, repair_steps=0, save_to=case.model)
    assert hashes(case.root) == before


def _interrupted_after_commit(case, monkeypatch):
    """A committed request whose roll forward stopped (a full disk right after the commit point)."""
    fail_at(monkeypatch, "forget:committed")
    with pytest.raises((OSError, AmnesiaError)):
        trainer_for(load(case.model), case.store, case.out).forget(IDS, scale=1.0, repair_steps=0, save_to=case.model)
    monkeypatch.delenv("HF_AMNESIA_FAIL_AT")
    assert (case.store / "forget-journal.json").exists()


@pytest.mark.parametrize("route", ["cli_recover", "cli_forget", "api_recover"])
def test_k2_edited_journal_refused(tmp_path, capsys, monkeypatch, route):
    """A journal whose ids were edited (here: id 0 added to the purge) is not rolled forward."""
    from hf_amnesia.store.journal import recover

    case = copy_case(tmp_path)
    _interrupted_after_commit(case, monkeypatch)
    edit_json(case.store / "forget-journal.json", _set("purged_ids", lambda v: [0, *v]))
    before = hashes(case.root)
    if route == "api_recover":
        with pytest.raises(StoreError):
            recover(case.store)
    else:
        argv = ["recover", case.store] if route == "cli_recover" else forget_argv(case, 7)
        result = cli(capsys, *argv)
        assert result.code == 2 and "Traceback" not in result.err, result
    assert hashes(case.root) == before


def _serve_one(case):
    trainer_for(load(case.model), case.store, case.out).forget([2], scale=1.0, repair_steps=0, save_to=case.model)
    assert len(audit_records(case.store)) == 1


def _edit_first_line(path):
    """Change one value of the first JSON line of `path`, keeping it valid JSON."""
    lines = path.read_bytes().split(b"\n")
    record = json.loads(lines[0])
    key = next(k for k in sorted(record) if k != "checksum" and isinstance(record[k], (int, str)))
    record[key] = record[key] + 1 if isinstance(record[key], int) else record[key][:-1] + "x"
    lines[0] = json.dumps(record).encode()
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize("route", ["api_forget", "cli_verify"])
@pytest.mark.parametrize("file", ["audit.jsonl", "lineage.jsonl"])
def test_k2_edited_log_line_refused(tmp_path, capsys, route, file):
    """An edited (still well-formed) line of the audit log or the lineage file."""
    case = copy_case(tmp_path)
    _serve_one(case)
    _edit_first_line(case.store / file)
    before = hashes(case.root)
    if route == "api_forget":
        with pytest.raises(StoreError):
            trainer_for(load(case.model), case.store, case.out).forget(
                [5], scale=1.0, repair_steps=0, save_to=case.model
            )
    else:
        result = cli(capsys, "verify", case.store)
        assert result.code == 2 and file in result.err and "Traceback" not in result.err, result
    assert hashes(case.root) == before


@pytest.mark.parametrize("damage", ["missing", "changed", "truncated"])
@pytest.mark.parametrize("route", ["api_forget", "cli_verify"])
def test_k2_store_key_refused(tmp_path, capsys, damage, route):
    case = copy_case(tmp_path)
    key = case.store / "store.key"
    if damage == "missing":
        key.unlink()
    elif damage == "changed":
        key.write_bytes(bytes(reversed(key.read_bytes())))
    else:
        key.write_bytes(key.read_bytes()[:7])
    before = hashes(case.root)
    if route == "api_forget":
        with pytest.raises(StoreError):
            trainer_for(load(case.model), case.store, case.out).forget(
                IDS, scale=1.0, repair_steps=0, save_to=case.model
            )
    else:
        result = cli(capsys, "verify", case.store)
        assert result.code == 2 and "store.key" in result.err and "Traceback" not in result.err, result
    assert hashes(case.root) == before


@pytest.mark.parametrize("route", ["api_forget", "cli_forget", "cli_verify"])
def test_k2_format_version_1_refused(tmp_path, capsys, route):
    from tiny import tiny_bert

    store, model_dir = tmp_path / "old" / "store", tmp_path / "old" / "model"
    model = tiny_bert()
    write_format_1_store(store, model)
    model.save_pretrained(str(model_dir))
    before = hashes(store, model_dir)
    if route == "api_forget":
        with pytest.raises(StoreError, match="hf-amnesia migrate"):
            trainer_for(model, store, tmp_path / "out").forget(IDS, scale=1.0, repair_steps=0, save_to=model_dir)
    else:
        argv = (
            ["verify", store]
            if route == "cli_verify"
            else ["forget", "--model", model_dir, "--store", store, "--ids", "2"]
        )
        result = cli(capsys, *argv)
        assert result.code == 2 and "hf-amnesia migrate" in result.err and "Traceback" not in result.err, result
    assert hashes(store, model_dir) == before
