"""Dataset ids: every training row carries an integer id that the model never sees."""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from .errors import UnsupportedTrainingError

try:  # datasets is a dependency, but keep this module importable without it
    import datasets
except ImportError:  # pragma: no cover
    datasets = None


class _WithIndexIds(Dataset):
    """A map-style dataset of dict rows, with the row index added under `id_column`."""

    def __init__(self, base: Dataset, id_column: str):
        self.base, self.id_column = base, id_column

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        row = self.base[index]
        if not isinstance(row, dict):
            raise UnsupportedTrainingError(
                f"training rows must be dicts (as Trainer expects) to carry a dataset id; got {type(row).__name__}."
            )
        if self.id_column in row:
            return row
        return {**row, self.id_column: index}


class _Subset(Dataset):
    def __init__(self, base: Dataset, indices: list[int]):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.base[self.indices[index]]


def with_dataset_ids(dataset, id_column: str):
    """Return the training dataset with an integer id per row (the id column, or the row index)."""
    if dataset is None:
        return None
    if isinstance(dataset, IterableDataset) or (datasets is not None and isinstance(dataset, datasets.IterableDataset)):
        raise UnsupportedTrainingError(
            "an iterable training dataset has no stable row ids; use a map-style dataset "
            f"(e.g. datasets.Dataset) or give each row an integer {id_column!r} column."
        )
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        if id_column not in dataset.column_names:
            return dataset.add_column(id_column, np.arange(len(dataset), dtype=np.int64))
        check_id_column(np.asarray(dataset[id_column]), id_column)
        return dataset
    if isinstance(dataset, _WithIndexIds):
        return dataset
    return _WithIndexIds(dataset, id_column)


def check_id_column(values: np.ndarray, id_column: str) -> None:
    if values.dtype.kind not in "iu" or values.ndim != 1:
        raise UnsupportedTrainingError(
            f"the {id_column!r} column must hold one integer per row, got dtype {values.dtype}. "
            "Cast it to int64 or drop it to use row indices."
        )
    if len(values) and values.min() < 0:
        raise UnsupportedTrainingError(f"the {id_column!r} column holds negative ids; ids must be >= 0.")
    if len(np.unique(values)) != len(values):
        raise UnsupportedTrainingError(
            f"the {id_column!r} column holds duplicated ids; each training row needs its own id."
        )


def dataset_ids(dataset, id_column: str) -> np.ndarray:
    """The id of every row of a dataset returned by `with_dataset_ids`."""
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        return np.asarray(dataset[id_column], dtype=np.int64)
    (ids,) = _columns(dataset, (id_column,))
    return _integers(ids)


def _columns(dataset, columns: tuple[str, ...], start: int = 0) -> list[list]:
    """`row[c]` for each of `columns`, of every row of a map-style dataset of dict rows from `start`,
    read in one pass. Reading a row may run random transforms, so the global random streams are
    restored afterwards: reading ids or labels must not move training's random draws."""
    values: list[list] = [[] for _ in columns]
    with random_streams_kept():
        for i in range(start, len(dataset)):
            row = dataset[i]  # only the wanted columns are kept, not the rows
            for kept, c in zip(values, columns):
                kept.append(row[c])
    return values


def _integers(values: list) -> np.ndarray:
    return np.asarray([int(torch.as_tensor(v)) for v in values], dtype=np.int64)


@contextmanager
def random_streams_kept():
    """Restore Python's, NumPy's and torch's global random states (CPU, and CUDA once initialised)
    on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def without_ids(dataset, id_column: str, drop: set[int]):
    """The rows whose id is not in `drop` (the retained data of a forget request)."""
    ids = dataset_ids(dataset, id_column)
    return select_rows(dataset, [i for i, dataset_id in enumerate(ids.tolist()) if dataset_id not in drop])


def select_rows(dataset, indices):
    """The rows at `indices` (a `datasets.Dataset` stays one)."""
    indices = [int(i) for i in indices]
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        return dataset.select(indices)
    return _Subset(dataset, indices)


def ids_of_label(dataset, label, label_column: str = "label", id_column: str = "dataset_id") -> np.ndarray:
    """Ids of every row whose `label_column` equals `label`: the request that forgets a class."""
    with_ids = with_dataset_ids(dataset, id_column)
    if datasets is not None and isinstance(with_ids, datasets.Dataset):
        labels = np.asarray(with_ids[label_column])
        return np.asarray(with_ids[id_column], dtype=np.int64)[labels == label]
    ids, labels = _columns(with_ids, (id_column, label_column))
    return _integers(ids)[_integers(labels) == label]


def labels_of(dataset, columns: tuple[str, ...] = ("labels", "label")) -> np.ndarray | None:
    """One integer class label per row (from the first of `columns` present), or None if there is none."""
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        column = next((c for c in columns if c in dataset.column_names), None)
        values = None if column is None else np.asarray(dataset[column])
    else:
        with random_streams_kept():
            first = dataset[0] if len(dataset) else {}
        column = next((c for c in columns if isinstance(first, dict) and c in first), None)
        if column is None:
            values = None
        else:
            (rest,) = _columns(dataset, (column,), start=1)
            values = np.asarray([np.asarray(v) for v in [first[column], *rest]])
    if values is None or values.ndim != 1 or values.dtype.kind not in "iu":
        return None
    return values
