"""The subtraction: a request's stored deltas as one dense change, applied to the live weights (pure torch).

A forget subtracts `scale * Q * stored_delta` of each requested id from the weights, where `Q`
is the current decay factor of each parameter tensor (AdamW's decoupled decay shrinks every
earlier update by the same factor as the initial weights).
"""

from __future__ import annotations

import numpy as np
import torch

from ..store import Manifest, StoreReader, manifest_positions, row_plan


def forget_update(reader: StoreReader, ids: np.ndarray) -> torch.Tensor:
    """The dense float64 change `sum_i Q * Delta_i` over `ids` (all must be in the store)."""
    manifest = reader.manifest
    chunk = max(1, 2**22 // manifest.k)  # positions of ~4M entries at a time
    update = torch.zeros(manifest.num_params, dtype=torch.float64)
    ids = np.asarray(ids, dtype=np.int64)
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        positions = torch.from_numpy(manifest_positions(manifest, part)).reshape(-1)
        rows = torch.stack([reader.read(int(dataset_id)) for dataset_id in part])
        update.index_add_(0, positions, rows.reshape(-1).to(torch.float64))
    decay = torch.tensor(manifest.decay or [1.0] * len(manifest.layout.numels), dtype=torch.float64)
    return update * decay.repeat_interleave(torch.tensor(manifest.layout.numels))


def kept_share_weights(manifest: Manifest) -> torch.Tensor:
    """Per-entry float64 weights that put every tensor's kept entries on an equal footing.

    In the `rows` layout a sample keeps max(1, round(p * rows)) of a tensor's rows, so the share
    kept differs between tensors (at p = 0.01: 1 row of 10 in a classifier head, 1 of 128 in a
    hidden layer). Weighting tensor l by (K / M) / share_l makes the request's stored sum, tensor
    by tensor, proportional to an unbiased estimate of its whole change (each kept entry counts
    1 / share_l times, as in Horvitz-Thompson estimation), where the raw sum over-represents the
    tensors with few rows. The weights are 1 where every tensor keeps the same share (the
    `entries` layout, p = 1).
    """
    numels = torch.tensor(manifest.layout.numels)
    if manifest.keep_layout != "rows":
        return torch.ones(int(numels.sum()), dtype=torch.float64)
    plan = row_plan(manifest.keep_fraction, manifest.layout.shapes)
    average = sum(kept * columns for _, columns, kept in plan) / manifest.num_params  # K / M
    weights = torch.tensor([average * rows / kept for rows, _, kept in plan], dtype=torch.float64)
    return weights.repeat_interleave(numels)


@torch.no_grad()
def apply_update(params: list[torch.Tensor], update: torch.Tensor, scale: float) -> None:
    """theta <- theta - scale * update, tensor by tensor in layout order."""
    offset = 0
    for param in params:
        piece = update[offset : offset + param.numel()].view(param.shape)
        param.sub_((scale * piece).to(device=param.device, dtype=param.dtype))
        offset += param.numel()


def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """A copy of the weights, to go back to."""
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore(params: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """Put the weights of a `snapshot` back in place."""
    for param, old in zip(params, saved):
        param.copy_(old)


def subtract_from(params: list[torch.Tensor], original: list[torch.Tensor], update: torch.Tensor, scale: float) -> None:
    """The weights become `original - scale * update`."""
    restore(params, original)
    apply_update(params, update, scale)
