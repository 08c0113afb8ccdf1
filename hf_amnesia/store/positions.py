"""Which entries of a sample's delta the store keeps: positions fixed by (seed, dataset id).

Kept positions are never stored; they are recomputed from the manifest. The `entries` layout
keeps K random flat positions (`kept_positions`, numpy's PCG64); the `rows` layout keeps whole
rows of each tensor, those with the smallest splitmix64 hash of (seed, id, tensor, row)
(`row_positions` on the host, `row_positions_torch` where the model trains: the same positions).
The hash is spelled out in docs/store-format.md.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .manifest import Manifest

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
