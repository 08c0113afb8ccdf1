"""A shard's committed state (`shard-RRRRR.json`) and its generations of rows on disk.

A generation is three files (sorted ids, raw rows, row checksums) written durably before the
shard's state points at it, with the sha256 of its ids and sums files; switching `shard-RRRRR.json`
to a new generation is the commit point of a compaction. The state carries its own checksum, and
every load checks both: a flipped bit in an id or a hand-edited `purged` list is a `StoreError`. The writer and the reader of a store build on these functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import StoreError
from .checksums import RESTORE, dump, fields, load_json, load_npy, read_file, sha256_bytes
from .encoding import raw_dtype, row_sums
from .files import (
    create_new,
    fsync_dir,
    generation_paths,
    generations_on_disk,
    save_npy,
    shard_state_path,
    write_atomic,
)


@dataclass
class ShardState:
    """The committed state of a shard: which generation holds its rows, how much log is folded,
    and the sha256 of that generation's ids and sums files (recorded when it was written)."""

    generation: int = 0
    log_consumed: int = 0
    rows: int = 0
    purged: list[int] = field(default_factory=list)  # ids whose rows were erased (zeroed, or left out)
    ids_sha256: str | None = None  # None: the generation has no files (an empty shard, generation 0)
    sums_sha256: str | None = None

    @classmethod
    def load(cls, store_dir: Path, rank: int) -> ShardState | None:
        """The shard's state, its checksum checked (None if the shard has no state file)."""
        path = shard_state_path(store_dir, rank)
        if not path.exists() and not path.is_symlink():
            return None
        data = load_json(path, f"the state of store shard {rank}")
        state = fields(path, f"the state of store shard {rank}", lambda: cls._fields(data))
        if state.generation < 0 or state.rows < 0 or state.log_consumed < 0:
            raise StoreError(f"the state of store shard {rank} ({path}) holds a negative count. {RESTORE}")
        return state

    @classmethod
    def _fields(cls, data: dict) -> ShardState:
        def integer(value) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{value!r} is not an integer")
            return value

        def digest(value) -> str | None:
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{value!r} is not a sha256")
            return value

        return cls(
            integer(data["generation"]),
            integer(data["log_consumed"]),
            integer(data["rows"]),
            [integer(i) for i in data["purged"]],
            digest(data["ids_sha256"]),
            digest(data["sums_sha256"]),
        )

    def save(self, store_dir: Path, rank: int) -> None:
        """Write `shard-RRRRR.json` atomically, with its checksum."""
        data = {
            "generation": self.generation,
            "log_consumed": self.log_consumed,
            "rows": self.rows,
            "purged": [int(i) for i in self.purged],
            "ids_sha256": self.ids_sha256,
            "sums_sha256": self.sums_sha256,
        }
        write_atomic(shard_state_path(store_dir, rank), dump(data))


def write_generation(store_dir: Path, rank: int, generation: int, ids: np.ndarray, raw: np.ndarray) -> tuple[str, str]:
    """Write one generation's ids, rows and checksums (durably; not yet the current one). Returns
    the sha256 of its ids and sums files, for the shard state that will point at it."""
    ids_path, rows_path, sums_path = generation_paths(store_dir, rank, generation)
    fd = create_new(rows_path)
    with os.fdopen(fd, "wb") as f:
        f.write(raw.tobytes())
        f.flush()
        os.fsync(f.fileno())
    save_npy(sums_path, row_sums(raw))
    save_npy(ids_path, ids.astype(np.int64))
    fsync_dir(Path(store_dir))
    return file_sha256(ids_path), file_sha256(sums_path)


def file_sha256(path: Path) -> str:
    """sha256 of a generation file's bytes, as its shard state records it."""
    return sha256_bytes(read_file(path, "store file"))


def read_ids(store_dir: Path, rank: int, state: ShardState) -> np.ndarray:
    """The sorted int64 ids of the shard's current generation, checked against the shard state's
    sha256 of the ids file (`StoreError` if damaged)."""
    ids_path, _, _ = generation_paths(store_dir, rank, state.generation)
    if state.ids_sha256 is None:
        if state.rows:
            raise StoreError(
                f"the state of store shard {rank} holds {state.rows} rows but no checksum of their ids. {RESTORE}"
            )
        return np.zeros(0, np.int64)
    ids = load_npy(ids_path, "<i8", state.ids_sha256, f"the ids of store shard {rank}")
    if len(ids) != state.rows or (len(ids) > 1 and not np.all(np.diff(ids) > 0)):
        raise StoreError(
            f"the ids of store shard {rank} ({ids_path}) are {len(ids)}, not sorted and distinct, or not the "
            f"{state.rows} its state records. {RESTORE}"
        )
    return ids


def read_generation(
    store_dir: Path, rank: int, state: ShardState, k: int, dtype: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, rows memmap [n, K], sums) of a shard's current generation, with checksum and size checks."""
    ids_path, rows_path, sums_path = generation_paths(store_dir, rank, state.generation)
    if state.ids_sha256 is None and state.rows == 0:
        empty = np.zeros((0, k), dtype=raw_dtype(dtype))
        return np.zeros(0, np.int64), empty, np.zeros(0, np.uint32)
    for path in (ids_path, rows_path, sums_path):
        if not path.exists():
            raise StoreError(
                f"store shard {rank} is missing {path.name}; the store at {store_dir} is incomplete. "
                "Restore the file from a backup."
            )
    ids = read_ids(store_dir, rank, state)
    sums = load_npy(sums_path, "<u4", state.sums_sha256, f"the row checksums of store shard {rank}")
    expected = len(ids) * k * raw_dtype(dtype).itemsize
    if rows_path.is_symlink() or rows_path.stat().st_size != expected or len(sums) != len(ids):
        raise StoreError(
            f"store shard {rows_path.name} holds {rows_path.lstat().st_size} bytes for {len(ids)} ids, expected "
            f"{expected} for {state.rows}: it is truncated or damaged. Restore it from a backup."
        )
    rows = (
        np.memmap(rows_path, dtype=raw_dtype(dtype), mode="r", shape=(len(ids), k))
        if len(ids)
        else np.zeros((0, k), dtype=raw_dtype(dtype))
    )
    return ids, rows, sums


def remove_generation(store_dir: Path, rank: int, generation: int) -> None:
    """Delete the files of one generation of a shard (those that exist)."""
    ids_path, rows_path, sums_path = generation_paths(store_dir, rank, generation)
    for path in (rows_path, ids_path, sums_path):
        path.unlink(missing_ok=True)


def remove_other_generations(store_dir: Path, rank: int, keep: int) -> None:
    """Delete a shard's generations other than `keep`."""
    for generation in generations_on_disk(store_dir, rank):
        if generation != keep:
            remove_generation(store_dir, rank, generation)


def remove_newer_generations(store_dir: Path, rank: int, current: int) -> None:
    """Delete a shard's generations after `current` (staged by a run that never committed them)."""
    for generation in generations_on_disk(store_dir, rank):
        if generation > current:
            remove_generation(store_dir, rank, generation)
