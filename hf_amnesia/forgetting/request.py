"""A forget request: its ids, its choices and its report."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ForgetRequestError


@dataclass
class ForgetReport:
    """What a call to `forget` did."""

    forgotten: list[int] = field(default_factory=list)
    already_forgotten: list[int] = field(default_factory=list)
    unknown: list[int] = field(default_factory=list)
    # ids whose rows this store purged when another model forgot them: they still influence this one
    purged_elsewhere: list[int] = field(default_factory=list)
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
    items = None
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
    if items is not None and not isinstance(items, np.ndarray):
        flag = next((x for x in items if isinstance(x, (bool, np.bool_))), None)
        if flag is not None:  # numpy would read a bool beside integers as 0 or 1
            raise ForgetRequestError(f"dataset_ids must be integers, got bool {flag!r}. Pass the integer ids only.")
    if array.ndim != 1:
        raise ForgetRequestError(
            f"dataset_ids must be one-dimensional, got shape {tuple(array.shape)}; flatten the nested ids first."
        )
    if array.dtype.kind == "b" or array.dtype.kind not in "iu":
        given = array.tolist() if items is None or isinstance(items, np.ndarray) else items  # as the caller wrote them
        example = next(
            (x for x in given if not isinstance(x, (int, np.integer)) or isinstance(x, (bool, np.bool_))), given[0]
        )
        raise ForgetRequestError(
            f"dataset_ids must be integers, got {type(example).__name__} {example!r} (dtype {array.dtype}). "
            "Pass the integer values of the id column."
        )
    if (array < 0).any():
        raise ForgetRequestError(f"dataset_ids must be non-negative, got {int(array.min())}.")
    if array.dtype.kind == "u" and int(array.max()) >= 2**63:  # would wrap to a negative int64
        raise ForgetRequestError(f"dataset_ids must be below 2**63, got {int(array.max())}.")
    return np.unique(array.astype(np.int64))


def _iterate(values: Iterable):
    try:
        return iter(values)
    except TypeError:
        raise ForgetRequestError(
            f"dataset_ids must be a list, array, tensor or dataset column of integers, got {type(values).__name__}."
        ) from None


def check_choices(scale, repair_steps) -> None:
    """`scale` is "auto" or a finite number; `repair_steps` "auto" or a non-negative integer."""
    if scale != "auto" and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale)):
        raise ForgetRequestError(f'scale must be "auto" or a finite number, got {scale!r}.')
    if repair_steps != "auto" and (
        not isinstance(repair_steps, (int, np.integer)) or isinstance(repair_steps, bool) or repair_steps < 0
    ):
        raise ForgetRequestError(f'repair_steps must be "auto" or a non-negative integer, got {repair_steps!r}.')
