"""Purging forgotten ids from a store: the one change made to rows in place.

Part of a committed forget's roll forward (`journal.roll_forward`): the ids' rows are overwritten
with zeros in every shard and the ids recorded as purged in the shard's state, so readers skip
them and the next compaction leaves them out. Their checksums are left as they were.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .encoding import raw_dtype
from .files import generation_paths, log_path, recording_marker
from .manifest import Manifest
from .shards import ShardState


def purge_rows(store_dir: Path, manifest: Manifest, ids: np.ndarray) -> None:
    """Erase the rows of `ids` from every shard: overwrite them with zeros in place and record the
    ids as purged (idempotent; part of a committed forget's roll forward).

    The log, fully folded since no run is recording, is emptied too: it still holds the rows'
    per-epoch records.
    """
    ids = np.asarray(ids, dtype=np.int64)
    for rank in range(manifest.num_shards):
        state = ShardState.load(store_dir, rank)
        if state is None:
            continue
        ids_path, rows_path, _ = generation_paths(store_dir, rank, state.generation)
        if ids_path.exists() and rows_path.stat().st_size:
            shard_ids = np.load(ids_path, allow_pickle=False)
            hit = np.flatnonzero(np.isin(shard_ids, ids))
            row_bytes = manifest.k * raw_dtype(manifest.dtype).itemsize
            with open(rows_path, "r+b") as f:
                for row in hit:
                    f.seek(int(row) * row_bytes)
                    f.write(bytes(row_bytes))
                f.flush()
                os.fsync(f.fileno())
            state.purged = sorted(set(state.purged) | set(shard_ids[hit].tolist()))
        log = log_path(store_dir, rank)
        if log.exists() and not recording_marker(store_dir, rank).exists():
            os.truncate(log, 0)
            state.log_consumed = 0
        state.save(store_dir, rank)
