"""The on-disk sparse store: per dataset id, the K kept entries of that sample's delta.

Layout of a store folder (no pickle anywhere; see docs/store-format.md):

    manifest.json                 format and library version, store_id, run_id, commits, key_check,
                                  parameter layout and fingerprint, keep_fraction, K, dtype, seed,
                                  decay factors, number of shards; a checksum over all of them
    shard-00000.json              the shard's current generation g, its row count, how much of its
                                  log is already folded into g, the purged ids, the sha256 of g's ids
                                  and sums files; a checksum over all of them (written atomically)
    shard-00000.gNNNNNN.ids.npy   int64 dataset ids of generation g's rows, sorted ascending
    shard-00000.gNNNNNN.rows      raw little-endian [n, K] values in the store dtype (memory-mapped)
    shard-00000.gNNNNNN.sums.npy  uint32 CRC-32 of each row, checked when a row is read
    shard-00000.log               while training: appended records (int64 id, K float32 values)
    shard-00000.recording         present while a run records into the shard
    forget-journal.json           a committed forget request being rolled forward
    audit.jsonl                   one record per completed forget request
    lineage.jsonl                 which model weights the store serves, which ids (keyed digests) each forgot
    store.key                     the store's secret key: the keyed digests of ids in the two files above
    .lock                         held by the one job working on the store (training, a forget, a recovery)

Folding the log in (`ShardWriter.compact`) writes a new generation and then switches
`shard-*.json` to it, so a crash leaves the old or the new state. The one change in place is a
purge (`purge_rows`, after a forget's commit point): the forgotten ids' rows are overwritten with
zeros and the ids recorded as purged in `shard-*.json`; readers skip them and the next compaction
leaves them out. Kept positions are a deterministic function of (seed, dataset id) and are never
stored.

Modules, one job each: `files` (every file name, durable writes), `positions` (which entries are
kept), `encoding` (values to bytes, row checksums), `checksums` (checksums of the metadata, files
loaded so that damage is a `StoreError`), `manifest`, `keys` (the store's key, keyed digests of
ids), `shards` (a shard's state and generations), `writer` (recording), `reader`, `purge`,
`journal` (the forget transaction), `audit` (the audit log), `lineage`, `migrate` (format
version 1 to 2: `hf_amnesia.store.migrate.migrate`). Nothing here imports `transformers`.
"""

from .encoding import STORE_DTYPES
from .files import LINEAGE, MANIFEST_NAME, STORE_KEY, folder_bytes, recording_marker
from .keys import create_key, id_digests, ids_digest, key_check, load_key
from .lineage import entries as lineage_entries
from .lineage import lookup as lineage_lookup
from .lineage import register as register_lineage
from .manifest import FORMAT_VERSION, Manifest
from .positions import (
    KEEP_LAYOUTS,
    kept_positions,
    manifest_positions,
    num_kept,
    positions_for,
    row_plan,
    row_positions,
    row_positions_torch,
)
from .purge import purge_rows
from .reader import StoreCheck, StoreReader
from .shards import ShardState
from .writer import ShardWriter

__all__ = [
    "FORMAT_VERSION",
    "KEEP_LAYOUTS",
    "LINEAGE",
    "MANIFEST_NAME",
    "STORE_DTYPES",
    "STORE_KEY",
    "Manifest",
    "ShardState",
    "ShardWriter",
    "StoreCheck",
    "StoreReader",
    "create_key",
    "folder_bytes",
    "id_digests",
    "ids_digest",
    "kept_positions",
    "key_check",
    "lineage_entries",
    "lineage_lookup",
    "load_key",
    "manifest_positions",
    "num_kept",
    "positions_for",
    "purge_rows",
    "recording_marker",
    "register_lineage",
    "row_plan",
    "row_positions",
    "row_positions_torch",
]
