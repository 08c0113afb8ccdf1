"""Committing a forget: one transaction over the saved model, its forgotten-id record and the store.

A committed forget request (`forget(..., save_to=DIR)`) runs under the store's lock:

1. stage: the new model is saved to `DIR.amnesia-staging`;
2. commit: `forget-journal.json` is written atomically with `"state": "committed"` and its
   checksum (a journal that fails it is refused, never rolled forward). Before this
   point nothing visible has changed; a crash leaves the saved model and the store as before
   (the next request removes the staged model);
3. roll forward (idempotent, completed by `recover()` after a crash): the staged model replaces
   DIR, the forgotten ids' rows are overwritten with zeros in place and recorded as purged in
   each shard's state, the manifest's `final_weights` and `commits` set, the saved model's lineage
   registered (`lineage.jsonl`), the audit record appended, the journal removed.

The lock (`store_lock`, on `.lock`) admits one job at a time on a store: a training run (from the
start of recording to the end of `train()`), a committed forget request or a recovery; the others
wait, and say whom they wait for.

The audit log is `audit.py`'s (`audit_record`, `append_audit`, `read_audit`, re-exported here).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import StoreError
from .audit import append_audit, audit_record, read_audit
from .checksums import CHECKSUM, dump, fields, load_json
from .files import (
    AUDIT,
    JOURNAL,
    LOCK,
    REPLACED_SUFFIX,
    STAGING_SUFFIX,
    open_private,
    read_private,
    recording_marker,
    replaced_dir,
    staging_dir,
    write_atomic,
    write_fully,
)
from .keys import ids_digest, load_key
from .lineage import entries as lineage_entries
from .lineage import register
from .manifest import Manifest
from .purge import purge_rows
from .shards import ShardState, remove_newer_generations

logger = logging.getLogger(__name__)

__all__ = [
    "AUDIT",
    "JOURNAL",
    "LOCK",
    "REPLACED_SUFFIX",
    "STAGING_SUFFIX",
    "append_audit",
    "audit_record",
    "commit",
    "ids_digest",
    "load_journal",
    "load_key",
    "prepare",
    "read_audit",
    "recover",
    "roll_back",
    "roll_forward",
    "staging_dir",
    "store_lock",
    "weights_fingerprint",
]


_held = threading.local()  # `locks`: the lock files this thread holds, and for what


@contextmanager
def store_lock(store_dir: str | os.PathLike, purpose: str = "forget request"):
    """Exclusive lock on a store: one job at a time (a training run, a forget request, a recovery).

    A job that finds the store locked logs a warning naming the holder (its pid, `purpose` and
    start time, which each holder writes into the lock file) and waits for it. The lock is not
    re-entrant: a thread that holds it and asks again gets `StoreError` instead of waiting for
    itself (flock through a second descriptor would), e.g. a forget started inside `train()`.
    """
    path = Path(store_dir) / LOCK
    key = str(path.resolve())
    held = vars(_held).setdefault("locks", {})
    if key in held:
        raise StoreError(
            f"this thread already holds the lock on the store at {store_dir} for a {held[key]}; a "
            f"{purpose} on that store cannot run until it ends. Run it after (e.g. after train() returns)."
        )
    fd = open_private(path, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning(
                "hf_amnesia: the store at %s is locked by %s; this %s waits until it ends (one job at a "
                "time on a store).",
                store_dir,
                _lock_holder(path),
                purpose,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        holder = {"pid": os.getpid(), "purpose": purpose, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        # Written into the locked file itself: replacing it would make a new file, with a lock of its own.
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        write_fully(fd, json.dumps(holder).encode())
        held[key] = purpose
        try:
            yield
        finally:
            del held[key]
            os.ftruncate(fd, 0)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _lock_holder(path: Path) -> str:
    """Who holds the lock at `path`, as its holder wrote it."""
    try:
        holder = json.loads(read_private(path))
        return f"a {holder['purpose']} (pid {holder['pid']}, since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written itself in yet
        return "another job"


def weights_fingerprint(params: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def prepare(
    save_to: Path,
    purged_ids: np.ndarray | None,
    audit: dict,
    lineage: dict | None = None,
    *,
    commits_after: int | None = None,
) -> dict:
    """The journal entry of a staged request (written by `commit`); `purged_ids` None: no purge.

    `lineage`, if given, is `{"weights": <fingerprint of the saved model>, "forgotten": [id digests]}`
    (`keys.id_digests` of every id that model has forgotten), registered in `lineage.jsonl` by the
    roll forward. `commits_after` is the manifest's `commits` once the request is rolled forward:
    left None, `commit` sets it to the manifest's `commits` + 1, under the store's lock.
    """
    if lineage is not None:
        lineage = {"weights": str(lineage["weights"]), "forgotten": sorted({str(d) for d in lineage["forgotten"]})}
    return {
        "state": "committed",
        "request": audit["request"],
        "save_to": str(Path(save_to).resolve()),
        "purged_ids": None if purged_ids is None else [int(i) for i in purged_ids],
        "audit": audit,
        "lineage": lineage,
        "commits_after": commits_after,
    }


def commit(store_dir: Path, entry: dict) -> None:
    """The commit point: after this write, `recover` completes the request.

    First, what the roll forward will read is checked (the manifest, the lineage file; the audit
    log is `check_audit`'s), so that nothing in it can fail on damage after the commit point. Sets
    `entry["commits_after"]` (the manifest's `commits` + 1, what the roll forward makes it) unless
    the caller did; the journal is written with its checksum.
    """
    manifest = Manifest.load(Path(store_dir))
    if manifest is None:
        raise StoreError(f"no hf_amnesia store at {store_dir} (no manifest): nothing to commit the request to.")
    lineage_entries(store_dir)
    if entry.get("commits_after") is None:
        entry["commits_after"] = manifest.commits + 1
    write_atomic(Path(store_dir) / JOURNAL, dump(entry))


def load_journal(store_dir: str | os.PathLike) -> dict | None:
    """The journal of a committed request, its checksum checked (None if there is none)."""
    path = Path(store_dir) / JOURNAL
    if not path.exists() and not path.is_symlink():
        return None
    entry = load_json(path, "the forget journal")
    what = "the forget journal"

    def check() -> dict:
        if entry["state"] != "committed" or not isinstance(entry["request"], str):
            raise ValueError(f"state {entry['state']!r}")
        if not isinstance(entry["save_to"], str) or not isinstance(entry["audit"], dict):
            raise TypeError("save_to or audit")
        if entry["purged_ids"] is not None and not all(type(i) is int for i in entry["purged_ids"]):
            raise TypeError("purged_ids")
        lineage = entry.get("lineage")
        if lineage is not None and not (isinstance(lineage["weights"], str) and isinstance(lineage["forgotten"], list)):
            raise TypeError("lineage")
        if type(entry["commits_after"]) is not int:
            raise TypeError("commits_after")
        return {k: v for k, v in entry.items() if k != CHECKSUM}

    return fields(path, what, check)


def roll_forward(store_dir: Path, entry: dict, crash_at=None) -> None:
    """Complete a committed request (safe to repeat)."""
    target = Path(entry["save_to"])
    staged_model = staging_dir(target)
    replaced = replaced_dir(target)
    if staged_model.exists():
        if target.exists():
            if replaced.exists():
                shutil.rmtree(replaced)
            os.replace(target, replaced)
        if crash_at:
            crash_at("swap")
        os.replace(staged_model, target)
    if replaced.exists():
        shutil.rmtree(replaced)
    if entry["purged_ids"] is not None:
        purge_rows(Path(store_dir), Manifest.load(Path(store_dir)), np.asarray(entry["purged_ids"], dtype=np.int64))
    if crash_at:
        crash_at("purge")
    if entry.get("lineage") is not None:
        register(store_dir, entry["lineage"]["weights"], entry["lineage"]["forgotten"])
    # The saved model is now the store's model: training it further may record into the store.
    manifest = Manifest.load(Path(store_dir))
    commits = entry.get("commits_after", manifest.commits if manifest is not None else 0)
    audit = entry["audit"]
    # Only a forget from the weights the store may train further moves them (not one from a sibling).
    final = audit["model_after"] if manifest is not None and manifest.final_weights == audit["model_before"] else None
    if manifest is not None and (final or manifest.final_weights, commits) != (
        manifest.final_weights,
        manifest.commits,
    ):
        manifest.final_weights = final or manifest.final_weights
        manifest.commits = commits  # set, not incremented: a repeated roll forward changes nothing
        manifest.save(Path(store_dir))
    append_audit(store_dir, entry["audit"])
    (Path(store_dir) / JOURNAL).unlink(missing_ok=True)


def roll_back(save_to: Path) -> None:
    """Discard a request that did not reach its commit point (its staged model)."""
    staged_model = staging_dir(save_to)
    if staged_model.exists():
        shutil.rmtree(staged_model)


def recover(store_dir: str | os.PathLike) -> bool:
    """Finish or undo a forget request a crash interrupted. Returns True if one was completed.

    A committed request (journal present) is rolled forward. Staged generations that no journal
    points to (a crash before the commit point) are removed.
    """
    store_dir = Path(store_dir)
    manifest = Manifest.load(store_dir)  # first: a version-1 store is refused with the way to migrate it
    entry = load_journal(store_dir)
    if entry is not None:
        roll_forward(store_dir, entry)
        return True
    if manifest is not None:
        for rank in range(manifest.num_shards):
            state = ShardState.load(store_dir, rank)
            if state is not None and not recording_marker(store_dir, rank).exists():
                remove_newer_generations(store_dir, rank, state.generation)
    return False
