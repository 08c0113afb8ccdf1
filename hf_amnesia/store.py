"""The on-disk sparse store: per dataset id, the K kept entries of that sample's delta.

Layout of a store folder (no pickle anywhere; see docs/store-format.md):

    manifest.json           format and library version, parameter layout and its fingerprint,
                            keep_fraction, K, dtype, seed, decay factors, shard list
    shard-00000.ids.npy     int64 dataset ids of the shard's rows, sorted ascending
    shard-00000.rows        raw little-endian [n, K] values in the store dtype (memory-mapped)
    shard-00000.log         while training: appended records (int64 id, K float32 values),
                            folded into the rows by `compact()` at the end of training

Kept positions are a deterministic function of (seed, dataset id) and are never stored.
One shard per training process; any number of processes can read a store.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import StoreError
from .layout import ParamLayout

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def num_kept(keep_fraction: float, num_params: int) -> int:
    """K = ceil(keep_fraction * M), at least 1 and at most M."""
    return min(num_params, max(1, math.ceil(keep_fraction * num_params - 1e-9)))


def kept_positions(seed: int, dataset_id: int, num_params: int, k: int) -> np.ndarray:
    """The K flat positions kept for one sample: sorted, distinct, fixed by (seed, dataset id)."""
    if k >= num_params:
        return np.arange(num_params, dtype=np.int64)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(dataset_id) & 0xFFFFFFFFFFFF, 0x414D])
    return np.sort(rng.choice(num_params, size=k, replace=False, shuffle=False)).astype(np.int64)


def positions_for(seed: int, ids: np.ndarray, num_params: int, k: int) -> np.ndarray:
    """[len(ids), K] kept positions of several ids."""
    out = np.empty((len(ids), k), dtype=np.int64)
    for row, dataset_id in enumerate(ids):
        out[row] = kept_positions(seed, int(dataset_id), num_params, k)
    return out


def _encode(values: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 values -> raw numpy array of the store dtype (bfloat16 kept as its bits)."""
    converted = values.detach().cpu().to(STORE_DTYPES[dtype])
    if dtype == "float32":
        return converted.numpy()
    return converted.view(torch.int16).numpy().view(np.uint16)


def _decode(raw: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "float32":
        return torch.from_numpy(np.array(raw, dtype=np.float32, copy=True))
    bits = torch.from_numpy(np.array(raw, copy=True).view(np.int16))
    return bits.view(STORE_DTYPES[dtype]).float()


def _raw_dtype(dtype: str) -> np.dtype:
    return np.dtype("<f4") if dtype == "float32" else np.dtype("<u2")


def _private_open(path: Path, flags: int) -> int:
    return os.open(path, flags, 0o600)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a small file so that readers see either the old or the new content."""
    tmp = path.with_name(path.name + ".tmp")
    fd = _private_open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = _private_open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Manifest:
    layout: ParamLayout
    keep_fraction: float
    dtype: str
    seed: int
    num_shards: int = 1
    decay: list[float] = field(default_factory=list)  # Q per tensor, in layout order
    format_version: int = FORMAT_VERSION
    library_version: str = __version__

    @property
    def num_params(self) -> int:
        return self.layout.num_params

    @property
    def k(self) -> int:
        return num_kept(self.keep_fraction, self.num_params)

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "library_version": self.library_version,
            "layout_fingerprint": self.layout.fingerprint(),
            "num_params": self.num_params,
            "keep_fraction": self.keep_fraction,
            "k": self.k,
            "dtype": self.dtype,
            "seed": self.seed,
            "num_shards": self.num_shards,
            "decay": list(self.decay),
            "layout": self.layout.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        if data.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"store format version {data.get('format_version')} is not readable by hf_amnesia "
                f"{__version__} (reads version {FORMAT_VERSION}); install the version that wrote it "
                f"({data.get('library_version')})."
            )
        layout = ParamLayout.from_json(data["layout"])
        if layout.fingerprint() != data["layout_fingerprint"]:
            raise StoreError("store manifest is damaged: its layout does not match its fingerprint.")
        return cls(
            layout=layout,
            keep_fraction=float(data["keep_fraction"]),
            dtype=data["dtype"],
            seed=int(data["seed"]),
            num_shards=int(data["num_shards"]),
            decay=[float(q) for q in data["decay"]],
            format_version=int(data["format_version"]),
            library_version=data["library_version"],
        )

    def save(self, store_dir: Path) -> None:
        write_atomic(store_dir / MANIFEST_NAME, json.dumps(self.to_json(), indent=1).encode())

    @classmethod
    def load(cls, store_dir: Path) -> Manifest | None:
        path = Path(store_dir) / MANIFEST_NAME
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StoreError(f"cannot read store manifest {path}: {err}") from err
        return cls.from_json(data)


def shard_paths(store_dir: Path, rank: int) -> tuple[Path, Path, Path]:
    stem = Path(store_dir) / f"shard-{rank:05d}"
    return stem.with_suffix(".ids.npy"), stem.with_suffix(".rows"), stem.with_suffix(".log")


def recording_marker(store_dir: Path, rank: int) -> Path:
    """Present while a training run records into this shard; removed when it finishes."""
    return Path(store_dir) / f"shard-{rank:05d}.recording"


class ShardWriter:
    """One training process's shard: appends closed deltas to a log and folds them into rows."""

    def __init__(self, store_dir: Path, rank: int, k: int, dtype: str):
        self.store_dir = Path(store_dir)
        self.rank, self.k, self.dtype = rank, k, dtype
        self.ids_path, self.rows_path, self.log_path = shard_paths(self.store_dir, rank)
        self.record = np.dtype([("id", "<i8"), ("values", "<f4", (k,))])
        fd = _private_open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self._log = os.fdopen(fd, "ab")
        self.marker = recording_marker(self.store_dir, rank)
        os.close(_private_open(self.marker, os.O_WRONLY | os.O_CREAT))

    def append(self, ids: np.ndarray, deltas: torch.Tensor) -> None:
        records = np.empty(len(ids), dtype=self.record)
        records["id"] = ids
        records["values"] = deltas.detach().cpu().float().numpy()
        self._log.write(records.tobytes())

    def log_size(self) -> int:
        """Bytes of the log made durable so far (a checkpoint stores this position)."""
        self._log.flush()
        os.fsync(self._log.fileno())
        return self.log_path.stat().st_size

    def truncate(self, size: int) -> None:
        """Drop records appended after a checkpoint, so they are not counted twice on resume."""
        self._log.flush()
        current = self.log_path.stat().st_size
        if size > current:
            raise StoreError(
                f"{self.log_path} holds {current} bytes but the checkpoint expects {size}: the "
                "store does not belong to this checkpoint's run. Point store_dir at that run's store."
            )
        os.truncate(self.log_path, size)

    def compact(self, chunk_bytes: int = 256 * 2**20) -> None:
        """Fold the log into the rows (sum per id, over epochs) and empty the log.

        The log is read in chunks of about `chunk_bytes`; the sum is held in float32 in memory
        (rows x K x 4 bytes for this shard).
        """
        self._log.flush()
        num_records = self.log_path.stat().st_size // self.record.itemsize
        per_chunk = max(1, chunk_bytes // self.record.itemsize)
        log_ids = [np.fromfile(self.log_path, dtype=self.record, count=min(per_chunk, num_records - start),
                               offset=start * self.record.itemsize)["id"] for start in range(0, num_records, per_chunk)]
        log_ids = np.concatenate(log_ids) if log_ids else np.zeros(0, np.int64)
        old_ids = np.load(self.ids_path, allow_pickle=False) if self.ids_path.exists() else None
        ids = np.unique(log_ids) if old_ids is None else np.union1d(old_ids, log_ids)
        acc = torch.zeros(len(ids), self.k, dtype=torch.float32)
        if old_ids is not None and len(old_ids):
            old = np.memmap(self.rows_path, dtype=_raw_dtype(self.dtype), mode="r")
            acc[torch.from_numpy(np.searchsorted(ids, old_ids))] = _decode(old.reshape(len(old_ids), self.k), self.dtype)
            del old
        for start in range(0, num_records, per_chunk):
            chunk = np.fromfile(self.log_path, dtype=self.record, count=min(per_chunk, num_records - start),
                                offset=start * self.record.itemsize)
            rows = torch.from_numpy(np.searchsorted(ids, chunk["id"]))
            acc.index_add_(0, rows, torch.from_numpy(np.ascontiguousarray(chunk["values"])))
        tmp_rows = self.rows_path.with_name(self.rows_path.name + ".tmp")
        fd = _private_open(tmp_rows, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "wb") as f:
            f.write(_encode(acc, self.dtype).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_rows, self.rows_path)
        save_npy(self.ids_path, ids.astype(np.int64))
        os.truncate(self.log_path, 0)
        self.marker.unlink(missing_ok=True)

    def close(self) -> None:
        self._log.close()


class StoreReader:
    """Read access to every shard of a store: which ids it holds, and their rows."""

    def __init__(self, store_dir: str | os.PathLike):
        self.store_dir = Path(store_dir)
        manifest = Manifest.load(self.store_dir)
        if manifest is None:
            raise StoreError(
                f"no hf_amnesia store at {self.store_dir} (missing {MANIFEST_NAME}). Point "
                "store_dir at the folder the training run wrote (by default <output_dir>/_amnesia_store)."
            )
        self.manifest = manifest
        self._ids, self._rows = [], []
        for rank in range(manifest.num_shards):
            ids_path, rows_path, _ = shard_paths(self.store_dir, rank)
            if not ids_path.exists() or not rows_path.exists():
                raise StoreError(
                    f"store shard {rank} is missing ({ids_path.name} / {rows_path.name}); the store "
                    f"at {self.store_dir} is incomplete. Restore the shard from a backup."
                )
            ids = np.load(ids_path, allow_pickle=False)
            expected = len(ids) * manifest.k * _raw_dtype(manifest.dtype).itemsize
            if rows_path.stat().st_size != expected:
                raise StoreError(
                    f"store shard {rows_path.name} holds {rows_path.stat().st_size} bytes, expected "
                    f"{expected}: it is truncated or damaged. Restore it from a backup."
                )
            self._ids.append(ids)
            self._rows.append(
                np.memmap(rows_path, dtype=_raw_dtype(manifest.dtype), mode="r", shape=(len(ids), manifest.k))
                if len(ids)
                else np.zeros((0, manifest.k), dtype=_raw_dtype(manifest.dtype))
            )

    def all_ids(self) -> np.ndarray:
        return np.unique(np.concatenate(self._ids)) if self._ids else np.zeros(0, np.int64)

    def locate(self, dataset_id: int) -> list[tuple[int, int]]:
        """(shard, row) pairs holding this id (one per process that trained on it)."""
        found = []
        for shard, ids in enumerate(self._ids):
            row = int(np.searchsorted(ids, dataset_id))
            if row < len(ids) and ids[row] == dataset_id:
                found.append((shard, row))
        return found

    def read(self, dataset_id: int) -> torch.Tensor | None:
        """The id's stored delta at its kept positions (float32, summed over shards), or None."""
        places = self.locate(dataset_id)
        if not places:
            return None
        total = torch.zeros(self.manifest.k, dtype=torch.float32)
        for shard, row in places:
            total += _decode(self._rows[shard][row], self.manifest.dtype)
        return total

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.store_dir.iterdir() if p.is_file())
