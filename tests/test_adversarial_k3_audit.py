"""Kind 3: the audit log cannot wedge the store.

A torn last line (an append cut short) moves to `audit.jsonl.torn` with a warning and the forget
is served with one new complete record. A damaged line elsewhere refuses a forget with save_to
before any change (`StoreError`, CLI exit 2) while `hf-amnesia audit` still prints the readable
records (exit 0). Writes that stop short are continued.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
from adversary import (
    IDS,
    assert_model_equals_clean_forget,
    audit_records,
    cli,
    copy_case,
    forget_argv,
    hashes,
    load,
    trainer_for,
)

from hf_amnesia.errors import StoreError

TORN = b'{"request": "0123abcd", "ti'  # an append cut short: no newline


def _serve(case, ids):
    trainer_for(load(case.model), case.store, case.out).forget(ids, scale=1.0, repair_steps=0, save_to=case.model)


@pytest.mark.parametrize("route", ["api", "cli", "only_line"])
def test_k3_torn_tail_served(tmp_path, capsys, caplog, route):
    case = copy_case(tmp_path)
    if route != "only_line":
        _serve(case, [2])
    log = case.store / "audit.jsonl"
    with open(log, "ab") as f:
        f.write(TORN)
    count = len(audit_records(case.store))
    with caplog.at_level(logging.WARNING):
        if route == "cli":
            result = cli(capsys, *forget_argv(case, 5, 11))
            assert result.code == 0 and "Traceback" not in result.err, result
        else:
            _serve(case, [5, 11])
    assert "unfinished record" in caplog.text
    assert len(audit_records(case.store)) == count + 1
    assert log.read_bytes().endswith(b"}\n") and TORN not in log.read_bytes()
    assert (case.store / "audit.jsonl.torn").read_bytes() == TORN + b"\n"
    assert_model_equals_clean_forget(case.model, [5, 11] if route == "only_line" else IDS)


DAMAGE = {
    "garbage_first_line": lambda lines: [b"not a record", *lines],
    "garbage_middle_line": lambda lines: [lines[0], b"{oops", lines[1]],
    "last_complete_line_cut": lambda lines: [lines[0], lines[1][: len(lines[1]) // 2]],
    "json_list_line": lambda lines: [lines[0], b"[1, 2]", lines[1]],
    "record_without_request": lambda lines: [lines[0], json.dumps({"count": 1}).encode(), lines[1]],
    "binary_line": lambda lines: [b"\xff\xfe\x00\x01", *lines],
}


def _damaged(tmp_path, damage):
    """A case with two committed requests ([2], then [5]) and a damaged audit log."""
    case = copy_case(tmp_path)
    _serve(case, [2])
    _serve(case, [5])
    log = case.store / "audit.jsonl"
    lines = log.read_bytes().rstrip(b"\n").split(b"\n")
    log.write_bytes(b"\n".join(DAMAGE[damage](lines)) + b"\n")
    return case


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_k3_damaged_line_api_refused(tmp_path, damage):
    case = _damaged(tmp_path, damage)
    model = load(case.model)
    before = hashes(case.root)
    trainer = trainer_for(model, case.store, case.out)
    with pytest.raises(StoreError, match="audit log"):
        trainer.forget([11], scale=1.0, repair_steps=0, save_to=case.model)
    assert hashes(case.root) == before
    assert trainer.forgotten_ids() == [2, 5]


@pytest.mark.parametrize("damage", ["garbage_middle_line", "last_complete_line_cut"])
def test_k3_damaged_line_cli_refused(tmp_path, capsys, damage):
    case = _damaged(tmp_path, damage)
    before = hashes(case.root)
    result = cli(capsys, *forget_argv(case, 11))
    assert result.code == 2 and "audit log" in result.err and "Traceback" not in result.err, result
    assert hashes(case.root) == before


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_k3_damaged_line_audit_still_reads(tmp_path, capsys, damage):
    case = _damaged(tmp_path, damage)
    readable = 1 if damage == "last_complete_line_cut" else 2
    result = cli(capsys, "audit", case.store, "--json")
    assert result.code == 0 and "Traceback" not in result.err, result
    assert len(json.loads(result.out)) == readable and "line(s)" in result.err
    plain = cli(capsys, "audit", case.store)
    assert plain.code == 0 and f"{readable} forget request(s)" in plain.out, plain


def test_k3_short_writes_continued(tmp_path, monkeypatch):
    real = os.write

    def at_most_five_bytes(fd, data):  # what a signal or a nearly full disk may do
        return real(fd, bytes(data[:5]))

    case = copy_case(tmp_path)
    monkeypatch.setattr(os, "write", at_most_five_bytes)
    _serve(case, IDS)
    monkeypatch.undo()
    (record,) = audit_records(case.store)
    assert record["count"] == 3 and (case.store / "audit.jsonl").read_bytes().endswith(b"}\n")
    assert_model_equals_clean_forget(case.model, IDS)
