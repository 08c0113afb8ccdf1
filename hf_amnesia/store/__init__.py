"""The on-disk sparse store: per dataset id, the K kept entries of that sample's delta.

Layout of a store folder (no pickle anywhere; see docs/store-format.md):

    manifest.json                 format and library version, parameter layout and fingerprint,
                                  keep_fraction, K, dtype, seed, decay factors, number of shards
    shard-00000.json              the shard's current generation g and how much of its log is
                                  already folded into that generation (written atomically)
    shard-00000.gNNNNNN.ids.npy   int64 dataset ids of generation g's rows, sorted ascending
    shard-00000.gNNNNNN.rows      raw little-endian [n, K] values in the store dtype (memory-mapped)
    shard-00000.gNNNNNN.sums.npy  uint32 CRC-32 of each row, checked when a row is read
    shard-00000.log               while training: appended records (int64 id, K float32 values)
    shard-00000.recording         present while a run records into the shard

Rows never change in place: folding the log in (`compact`) or purging forgotten ids writes a new
generation and then switches `shard-*.json` to it, so a crash leaves the old or the new state.
Kept positions are a deterministic function of (seed, dataset id) and are never stored.
"""

from __future__ import annotations

import functools
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import StoreError
from ..faults import crash_point
from ..layout import ParamLayout
from ..version import __version__

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


KEEP_LAYOUTS = ("entries", "rows")


def num_kept(keep_fraction: float, num_params: int) -> int:
    """K = ceil(keep_fraction * M), at least 1 and at most M (the `entries` layout)."""
    return min(num_params, max(1, math.ceil(keep_fraction * num_params - 1e-9)))


def row_plan(keep_fraction: float, shapes) -> list[tuple[int, int, int]]:
    """(rows, columns, kept rows) of each tensor in the `rows` layout.

    A tensor's rows are its slices along dimension 0 (a weight's output units; a 1-D tensor's
    entries). Each sample keeps round(keep_fraction * rows) of them, at least one, whole.
    """
    plan = []
    for shape in shapes:
        numel = math.prod(shape)
        rows = int(shape[0]) if len(shape) else 1
        plan.append((rows, numel // rows, min(rows, max(1, round(keep_fraction * rows)))))
    return plan


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread uint64 from any uint64."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_positions(
    seed: int, ids: np.ndarray, shapes, keep_fraction: float, dtype=np.int64, out: np.ndarray | None = None
) -> np.ndarray:
    """[len(ids), K] kept positions in the `rows` layout: whole rows, fixed by (seed, dataset id).

    Each tensor keeps the rows with the smallest hash of (seed, id, tensor, row): one
    vectorised pass over the batch and every tensor's rows, no per-sample generator. `dtype`
    may be np.int32 when the model has fewer than 2**31 trainable entries. `out`, if given, is a
    C-contiguous [len(ids), K] integer array that receives the positions (its dtype is used).
    """
    ids = np.asarray(ids, dtype=np.uint64)
    plan, row_salts = _row_salts(tuple(tuple(int(d) for d in shape) for shape in shapes), float(keep_fraction))
    if out is None:
        out = np.empty((len(ids), sum(r * c for _, c, r in plan)), dtype=dtype)
    dtype = out.dtype
    base = _mix(_mix(ids ^ np.uint64(((int(seed) & 0xFFFFFFFF) * 0x9E3779B97F4A7C15) & (2**64 - 1))))
    keys = _mix(base[:, None] ^ row_salts[None, :])  # [n, all rows]: every tensor's row hashes at once
    column = offset = first = 0
    for rows, cols, kept in plan:
        own = keys[:, first : first + rows]
        first += rows
        if kept == rows:
            chosen = np.broadcast_to(np.arange(rows), (len(ids), rows))
        elif kept == 1:
            chosen = own.argmin(axis=1)[:, None]
        else:
            chosen = np.sort(np.argpartition(own, kept - 1, axis=1)[:, :kept], axis=1)
        block = out[:, column : column + kept * cols].reshape(len(ids), kept, cols)  # a view: written in place
        np.add((offset + chosen * cols).astype(dtype)[:, :, None], np.arange(cols, dtype=dtype), out=block)
        column += kept * cols
        offset += rows * cols
    return out


def _bits(value) -> int:
    """A uint64's bits as a (two's complement) int64."""
    value = int(value) & (2**64 - 1)
    return value - 2**64 if value >= 2**63 else value


def _shr(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 tensors that hold uint64 bits."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _mix_torch(x: torch.Tensor) -> torch.Tensor:
    """`_mix` on int64 tensors that hold uint64 bits (products wrap alike)."""
    x = (x ^ _shr(x, 30)) * _bits(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _bits(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def row_positions_torch(
    seed: int, ids, shapes, keep_fraction: float, dtype=torch.int64, device="cpu", out: torch.Tensor | None = None
) -> torch.Tensor:
    """`row_positions` computed where the model trains (e.g. on its GPU): the same positions, with
    no hashing on the host and no copy to the device. uint64 arithmetic runs on int64 tensors (the
    same bits); hashes are compared with their top bit flipped, so signed order is unsigned order.
    `out`, if given, is a [len(ids), K] tensor of `dtype` on `device` that receives them."""
    plan, row_salts = _row_salts(tuple(tuple(int(d) for d in shape) for shape in shapes), float(keep_fraction))
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=device)
    salts = torch.as_tensor(row_salts.view(np.int64), device=device)
    base = _mix_torch(_mix_torch(ids ^ _bits((int(seed) & 0xFFFFFFFF) * 0x9E3779B97F4A7C15)))
    keys = _mix_torch(base[:, None] ^ salts[None, :]) ^ _bits(2**63)
    pieces, first, offset = [], 0, 0
    for rows, cols, kept in plan:
        own = keys[:, first : first + rows]
        first += rows
        if kept == rows:
            chosen = torch.arange(rows, device=device).expand(len(ids), rows)
        elif kept == 1:
            chosen = own.argmin(dim=1, keepdim=True)
        else:
            chosen = own.topk(kept, dim=1, largest=False).indices.sort(dim=1).values
        columns = torch.arange(cols, device=device, dtype=dtype)
        pieces.append(((offset + chosen * cols).to(dtype)[:, :, None] + columns).reshape(len(ids), kept * cols))
        offset += rows * cols
    return torch.cat(pieces, dim=1) if out is None else torch.cat(pieces, dim=1, out=out)


@functools.lru_cache(maxsize=8)
def _row_salts(shapes: tuple[tuple[int, ...], ...], keep_fraction: float):
    """The row plan and, for every row of every tensor, the salt its hash mixes with the id's."""
    mask = 2**64 - 1
    salts = []
    for tensor, shape in enumerate(shapes):
        salt = np.uint64(((tensor * 0x100000001B3 + 0x414D) * 0xD6E8FEB86659FD93) & mask)
        rows = int(shape[0]) if len(shape) else 1
        salts.append(salt ^ (np.arange(rows, dtype=np.uint64) * np.uint64(0xA24BAED4963EE407)))
    return row_plan(keep_fraction, shapes), np.concatenate(salts)


def kept_positions(seed: int, dataset_id: int, num_params: int, k: int) -> np.ndarray:
    """The K flat positions kept for one sample: sorted, distinct, fixed by (seed, dataset id)."""
    if k >= num_params:
        return np.arange(num_params, dtype=np.int64)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(dataset_id) & 0xFFFFFFFFFFFF, 0x414D])
    return np.sort(rng.choice(num_params, size=k, replace=False, shuffle=False)).astype(np.int64)


def positions_for(seed: int, ids: np.ndarray, num_params: int, k: int, dtype=np.int64) -> np.ndarray:
    """[len(ids), K] kept positions of several ids (the `entries` layout)."""
    out = np.empty((len(ids), k), dtype=dtype)
    for row, dataset_id in enumerate(ids):
        out[row] = kept_positions(seed, int(dataset_id), num_params, k)
    return out


def manifest_positions(manifest: Manifest, ids, dtype=np.int64) -> np.ndarray:
    """[len(ids), K] kept positions of several ids in the store's layout."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if manifest.keep_layout == "rows":
        return row_positions(manifest.seed, ids, manifest.layout.shapes, manifest.keep_fraction, dtype)
    return positions_for(manifest.seed, ids, manifest.num_params, manifest.k, dtype)


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


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file under a folder (what a method keeps on disk)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


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
    keep_layout: str = (
        "entries"  # which entries a sample keeps: random `entries`, or whole `rows` (new stores: see config)
    )
    final_weights: str | None = None  # fingerprint of the weights when the last recorded run finished
    format_version: int = FORMAT_VERSION
    library_version: str = __version__

    @property
    def num_params(self) -> int:
        return self.layout.num_params

    @property
    def k(self) -> int:
        if self.keep_layout == "rows":
            return sum(r * c for _, c, r in row_plan(self.keep_fraction, self.layout.shapes))
        return num_kept(self.keep_fraction, self.num_params)

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "library_version": self.library_version,
            "layout_fingerprint": self.layout.fingerprint(),
            "num_params": self.num_params,
            "keep_fraction": self.keep_fraction,
            "keep_layout": self.keep_layout,
            "final_weights": self.final_weights,
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
            keep_layout=data.get("keep_layout", "entries"),
            final_weights=data.get("final_weights"),
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


def _shard_stem(store_dir: Path, rank: int) -> Path:
    return Path(store_dir) / f"shard-{rank:05d}"


def recording_marker(store_dir: Path, rank: int) -> Path:
    """Present while a training run records into this shard; removed when it finishes."""
    return _shard_stem(store_dir, rank).with_suffix(".recording")


def log_path(store_dir: Path, rank: int) -> Path:
    return _shard_stem(store_dir, rank).with_suffix(".log")


def generation_paths(store_dir: Path, rank: int, generation: int) -> tuple[Path, Path, Path]:
    """(ids, rows, sums) files of one generation of a shard."""
    stem = f"shard-{rank:05d}.g{generation:06d}"
    folder = Path(store_dir)
    return folder / f"{stem}.ids.npy", folder / f"{stem}.rows", folder / f"{stem}.sums.npy"


@dataclass
class ShardState:
    """The committed state of a shard: which generation holds its rows, how much log is folded."""

    generation: int = 0
    log_consumed: int = 0
    rows: int = 0
    purged: list[int] = field(default_factory=list)  # ids whose rows were erased (zeroed in place)

    @classmethod
    def load(cls, store_dir: Path, rank: int) -> ShardState | None:
        path = _shard_stem(store_dir, rank).with_suffix(".json")
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
        write_atomic(_shard_stem(store_dir, rank).with_suffix(".json"), json.dumps(data).encode())


def _row_sums(raw: np.ndarray) -> np.ndarray:
    return np.fromiter((zlib.crc32(row.tobytes()) for row in raw), dtype=np.uint32, count=len(raw))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_generation(
    store_dir: Path, rank: int, generation: int, ids: np.ndarray, raw: np.ndarray, sums: np.ndarray | None = None
) -> None:
    """Write one generation's ids, rows and checksums (durably; not yet the current one).

    `sums` carries the rows' existing checksums over (a purge copies rows unchanged, and a row
    damaged before the copy must still fail its check afterwards)."""
    ids_path, rows_path, sums_path = generation_paths(store_dir, rank, generation)
    fd = _private_open(rows_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as f:
        f.write(raw.tobytes())
        f.flush()
        os.fsync(f.fileno())
    save_npy(sums_path, _row_sums(raw) if sums is None else sums)
    save_npy(ids_path, ids.astype(np.int64))
    _fsync_dir(Path(store_dir))


def read_generation(
    store_dir: Path, rank: int, state: ShardState, k: int, dtype: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, rows memmap [n, K], sums) of a shard's current generation, with size checks."""
    ids_path, rows_path, sums_path = generation_paths(store_dir, rank, state.generation)
    if state.rows == 0 and not ids_path.exists():
        empty = np.zeros((0, k), dtype=_raw_dtype(dtype))
        return np.zeros(0, np.int64), empty, np.zeros(0, np.uint32)
    for path in (ids_path, rows_path, sums_path):
        if not path.exists():
            raise StoreError(
                f"store shard {rank} is missing {path.name}; the store at {store_dir} is incomplete. "
                "Restore the file from a backup."
            )
    ids = np.load(ids_path, allow_pickle=False)
    sums = np.load(sums_path, allow_pickle=False)
    expected = len(ids) * k * _raw_dtype(dtype).itemsize
    if rows_path.stat().st_size != expected or len(ids) != state.rows or len(sums) != len(ids):
        raise StoreError(
            f"store shard {rows_path.name} holds {rows_path.stat().st_size} bytes for {len(ids)} ids, expected "
            f"{expected} for {state.rows}: it is truncated or damaged. Restore it from a backup."
        )
    rows = (
        np.memmap(rows_path, dtype=_raw_dtype(dtype), mode="r", shape=(len(ids), k))
        if len(ids)
        else np.zeros((0, k), dtype=_raw_dtype(dtype))
    )
    return ids, rows, sums


def remove_other_generations(store_dir: Path, rank: int, keep: int, scrub_ids: np.ndarray | None = None) -> None:
    """Delete a shard's generations other than `keep`; with `scrub_ids`, zero those rows first."""
    for rows_path in sorted(Path(store_dir).glob(f"shard-{rank:05d}.g*.rows")):
        generation = int(rows_path.name.split(".g")[1].split(".")[0])
        if generation == keep:
            continue
        ids_path, _, sums_path = generation_paths(store_dir, rank, generation)
        if scrub_ids is not None and ids_path.exists() and rows_path.stat().st_size:
            ids = np.load(ids_path, allow_pickle=False)
            hit = np.flatnonzero(np.isin(ids, scrub_ids))
            if len(hit):
                row_bytes = rows_path.stat().st_size // max(1, len(ids))
                with open(rows_path, "r+b") as f:
                    for row in hit:
                        f.seek(int(row) * row_bytes)
                        f.write(bytes(row_bytes))
                    f.flush()
                    os.fsync(f.fileno())
        for path in (rows_path, ids_path, sums_path):
            path.unlink(missing_ok=True)


class ShardWriter:
    """One training process's shard: appends closed deltas to a log and folds them into rows."""

    def __init__(self, store_dir: Path, rank: int, k: int, dtype: str):
        self.store_dir = Path(store_dir)
        self.rank, self.k, self.dtype = rank, k, dtype
        self.log_path = log_path(self.store_dir, rank)
        self.marker = recording_marker(self.store_dir, rank)
        self.record = np.dtype([("id", "<i8"), ("values", "<f4", (k,))])
        self.state = ShardState.load(self.store_dir, rank) or ShardState()
        fd = _private_open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self._log = os.fdopen(fd, "ab")
        # A crash between emptying the log and recording it leaves consumed > size: nothing is left.
        self.state.log_consumed = min(self.state.log_consumed, self.log_path.stat().st_size)

    def begin(self) -> None:
        """Start a new recording run: drop older generations and the folded log, set the marker."""
        remove_other_generations(self.store_dir, self.rank, self.state.generation)
        os.truncate(self.log_path, 0)  # everything in it is folded into the current generation
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
        rows = self.state.rows
        if generation != self.state.generation:
            rows = len(np.load(ids_path, allow_pickle=False)) if ids_path.exists() else 0
        self._log.flush()
        os.truncate(self.log_path, log_size)
        self.state = ShardState(generation, log_consumed, rows, list(self.state.purged))
        self.state.save(self.store_dir, self.rank)
        self._write_marker()

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
            acc[torch.from_numpy(np.searchsorted(ids, old_ids))] = _decode(np.asarray(old_rows), self.dtype)
        for chunk in chunks():
            rows = torch.from_numpy(np.searchsorted(ids, chunk["id"]))
            acc.index_add_(0, rows, torch.from_numpy(np.ascontiguousarray(chunk["values"])))
        new = ShardState(self.state.generation + 1, size, len(ids))
        write_generation(
            self.store_dir, self.rank, new.generation, ids, _encode(acc, self.dtype).reshape(len(ids), self.k)
        )
        crash_point("compact:generation_written")
        new.save(self.store_dir, self.rank)  # the commit point
        self.state = new
        crash_point("compact:committed")
        self.marker.unlink(missing_ok=True)
        os.truncate(self.log_path, 0)
        self.state.log_consumed = 0
        self.state.save(self.store_dir, self.rank)
        remove_other_generations(self.store_dir, self.rank, new.generation)

    def close(self) -> None:
        self._log.close()


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
                    f"store shard {rank} is missing (shard-{rank:05d}.json); the store at {self.store_dir} "
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
            if zlib.crc32(raw.tobytes()) != int(self._sums[shard][row]):
                raise StoreError(
                    f"the stored row of id {dataset_id} in shard {shard} fails its checksum: the store at "
                    f"{self.store_dir} is corrupted. Nothing was changed; restore the store from a backup."
                )
            total += _decode(raw, self.manifest.dtype)
        return total

    def verify(self) -> int:
        """Check every row's checksum; returns the number of rows checked."""
        checked = 0
        for shard, (rows, sums) in enumerate(zip(self._rows, self._sums)):
            live = self._live(shard)
            if live.any() and not np.array_equal(_row_sums(np.asarray(rows)[live]), sums[live]):
                raise StoreError(f"shard {shard} of {self.store_dir} has rows that fail their checksums.")
            checked += int(live.sum())
        return checked


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
            row_bytes = manifest.k * _raw_dtype(manifest.dtype).itemsize
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
