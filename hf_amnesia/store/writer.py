"""Recording into a shard: one training process appends closed deltas to the shard's log, and
folds the log into a new generation of rows at the end of the run (`ShardWriter.compact`).

A run marks its shard (`shard-RRRRR.recording`) from `begin` (or `resume`) until its rows are
committed; checkpoints store the log length and the generation, so `resume` can go back to them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import StoreError
from ..faults import crash_point
from .checksums import load_npy
from .encoding import decode, encode
from .files import generation_paths, log_path, open_private, recording_marker, write_atomic
from .shards import ShardState, file_sha256, read_generation, remove_other_generations, write_generation


class ShardWriter:
    """One training process's shard: appends closed deltas to a log and folds them into rows."""

    def __init__(self, store_dir: Path, rank: int, k: int, dtype: str):
        self.store_dir = Path(store_dir)
        self.rank, self.k, self.dtype = rank, k, dtype
        self.log_path = log_path(self.store_dir, rank)
        self.marker = recording_marker(self.store_dir, rank)
        self.record = np.dtype([("id", "<i8"), ("values", "<f4", (k,))])
        self.state = ShardState.load(self.store_dir, rank) or ShardState()
        fd = open_private(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self._log = os.fdopen(fd, "ab")
        # A crash between emptying the log and recording it leaves consumed > size: nothing is left.
        self.state.log_consumed = min(self.state.log_consumed, self.log_path.stat().st_size)

    def begin(self) -> None:
        """Start a new recording run: drop older generations and the folded log, set the marker."""
        remove_other_generations(self.store_dir, self.rank, self.state.generation)
        self._truncate_log(0)  # everything in it is folded into the current generation
        self.state.log_consumed = 0
        self.state.save(self.store_dir, self.rank)
        self._write_marker()

    def resume(self, log_size: int, generation: int, log_consumed: int) -> None:
        """Go back to a checkpoint: its generation, and its log length (later records dropped)."""
        current = self.log_path.stat().st_size
        ids_path, _, _ = generation_paths(self.store_dir, self.rank, generation)
        if log_size > current or (generation > 0 and not ids_path.exists() and generation != self.state.generation):
            raise StoreError(
                f"the store at {self.store_dir} no longer matches this checkpoint (log {current} bytes, checkpoint "
                f"expects {log_size}; generation {generation}): it was purged or belongs to another run. "
                "Resume from a later checkpoint or retrain."
            )
        state = ShardState(
            generation,
            log_consumed,
            self.state.rows,
            list(self.state.purged),
            self.state.ids_sha256,
            self.state.sums_sha256,
        )
        if generation != self.state.generation:
            # The checkpoint's generation, still on disk when its run's compaction committed the next one
            # and was interrupted before the marker was removed: its files' sha256 as they are now.
            state.rows, state.ids_sha256, state.sums_sha256 = 0, None, None
            if ids_path.exists():
                _, _, sums_path = generation_paths(self.store_dir, self.rank, generation)
                state.ids_sha256, state.sums_sha256 = file_sha256(ids_path), file_sha256(sums_path)
                state.rows = len(load_npy(ids_path, "<i8", state.ids_sha256, "store ids"))
        self._truncate_log(log_size)
        self.state = state
        self.state.save(self.store_dir, self.rank)
        self._write_marker()

    def _truncate_log(self, size: int) -> None:
        self._log.flush()
        os.ftruncate(self._log.fileno(), size)  # the open log itself: `os.truncate` would follow a link

    def _write_marker(self) -> None:
        write_atomic(self.marker, json.dumps({"generation": self.state.generation}).encode())

    def append(self, ids: np.ndarray, deltas: torch.Tensor) -> None:
        records = np.empty(len(ids), dtype=self.record)
        records["id"] = ids
        records["values"] = deltas.detach().cpu().float().numpy()
        try:
            self._log.write(memoryview(records.view(np.uint8)))  # the array's own bytes, no copy
        except OSError as err:
            raise StoreError(
                f"cannot append to {self.log_path}: {err}. Free disk space (or move store_dir) and resume "
                "training from the last checkpoint; records after it are rewritten."
            ) from err

    def log_size(self) -> int:
        """Bytes of the log made durable so far (a checkpoint stores this position)."""
        self._log.flush()
        os.fsync(self._log.fileno())
        return self.log_path.stat().st_size

    def compact(self, chunk_bytes: int = 256 * 2**20) -> None:
        """Fold the unfolded log into a new generation of rows (sum per id, over epochs).

        The log is read in chunks of about `chunk_bytes`; the sum is held in float32 in memory
        (rows x K x 4 bytes for this shard). The new generation becomes current in one atomic
        write of the shard state; until the run's marker is removed right after, a crash still
        allows resuming from a checkpoint of this run. Then the log and the previous generation
        are deleted: a finished run cannot be resumed.
        """
        size = self.log_size()
        start_record = self.state.log_consumed // self.record.itemsize
        num_records = size // self.record.itemsize - start_record
        per_chunk = max(1, chunk_bytes // self.record.itemsize)

        def chunks():
            for first in range(0, num_records, per_chunk):
                yield np.fromfile(
                    self.log_path,
                    dtype=self.record,
                    count=min(per_chunk, num_records - first),
                    offset=(start_record + first) * self.record.itemsize,
                )

        old_ids, old_rows, _ = read_generation(self.store_dir, self.rank, self.state, self.k, self.dtype)
        live = ~np.isin(old_ids, np.asarray(self.state.purged, dtype=np.int64))
        old_ids, old_rows = old_ids[live], np.asarray(old_rows)[live]
        log_ids = np.concatenate([c["id"] for c in chunks()] or [np.zeros(0, np.int64)])
        ids = np.union1d(old_ids, log_ids)
        acc = torch.zeros(len(ids), self.k, dtype=torch.float32)
        if len(old_ids):
            acc[torch.from_numpy(np.searchsorted(ids, old_ids))] = decode(np.asarray(old_rows), self.dtype)
        for chunk in chunks():
            rows = torch.from_numpy(np.searchsorted(ids, chunk["id"]))
            acc.index_add_(0, rows, torch.from_numpy(np.ascontiguousarray(chunk["values"])))
        # Purged ids stay listed (their rows are left out): the store remembers what it erased.
        new = ShardState(self.state.generation + 1, size, len(ids), purged=list(self.state.purged))
        new.ids_sha256, new.sums_sha256 = write_generation(
            self.store_dir, self.rank, new.generation, ids, encode(acc, self.dtype).reshape(len(ids), self.k)
        )
        crash_point("compact:generation_written")
        new.save(self.store_dir, self.rank)  # the commit point
        self.state = new
        crash_point("compact:committed")
        self.marker.unlink(missing_ok=True)
        self._truncate_log(0)
        self.state.log_consumed = 0
        self.state.save(self.store_dir, self.rank)
        remove_other_generations(self.store_dir, self.rank, new.generation)

    def close(self) -> None:
        self._log.close()
