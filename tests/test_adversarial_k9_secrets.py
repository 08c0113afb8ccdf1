"""Kind 9: what a forget leaves behind does not give the ids away.

No field of an audit record lets one test a guessed id set without the store's key (an unsalted
sha256 of four small ids is found by enumeration), and the record changes with the key. The saved
model's `config.json` holds how many ids it forgot (`hf_amnesia_forgotten`: {"count": n, ...}),
not the ids; a model saved with the old plain `hf_amnesia_forgotten_ids` list is still read and
converted on its next save. No store file is written through a symbolic link planted in its place.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re

import numpy as np
import pytest
from adversary import (
    _scratch,
    assert_model_equals_clean_forget,
    cli,
    copy_case,
    forget_argv,
    load,
    params,
    train_run,
    trainer_for,
)

from hf_amnesia.errors import AmnesiaError

REQUEST = [1, 4, 9, 13]


def _guesses(ids):
    """sha256 digests of the sorted ids in the obvious encodings."""
    ids = sorted(ids)
    texts = [json.dumps(ids), json.dumps(ids, separators=(",", ":")), ",".join(map(str, ids)), " ".join(map(str, ids))]
    texts.append("\n".join(map(str, ids)))
    encodings = [t.encode() for t in texts]
    encodings += [np.asarray(ids, dtype="<i8").tobytes(), np.asarray(ids, dtype=">i8").tobytes()]
    return {hashlib.sha256(e).hexdigest() for e in encodings}


def _record(case, capsys):
    assert cli(capsys, *forget_argv(case, *REQUEST)).code == 0
    (line,) = (case.store / "audit.jsonl").read_text().splitlines()
    return json.loads(line)


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_k9_audit_digest_is_keyed(tmp_path, capsys):
    """The review's case: `ids_sha256` was the plain sha256 of the ids' int64 bytes."""
    record = _record(copy_case(tmp_path), capsys)
    guesses = _guesses(REQUEST)
    hexes = [s.lower() for s in _strings(record) if re.fullmatch(r"[0-9a-fA-F]{16,}", s)]
    found = [s for s in hexes if any(g.startswith(s) for g in guesses)]  # a digest, whole or cut short
    assert found == [], found


@functools.cache
def _second_store():
    """The same training as the pristine run (same weights), so a different store and key."""
    return train_run(_scratch("second"))


def test_k9_audit_digest_changes_with_the_key(tmp_path, capsys):
    mine = _record(copy_case(tmp_path / "a"), capsys)
    theirs = _record(copy_case(tmp_path / "b", _second_store()), capsys)
    assert mine["model_before"] == theirs["model_before"]  # the same weights and request ...
    hexes = [k for k, v in mine.items() if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{32,}", v)]
    digests = [k for k in hexes if k not in ("request", "model_before", "model_after")]
    assert digests and all(mine[k] != theirs.get(k) for k in digests)  # ... but other keys


def test_k9_config_holds_no_forgotten_ids(tmp_path, capsys):
    case = copy_case(tmp_path)
    assert cli(capsys, *forget_argv(case, 3, 14)).code == 0
    config = json.loads((case.model / "config.json").read_text())
    assert "hf_amnesia_forgotten_ids" not in config
    assert config["hf_amnesia_forgotten"]["count"] == 2
    text = (case.model / "config.json").read_text()
    assert not re.search(r"\[\s*3\s*,\s*14\s*\]", text) and not re.search(r"\[\s*\"3\"\s*,\s*\"14\"\s*\]", text)


def _old_style(case, capsys):
    """The model after a committed forget of [3], its config written as 0.2.0 wrote it."""
    assert cli(capsys, *forget_argv(case, 3)).code == 0
    path = case.model / "config.json"
    config = json.loads(path.read_text())
    config.pop("hf_amnesia_forgotten", None)
    config["hf_amnesia_forgotten_ids"] = [3]
    path.write_text(json.dumps(config, indent=2))


def test_k9_old_forgotten_ids_list_still_read(tmp_path, capsys):
    case = copy_case(tmp_path)
    _old_style(case, capsys)
    model = load(case.model)
    weights = params(model)
    report = trainer_for(model, case.store, case.out).forget([3], scale=1.0, repair_steps=0)
    assert report.already_forgotten == [3] and report.forgotten == []
    assert max(float((weights[k] - v).abs().max()) for k, v in params(model).items()) == 0.0


def test_k9_old_forgotten_ids_list_converted_on_next_save(tmp_path, capsys):
    case = copy_case(tmp_path)
    _old_style(case, capsys)
    result = cli(capsys, *forget_argv(case, 3, 8))
    assert result.code == 0 and result.json()["already_forgotten"] == 1 and result.json()["forgotten"] == 1
    config = json.loads((case.model / "config.json").read_text())
    assert "hf_amnesia_forgotten_ids" not in config and config["hf_amnesia_forgotten"]["count"] == 2
    assert_model_equals_clean_forget(case.model, [3, 8])


LINKS = {
    "manifest_tmp": "manifest.json.tmp",
    "shard_state_tmp": "shard-00000.json.tmp",
    "journal_tmp": "forget-journal.json.tmp",
    "journal": "forget-journal.json",
    "audit_log": "audit.jsonl",
    "torn_aside": "audit.jsonl.torn",
}


@pytest.mark.parametrize("link", list(LINKS))
def test_k9_planted_symlink_not_followed(tmp_path, link):
    """A link planted where the forget writes a file: the file it points at stays as it was; the
    request is served or refused with an AmnesiaError (never a raw OSError)."""
    case = copy_case(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    name = LINKS[link]
    if name == "audit.jsonl.torn":
        (case.store / "audit.jsonl").write_bytes(b'{"request": "cut')  # a torn tail, moved aside on the next append
    (case.store / name).symlink_to(victim)
    try:
        trainer_for(load(case.model), case.store, case.out).forget([2], scale=1.0, repair_steps=0, save_to=case.model)
    except AmnesiaError:
        pass
    assert victim.read_bytes() == b"precious\n"
