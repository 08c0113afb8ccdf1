"""How a row's values become bytes on disk: the store dtypes, encoding, decoding, checksums.

Rows are raw little-endian arrays: float32 as itself, float16 and bfloat16 as their 16 bits
(numpy has no bfloat16), each row guarded by its CRC-32.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def encode(values: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 values -> raw numpy array of the store dtype (bfloat16 kept as its bits)."""
    converted = values.detach().cpu().to(STORE_DTYPES[dtype])
    if dtype == "float32":
        return converted.numpy()
    return converted.view(torch.int16).numpy().view(np.uint16)


def decode(raw: np.ndarray, dtype: str) -> torch.Tensor:
    """Raw values of the store dtype -> a float32 tensor (a copy: the store is memory-mapped)."""
    if dtype == "float32":
        return torch.from_numpy(np.array(raw, dtype=np.float32, copy=True))
    bits = torch.from_numpy(np.array(raw, copy=True).view(np.int16))
    return bits.view(STORE_DTYPES[dtype]).float()


def raw_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a store dtype's values are kept as on disk."""
    return np.dtype("<f4") if dtype == "float32" else np.dtype("<u2")


def row_sums(raw: np.ndarray) -> np.ndarray:
    """uint32 CRC-32 of each row of a raw [n, K] array."""
    return np.fromiter((zlib.crc32(row.tobytes()) for row in raw), dtype=np.uint32, count=len(raw))


def row_sum(raw: np.ndarray) -> int:
    """CRC-32 of one raw row."""
    return zlib.crc32(raw.tobytes())
