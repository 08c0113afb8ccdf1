"""Checksums of the store's metadata, and loading its files so that damage is a `StoreError`.

Every JSON document of a store (the manifest, each shard's state, the forget journal, each line of
the audit log and of the lineage file) carries a `checksum` field: the sha256 of the canonical JSON
(`canonical`: sorted keys, no spaces, ASCII) of all its other fields. The ids and sums files of a
generation are covered by sha256 of their bytes, kept in the shard's state. The threat is accidents
and careless edits (a flipped bit, a hand-edited field), not an adversary: whoever can write the
store can also delete it.

Loading never unpickles, and every way a file can fail to parse (not JSON, not a dict, a missing
key, a wrong type, a failed checksum, an `.npy` of another dtype) ends as a `StoreError` naming the
file (`load_json`, `load_npy`, `fields`).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from ..errors import StoreError
from .files import read_private

CHECKSUM = "checksum"
RESTORE = "Nothing was changed. Restore the store from a backup; `hf-amnesia verify STORE` lists what it checks."

T = TypeVar("T")


def canonical(data) -> bytes:
    """The one byte string a JSON value is hashed as, however its file was formatted."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def checksum_of(data: dict) -> str:
    """sha256 of the canonical JSON of every field but `checksum`."""
    return hashlib.sha256(canonical({k: v for k, v in data.items() if k != CHECKSUM})).hexdigest()


def with_checksum(data: dict) -> dict:
    """`data` with its `checksum` field (computed over the other fields)."""
    return {**{k: v for k, v in data.items() if k != CHECKSUM}, CHECKSUM: checksum_of(data)}


def checksum_matches(data) -> bool:
    """True if `data` is a dict whose `checksum` field matches its other fields."""
    return (
        isinstance(data, dict)
        and isinstance(data.get(CHECKSUM), str)
        and hmac.compare_digest(data[CHECKSUM], checksum_of(data))
    )


def dump(data: dict, indent: int | None = None) -> bytes:
    """`data` with its checksum, as the bytes of a JSON file."""
    return json.dumps(with_checksum(data), indent=indent, sort_keys=True).encode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_file(path: Path, what: str) -> bytes:
    """The bytes of a store file; an unreadable one (or a symbolic link) is a `StoreError`."""
    try:
        return read_private(path)
    except FileNotFoundError:
        raise StoreError(f"{what} {path} is missing. {RESTORE}") from None
    except OSError as err:
        raise StoreError(f"cannot read {what} {path} ({err}; a store file must be a plain file). {RESTORE}") from err


def parse_json(data: bytes, path: Path, what: str) -> dict:
    """A JSON object from a store file's bytes (`StoreError` if it is not one)."""
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise StoreError(f"{what} {path} is damaged: it is not JSON ({err}). {RESTORE}") from None
    if not isinstance(parsed, dict):
        raise StoreError(f"{what} {path} is damaged: it holds a {type(parsed).__name__}, not a JSON object. {RESTORE}")
    return parsed


def load_json(path: Path, what: str) -> dict:
    """A checksummed JSON file, checked: damage of any kind is a `StoreError` naming `path`."""
    data = parse_json(read_file(path, what), path, what)
    if CHECKSUM not in data:
        raise StoreError(f"{what} {path} has no checksum: it is damaged or was not written by hf_amnesia. {RESTORE}")
    if not checksum_matches(data):
        raise StoreError(
            f"{what} {path} fails its checksum: it was damaged or edited by hand after it was written. {RESTORE}"
        )
    return data


def fields(path: Path, what: str, build: Callable[[], T]) -> T:
    """`build()` (which reads the fields of a loaded file), a missing key or a wrong type becoming a
    `StoreError` naming `path`."""
    try:
        return build()
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise StoreError(
            f"{what} {path} is damaged: a field is missing or of the wrong type ({type(err).__name__}: {err}). "
            f"{RESTORE}"
        ) from None


def load_npy(path: Path, dtype: str, expected_sha256: str | None, what: str) -> np.ndarray:
    """A one-dimensional `.npy` array of `dtype` (no pickle), its bytes checked against
    `expected_sha256` first (None: not checked)."""
    data = read_file(path, what)
    if expected_sha256 is not None and not hmac.compare_digest(sha256_bytes(data), expected_sha256):
        raise StoreError(
            f"{what} {path} does not match the checksum its shard state recorded when it was written: it is "
            f"damaged. {RESTORE}"
        )
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise StoreError(f"{what} {path} is damaged: it is not a plain .npy array ({err}). {RESTORE}") from None
    if not isinstance(array, np.ndarray) or array.ndim != 1 or array.dtype != np.dtype(dtype):
        raise StoreError(
            f"{what} {path} is damaged: it holds {getattr(array, 'dtype', '?')} of shape "
            f"{getattr(array, 'shape', '?')}, expected a one-dimensional {np.dtype(dtype)} array. {RESTORE}"
        )
    return array
