"""A shard's committed state (`shard-RRRRR.json`) and its generations of rows on disk.

A generation is three files (sorted ids, raw rows, row checksums) written durably before the
shard's state points at it; switching `shard-RRRRR.json` to a new generation is the commit
point of a compaction. The writer and the reader of a store build on these functions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import StoreError
from .encoding import raw_dtype, row_sums
from .files import (
    fsync_dir,
    generation_paths,
    generations_on_disk,
    open_private,
    save_npy,
    shard_state_path,
    write_atomic,
)


@dataclass
class ShardState:
    """The committed state of a shard: which generation holds its rows, how much log is folded."""

    generation: int = 0
    log_consumed: int = 0
    rows: int = 0
    purged: list[int] = field(default_factory=list)  # ids whose rows were erased (zeroed in place)

    @classmethod
    def load(cls, store_dir: Path, rank: int) -> ShardState | None:
        path = shard_state_path(store_dir, rank)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            purged = [int(i) for i in data.get("purged", [])]
            return cls(int(data["generation"]), int(data["log_consumed"]), int(data["rows"]), purged)
        except (OSError, ValueError, KeyError) as err:
            raise StoreError(f"{path} is damaged ({err}); restore it from a backup.") from err

    def save(self, store_dir: Path, rank: int) -> None:
        data = {
            "generation": self.generation,
            "log_consumed": self.log_consumed,
            "rows": self.rows,
            "purged": self.purged,
        }
        write_atomic(shard_state_path(store_dir, rank), json.dumps(data).encode())


def write_generation(store_dir: Path, rank: int, generation: int, ids: np.ndarray, raw: np.ndarray) -> None:
    """Write one generation's ids, rows and checksums (durably; not yet the current one)."""
    ids_path, rows_path, sums_path = generation_paths(store_dir, rank, generation)
    fd = open_private(rows_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as f:
        f.write(raw.tobytes())
        f.flush()
        os.fsync(f.fileno())
    save_npy(sums_path, row_sums(raw))
    save_npy(ids_path, ids.astype(np.int64))
    fsync_dir(Path(store_dir))


def read_generation(
    store_dir: Path, rank: int, state: ShardState, k: int, dtype: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, rows memmap [n, K], sums) of a shard's current generation, with size checks."""
    ids_path, rows_path, sums_path = generation_paths(store_dir, rank, state.generation)
    if state.rows == 0 and not ids_path.exists():
        empty = np.zeros((0, k), dtype=raw_dtype(dtype))
        return np.zeros(0, np.int64), empty, np.zeros(0, np.uint32)
    for path in (ids_path, rows_path, sums_path):
        if not path.exists():
            raise StoreError(
                f"store shard {rank} is missing {path.name}; the store at {store_dir} is incomplete. "
                "Restore the file from a backup."
            )
    ids = np.load(ids_path, allow_pickle=False)
    sums = np.load(sums_path, allow_pickle=False)
    expected = len(ids) * k * raw_dtype(dtype).itemsize
    if rows_path.stat().st_size != expected or len(ids) != state.rows or len(sums) != len(ids):
        raise StoreError(
            f"store shard {rows_path.name} holds {rows_path.stat().st_size} bytes for {len(ids)} ids, expected "
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
