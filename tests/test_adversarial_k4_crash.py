"""Kind 4: a forget interrupted at any of its points is finished (or undone) by every route.

The points are those `crash_point` names inside a forget: `forget:staged` (before the commit
point), `forget:committed`, `swap` (between the two renames of the model swap: the model folder
is missing) and `purge`. The interruption is `HF_AMNESIA_FAIL_AT` (in this process: the error
stops the request where a crash would) or, for two cases, a real SIGKILL of a subprocess
(`HF_AMNESIA_CRASH_AT`). Then `hf-amnesia recover STORE`, the next `hf-amnesia forget` or the
API's `recover` completes a committed request, and the model equals the clean forget.
"""

from __future__ import annotations

import signal

import pytest
from adversary import (
    IDS,
    assert_model_equals_clean_forget,
    assert_model_is_pristine,
    audit_records,
    cli,
    copy_case,
    fail_at,
    forget_argv,
    hashes,
    load,
    run_python,
    trainer_for,
)

from hf_amnesia import StoreReader
from hf_amnesia.errors import AmnesiaError

POINTS = ["forget:staged", "forget:committed", "swap", "purge"]


def _interrupt(case, monkeypatch, point):
    fail_at(monkeypatch, point)
    with pytest.raises((OSError, AmnesiaError)):
        trainer_for(load(case.model), case.store, case.out).forget(IDS, scale=1.0, repair_steps=0, save_to=case.model)
    monkeypatch.delenv("HF_AMNESIA_FAIL_AT")


def _assert_finished(case, committed, records):
    if committed:
        assert_model_equals_clean_forget(case.model, IDS)
        assert not any(StoreReader(case.store).locate(i) for i in IDS)
    else:
        assert_model_is_pristine(case.model)
        assert all(StoreReader(case.store).locate(i) for i in IDS)
    assert len(audit_records(case.store)) == records
    assert not (case.store / "forget-journal.json").exists()
    assert not list(case.root.glob("*.amnesia-*"))


@pytest.mark.parametrize("route", ["cli_recover", "cli_forget", "api_recover"])
@pytest.mark.parametrize("point", POINTS)
def test_k4_interrupted_forget_recovered(tmp_path, capsys, monkeypatch, point, route):
    from hf_amnesia.store.journal import recover

    case = copy_case(tmp_path)
    _interrupt(case, monkeypatch, point)
    committed = point != "forget:staged"
    if point == "swap":
        assert not case.model.exists()
    if route == "cli_recover":
        result = cli(capsys, "recover", case.store)
        assert result.code == 0 and result.json()["completed_request"] is committed, result
        _assert_finished(case, committed, int(committed))
    elif route == "api_recover":
        assert recover(case.store) is committed
        _assert_finished(case, committed, int(committed))
    else:  # the same request again: the interrupted one is finished first, then this one is served
        result = cli(capsys, *forget_argv(case, *IDS))
        assert result.code == 0 and "Traceback" not in result.err, result
        assert result.json()["already_forgotten"] == (3 if committed else 0)
        _assert_finished(case, True, 1 + int(committed))


CLI = ["-m", "hf_amnesia.cli", "forget", "--model", "{model}", "--store", "{store}", "--ids", *map(str, IDS)]


def _kill_inside_forget(case, point):
    args = [a.format(model=case.model, store=case.store) for a in CLI]
    proc = run_python(args, env={"HF_AMNESIA_CRASH_AT": point})
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])


@pytest.mark.slow
def test_k4_killed_in_swap_then_cli_forget(tmp_path, capsys):
    """The review's case: killed between the two renames, the model folder is missing."""
    case = copy_case(tmp_path)
    _kill_inside_forget(case, "swap")
    assert not case.model.exists() and (case.store / "forget-journal.json").exists()
    result = cli(capsys, *forget_argv(case, *IDS))
    assert result.code == 0 and result.json()["already_forgotten"] == 3, result
    _assert_finished(case, True, 2)


@pytest.mark.slow
def test_k4_killed_after_commit_then_cli_recover(tmp_path, capsys):
    case = copy_case(tmp_path)
    _kill_inside_forget(case, "purge")
    result = cli(capsys, "recover", case.store)
    assert result.code == 0 and result.json()["completed_request"] is True, result
    _assert_finished(case, True, 1)


def test_k4_missing_model_folder_without_journal(tmp_path, capsys):
    case = copy_case(tmp_path)
    missing = tmp_path / "gone"
    before = hashes(case.root)
    result = cli(capsys, *forget_argv(case, *IDS, model=missing))
    assert result.code == 2 and "does not exist" in result.err and "Traceback" not in result.err, result
    assert "hub" not in result.err.lower() and "repo" not in result.err.lower()
    assert hashes(case.root) == before


def test_k4_recover_on_a_store_with_nothing_to_do(tmp_path, capsys):
    case = copy_case(tmp_path)
    before = hashes(case.root)
    result = cli(capsys, "recover", case.store)
    assert result.code == 0 and result.json()["completed_request"] is False, result
    assert hashes(case.root) == before
