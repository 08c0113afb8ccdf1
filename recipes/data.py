"""Loading image datasets for the recipes: the hub, or a local folder that works offline.

A local `--dataset_name` folder may hold
- parquet files named like the hub's (`train-*.parquet`, `test-*.parquet`, also under `data/`),
- the output of `DatasetDict.save_to_disk`,
- for MNIST, IDX files (`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`, `t10k-...`).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format) as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{path} is not an unsigned-byte IDX file.")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    return None


def load_idx_folder(folder: Path) -> DatasetDict:
    splits = {}
    for split, (images_name, labels_name) in IDX_FILES.items():
        images, labels = _find(folder, images_name), _find(folder, labels_name)
        if images is None or labels is None:
            raise FileNotFoundError(f"{folder} lacks {images_name}[.gz] or {labels_name}[.gz].")
        splits[split] = Dataset.from_dict({"image": read_idx(images), "label": read_idx(labels).astype(np.int64)})
    return DatasetDict(splits)


def load_image_dataset(name: str, allow_idx: bool = False) -> DatasetDict:
    """`train` and `test` splits from a hub id or a local folder."""
    folder = Path(name)
    if folder.is_dir():
        if allow_idx and _find(folder, IDX_FILES["train"][0]):
            return load_idx_folder(folder)
        if (folder / "dataset_dict.json").exists():
            return load_from_disk(str(folder))
        files = {}
        for split in ("train", "test"):
            found = sorted(str(p) for p in folder.rglob(f"{split}-*.parquet"))
            if found:
                files[split] = found
        if set(files) == {"train", "test"}:
            return load_dataset("parquet", data_files=files)
        raise FileNotFoundError(
            f"{folder} holds no train-*.parquet and test-*.parquet files, no save_to_disk output"
            + (", no MNIST IDX files" if allow_idx else "")
            + ". Point --dataset_name at such a folder or at a hub dataset id."
        )
    if os.path.exists(name):
        raise FileNotFoundError(f"{name} is a file; --dataset_name wants a folder or a hub id.")
    return load_dataset(name)


def to_array(image) -> np.ndarray:
    """A PIL image, nested list or array as a uint8/float numpy array."""
    return np.asarray(image)
