"""Reading a store: which ids it holds, and each id's stored row, checked against its checksum.

Every shard's current generation is memory-mapped; an id's rows in several shards (a sample
seen by several processes) are summed. Purged ids are not there for the reader.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import StoreError
from .encoding import decode, row_sum, row_sums
from .files import MANIFEST_NAME, shard_state_path
from .manifest import Manifest
from .shards import ShardState, read_generation


class StoreReader:
    """Read access to every shard of a store: which ids it holds, and their rows (checksummed)."""

    def __init__(self, store_dir: str | os.PathLike):
        self.store_dir = Path(store_dir)
        manifest = Manifest.load(self.store_dir)
        if manifest is None:
            raise StoreError(
                f"no hf_amnesia store at {self.store_dir} (missing {MANIFEST_NAME}). Point "
                "store_dir at the folder the training run wrote (by default <output_dir>/_amnesia_store)."
            )
        self.manifest = manifest
        self.states, self._ids, self._rows, self._sums, self._purged = [], [], [], [], []
        for rank in range(manifest.num_shards):
            state = ShardState.load(self.store_dir, rank)
            if state is None:
                raise StoreError(
                    f"store shard {rank} is missing ({shard_state_path(self.store_dir, rank).name}); the store at {self.store_dir} "
                    f"was written by {manifest.num_shards} processes and is incomplete. Restore the shard from a backup."
                )
            ids, rows, sums = read_generation(self.store_dir, rank, state, manifest.k, manifest.dtype)
            self.states.append(state)
            self._purged.append(set(state.purged))
            self._ids.append(ids)
            self._rows.append(rows)
            self._sums.append(sums)

    def _live(self, shard: int) -> np.ndarray:
        """Mask of the shard's rows that were not purged (purged rows are zeros on disk)."""
        return ~np.isin(self._ids[shard], np.asarray(self.states[shard].purged, dtype=np.int64))

    def all_ids(self) -> np.ndarray:
        live = [ids[self._live(shard)] for shard, ids in enumerate(self._ids)]
        return np.unique(np.concatenate(live)) if live else np.zeros(0, np.int64)

    def locate(self, dataset_id: int) -> list[tuple[int, int]]:
        """(shard, row) pairs holding this id (one per process that trained on it)."""
        found = []
        for shard, ids in enumerate(self._ids):
            row = int(np.searchsorted(ids, dataset_id))
            if row < len(ids) and ids[row] == dataset_id and dataset_id not in self._purged[shard]:
                found.append((shard, row))
        return found

    def read(self, dataset_id: int) -> torch.Tensor | None:
        """The id's stored delta at its kept positions (float32, summed over shards), or None.

        Each row's CRC-32 is checked; a mismatch raises `StoreError`.
        """
        places = self.locate(dataset_id)
        if not places:
            return None
        total = torch.zeros(self.manifest.k, dtype=torch.float32)
        for shard, row in places:
            raw = np.asarray(self._rows[shard][row])
            if row_sum(raw) != int(self._sums[shard][row]):
                raise StoreError(
                    f"the stored row of id {dataset_id} in shard {shard} fails its checksum: the store at "
                    f"{self.store_dir} is corrupted. Nothing was changed; restore the store from a backup."
                )
            total += decode(raw, self.manifest.dtype)
        return total

    def verify(self) -> int:
        """Check every row's checksum; returns the number of rows checked."""
        checked = 0
        for shard, (rows, sums) in enumerate(zip(self._rows, self._sums)):
            live = self._live(shard)
            if live.any() and not np.array_equal(row_sums(np.asarray(rows)[live]), sums[live]):
                raise StoreError(f"shard {shard} of {self.store_dir} has rows that fail their checksums.")
            checked += int(live.sum())
        return checked
