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
from .files import generation_paths, log_path, open_private, recording_marker, truncate_private, write_fully
from .manifest import Manifest
from .shards import ShardState, read_ids


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
        _, rows_path, _ = generation_paths(store_dir, rank, state.generation)
        shard_ids = read_ids(store_dir, rank, state)  # checked against the state's sha256
        hit = np.flatnonzero(np.isin(shard_ids, ids))
        if len(hit):
            row_bytes = manifest.k * raw_dtype(manifest.dtype).itemsize
            fd = open_private(rows_path, os.O_RDWR)
            try:
                for row in hit:
                    os.lseek(fd, int(row) * row_bytes, os.SEEK_SET)
                    write_fully(fd, bytes(row_bytes))
                os.fsync(fd)
            finally:
                os.close(fd)
            state.purged = sorted(set(state.purged) | set(shard_ids[hit].tolist()))
        log = log_path(store_dir, rank)
        if log.exists() and not recording_marker(store_dir, rank).exists():
            truncate_private(log, 0)
            state.log_consumed = 0
        state.save(store_dir, rank)
