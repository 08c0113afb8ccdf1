"""Migrating a store of format version 1 to version 2, in place (`hf-amnesia migrate STORE`).

Version 2 adds a checksum to every file the forget path reads, the store's key, and the manifest
fields `store_id`, `run_id`, `commits` and `key_check` (docs/store-format.md). `migrate` runs under
the store's lock and rewrites each file atomically, the manifest last: until it is written the store
is still version 1 (refused by this version, with the advice to migrate), and migrating again picks
up where a crash stopped, since every step is idempotent:

1. the key: made if missing (or replaced if an interrupted migration left it short: no manifest
   refers to it yet);
2. each shard's state: the sha256 of its current ids and sums files added, after every live row
   was checked against its CRC-32 (version 1 did not cover the ids, so this is the last chance to
   catch damage there: a row that fails is refused, and nothing of that shard is rewritten);
3. the forget journal, if a request is pending: its checksum and `commits_after` added;
4. the audit log: a checksum added to each record (damaged lines and an unfinished last line are
   kept as they are; `hf-amnesia audit` names them);
5. the lineage: the manifest's `final_weights`, if set, registered as having forgotten every id
   purged in the shards (the version-1 store's last model is the one that forgot them);
6. the manifest, version 2, with its checksum, a new `store_id`, `commits` = the audit records.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np

from ..errors import StoreError
from ..layout import ParamLayout
from ..version import __version__
from .checksums import CHECKSUM, RESTORE, checksum_matches, dump, fields, parse_json, read_file, with_checksum
from .encoding import row_sums
from .files import AUDIT, JOURNAL, MANIFEST_NAME, generation_paths, shard_state_path, write_atomic
from .journal import store_lock
from .keys import KEY_BYTES, create_key, id_digests, key_check, key_path, read_key
from .lineage import register
from .manifest import FORMAT_VERSION, Manifest
from .reader import StoreReader
from .shards import ShardState, file_sha256, read_generation

OLD_VERSION = 1


def migrate(store_dir: str | os.PathLike) -> bool:
    """Migrate the store at `store_dir` from format version 1 to 2 in place. Returns False if it is
    already version 2 (and checks it loads), True once migrated. Damage is a `StoreError`."""
    store_dir = Path(store_dir)
    with store_lock(store_dir, purpose="migration"):
        path = store_dir / MANIFEST_NAME
        data = parse_json(read_file(path, "the store manifest"), path, "the store manifest")
        if data.get("format_version") == FORMAT_VERSION:
            StoreReader(store_dir)  # checks it: a damaged version-2 store is not migrated over
            return False
        if data.get("format_version") != OLD_VERSION or CHECKSUM in data:
            raise StoreError(
                f"{path} is not a store manifest of format version {OLD_VERSION} (format_version "
                f"{data.get('format_version')!r}): nothing to migrate. {RESTORE}"
            )
        manifest = fields(path, "the version-1 store manifest", lambda: _old_manifest(data))
        key = read_key(store_dir)
        if key is None or len(key) != KEY_BYTES:
            key_path(store_dir).unlink(missing_ok=True)  # left short by an interrupted migration
            key = create_key(store_dir)
        purged = set()
        for rank in range(manifest.num_shards):
            purged |= set(_migrate_shard(store_dir, rank, manifest).purged)
        requests = _migrate_audit(store_dir)
        _migrate_journal(store_dir, requests)
        if manifest.final_weights is not None:
            register(store_dir, manifest.final_weights, id_digests(key, sorted(purged)))
        manifest.store_id = uuid.uuid4().hex
        manifest.key_check = key_check(key)
        manifest.commits = len(requests)
        manifest.save(store_dir)  # the store is version 2 from here on
    StoreReader(store_dir).check_all()
    return True


def _old_manifest(data: dict) -> Manifest:
    """A version-1 manifest's fields, as a version-2 `Manifest` (not yet saved)."""
    layout = ParamLayout.from_json(data["layout"])
    if layout.fingerprint() != data["layout_fingerprint"]:
        raise ValueError("the layout does not match its fingerprint")
    return Manifest(
        layout=layout,
        keep_fraction=float(data["keep_fraction"]),
        dtype=str(data["dtype"]),
        seed=int(data["seed"]),
        num_shards=int(data["num_shards"]),
        decay=[float(q) for q in data["decay"]],
        keep_layout=str(data.get("keep_layout", "entries")),
        final_weights=data.get("final_weights"),
        format_version=FORMAT_VERSION,
        library_version=__version__,
    )


def _migrate_shard(store_dir: Path, rank: int, manifest: Manifest) -> ShardState:
    """Rewrite one shard's state in version 2 (kept if it already is); returns the state."""
    path = shard_state_path(store_dir, rank)
    if not path.exists():
        raise StoreError(
            f"store shard {rank} is missing ({path.name}); the store at {store_dir} was written by "
            f"{manifest.num_shards} processes and is incomplete. Restore the shard from a backup, then migrate."
        )
    data = parse_json(read_file(path, f"the state of store shard {rank}"), path, f"the state of store shard {rank}")
    if checksum_matches(data):  # rewritten by an interrupted migration
        return ShardState.load(store_dir, rank)
    state = fields(
        path,
        f"the version-1 state of store shard {rank}",
        lambda: ShardState(
            int(data["generation"]),
            int(data["log_consumed"]),
            int(data["rows"]),
            [int(i) for i in data.get("purged", [])],
        ),
    )
    ids_path, rows_path, sums_path = generation_paths(store_dir, rank, state.generation)
    if ids_path.exists() or state.rows:
        for file in (ids_path, rows_path, sums_path):
            if not file.exists():
                raise StoreError(f"store shard {rank} is missing {file.name}. {RESTORE}")
        state.ids_sha256, state.sums_sha256 = file_sha256(ids_path), file_sha256(sums_path)
        _check_rows(store_dir, rank, state, manifest)
    state.save(store_dir, rank)
    return state


def _check_rows(store_dir: Path, rank: int, state: ShardState, manifest: Manifest) -> None:
    """Every live row of the shard's generation against its CRC-32, before its files are blessed."""
    ids, rows, sums = read_generation(store_dir, rank, state, manifest.k, manifest.dtype)
    live = ~np.isin(ids, np.asarray(state.purged, dtype=np.int64))
    if live.any() and not np.array_equal(row_sums(np.asarray(rows)[live]), sums[live]):
        raise StoreError(
            f"store shard {rank} of {store_dir} has rows that fail their checksums; it was not migrated. {RESTORE}"
        )


def _migrate_audit(store_dir: Path) -> list[str]:
    """Add a checksum to each audit record that lacks one; returns the request ids of the records."""
    path = store_dir / AUDIT
    if not path.exists():
        return []
    data = read_file(path, "the audit log")
    cut = data.rfind(b"\n") + 1
    lines, torn = data[:cut].split(b"\n")[:-1], data[cut:]
    out, requests = [], []
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("request"), str):
            if "ids_sha256" in record:  # version 1's unkeyed digest: trying candidate ids reverses it
                record = {k: v for k, v in record.items() if k not in ("ids_sha256", "checksum")}
            if not checksum_matches(record):
                record = with_checksum(record)
                line = json.dumps(record, sort_keys=True).encode()
            requests.append(record["request"])
        out.append(line)  # a damaged line stays as it is, and still counts as damaged
    migrated = b"".join(line + b"\n" for line in out) + torn
    if migrated != data:
        write_atomic(path, migrated)
    return requests


def _migrate_journal(store_dir: Path, requests: list[str]) -> None:
    """Add `commits_after` and a checksum to a pending version-1 journal."""
    path = store_dir / JOURNAL
    if not path.exists():
        return
    entry = parse_json(read_file(path, "the forget journal"), path, "the forget journal")
    if checksum_matches(entry):
        return
    entry.setdefault("lineage", None)
    entry["commits_after"] = len(requests) + (entry.get("request") not in requests)
    write_atomic(path, dump(entry))
