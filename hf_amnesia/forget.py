"""Applying a forget request to a model's weights (pure torch; no transformers).

A forget subtracts `scale * Q * stored_delta` of each requested id from the live weights, where
`Q` is the current decay factor of each parameter tensor (AdamW's decoupled decay shrinks every
earlier update by the same factor as the initial weights).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ForgetRequestError
from .store import Manifest, StoreReader, manifest_positions, row_plan


@dataclass
class ForgetReport:
    """What a call to `forget` did."""

    forgotten: list[int] = field(default_factory=list)
    already_forgotten: list[int] = field(default_factory=list)
    unknown: list[int] = field(default_factory=list)
    delta_norm: float = 0.0
    seconds: float = 0.0
    scale: float = 1.0
    repair_steps: int = 0
    committed: bool = False  # saved and purged as one transaction (forget(..., save_to=...))
    request: str | None = None  # the audit record's id, when committed
    calibration: list[tuple[float, float]] = field(default_factory=list)  # scale="auto": (scale, harm) tried


def normalize_ids(dataset_ids) -> np.ndarray:
    """Validate forget ids: a flat collection of non-negative integers. Duplicates collapse."""
    if dataset_ids is None:
        raise ForgetRequestError("dataset_ids is None; pass a list, array or dataset column of integer ids.")
    if isinstance(dataset_ids, (str, bytes)):
        raise ForgetRequestError(f"dataset_ids must be integers, got the string {dataset_ids!r}.")
    if isinstance(dataset_ids, (bool, np.bool_)):
        raise ForgetRequestError("dataset_ids must be integers, got a bool.")
    if isinstance(dataset_ids, (int, np.integer)):
        dataset_ids = [dataset_ids]
    if torch.is_tensor(dataset_ids):
        array = dataset_ids.detach().cpu().numpy()
    else:
        items = dataset_ids if isinstance(dataset_ids, np.ndarray) else list(_iterate(dataset_ids))
        try:
            array = np.asarray(items)
        except ValueError as err:
            raise ForgetRequestError(f"dataset_ids must be a flat list of integers ({err}).") from None
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1:
        raise ForgetRequestError(
            f"dataset_ids must be one-dimensional, got shape {tuple(array.shape)}; flatten the nested ids first."
        )
    if array.dtype.kind == "b" or array.dtype.kind not in "iu":
        example = next((x for x in array.tolist() if not isinstance(x, int) or isinstance(x, bool)), array[0])
        raise ForgetRequestError(
            f"dataset_ids must be integers, got {type(example).__name__} {example!r} (dtype {array.dtype}). "
            "Pass the integer values of the id column."
        )
    if (array < 0).any():
        raise ForgetRequestError(f"dataset_ids must be non-negative, got {int(array.min())}.")
    return np.unique(array.astype(np.int64))


def _iterate(values: Iterable):
    try:
        return iter(values)
    except TypeError:
        raise ForgetRequestError(
            f"dataset_ids must be a list, array, tensor or dataset column of integers, got {type(values).__name__}."
        ) from None


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
