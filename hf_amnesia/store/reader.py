"""Reading a store: which ids it holds, and each id's stored row, checked against its checksum.

Opening a store checks its metadata: the manifest's checksum, each shard state's, the sha256 of
each shard's ids and sums files, the key against the manifest's check value and the lineage file's
lines; any damage is a `StoreError` before anything is read. Every shard's current generation is
memory-mapped; an id's rows in several shards (a sample seen by several processes) are summed,
each row checked against its CRC-32 when read. Purged ids are not there for the reader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import StoreError
from .audit import check_audit
from .encoding import decode, row_sum, row_sums
from .files import MANIFEST_NAME, shard_state_path
from .journal import load_journal
from .keys import check_key
from .lineage import entries as lineage_entries
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
        # The key (made with the store) and the lineage file are read by a committed forget: damage
        # to either is refused here, before anything is subtracted.
        self.key = check_key(self.store_dir, manifest.key_check) if manifest.key_check is not None else None
        lineage_entries(self.store_dir)

    def _live(self, shard: int) -> np.ndarray:
        """Mask of the shard's rows that were not purged (purged rows are zeros on disk)."""
        return ~np.isin(self._ids[shard], np.asarray(self.states[shard].purged, dtype=np.int64))

    def all_ids(self) -> np.ndarray:
        live = [ids[self._live(shard)] for shard, ids in enumerate(self._ids)]
        return np.unique(np.concatenate(live)) if live else np.zeros(0, np.int64)

    def recorded_count(self) -> int:
        """How many distinct ids the training recorded: those held, and those purged since."""
        held = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64)
        purged = np.asarray(sorted(set().union(*self._purged)), dtype=np.int64)
        return len(np.union1d(held, purged))

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
        """Check everything `check_all` checks; returns the number of rows checked."""
        return self.check_all().rows

    def check_all(self) -> StoreCheck:
        """Check every file of the store: the manifest, each shard's state and its ids and sums files
        (done when the reader opened the store), every live row's checksum, the key, the journal if
        there is one, every audit record and every lineage entry. The first damage found raises
        `StoreError`; otherwise returns what was checked."""
        checked = StoreCheck(shards=len(self._rows), key=self.key is not None)
        for shard, (rows, sums) in enumerate(zip(self._rows, self._sums)):
            live = self._live(shard)
            if live.any() and not np.array_equal(row_sums(np.asarray(rows)[live]), sums[live]):
                bad = np.flatnonzero(row_sums(np.asarray(rows)[live]) != sums[live])
                raise StoreError(
                    f"shard {shard} of {self.store_dir} has {len(bad)} rows that fail their checksums (ids "
                    f"{self._ids[shard][live][bad[:5]].tolist()}...). Restore the store from a backup."
                )
            checked.rows += int(live.sum())
        checked.ids = len(self.all_ids())
        checked.journal = load_journal(self.store_dir) is not None
        audit = check_audit(self.store_dir)
        checked.audit_records, checked.audit_torn = len(audit.records), bool(audit.torn)
        checked.lineage_entries = len(lineage_entries(self.store_dir))
        return checked


@dataclass
class StoreCheck:
    """What `StoreReader.check_all` checked, all of it found intact."""

    shards: int = 0
    rows: int = 0
    ids: int = 0
    key: bool = False
    journal: bool = False
    audit_records: int = 0
    audit_torn: bool = False
    lineage_entries: int = 0

    def summary(self) -> str:
        parts = [
            "manifest",
            f"{self.shards} shard state(s) with their ids and sums files",
            f"{self.rows} rows ({self.ids} ids)",
            "the key" if self.key else "no key (the manifest records none)",
            "the forget journal (a request to recover)" if self.journal else "no forget journal",
            f"{self.audit_records} audit record(s)" + (" (and an unfinished last line)" if self.audit_torn else ""),
            f"{self.lineage_entries} lineage entr{'y' if self.lineage_entries == 1 else 'ies'}",
        ]
        return "checked " + ", ".join(parts) + ": all checksums match"
