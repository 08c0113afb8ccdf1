"""The store's secret key (`store.key`): digests of dataset ids that cannot be enumerated.

A plain hash of a few small integer ids is reversed by trying every candidate (milliseconds for a
request of four ids), so the audit log and the lineage file hold HMAC-SHA256 digests keyed with a
32-byte secret made once per store (`create_key`, mode 0600). The manifest keeps a public check
value of the key (`key_check`), so a missing, truncated or swapped key is refused (`load_key`)
instead of silently producing digests that match nothing.

Losing the key makes the recorded digests uncheckable, and with them which ids each served model
has forgotten: the store then serves no request (back the key up with the store). Whoever can read the store can read the key: it protects the ids from readers
of the audit log or the lineage file, not from readers of the store folder.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from ..errors import StoreError
from .files import STORE_KEY, fsync_dir, open_private, read_private, write_fully

KEY_BYTES = 32
_CHECK_MESSAGE = b"hf_amnesia key check"


def key_path(store_dir: str | os.PathLike) -> Path:
    return Path(store_dir) / STORE_KEY


def create_key(store_dir: str | os.PathLike) -> bytes:
    """Make the store's key: 32 random bytes in `store.key` (mode 0600, never over an existing file
    or through a link)."""
    key = secrets.token_bytes(KEY_BYTES)
    path = key_path(store_dir)
    try:
        fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        raise StoreError(f"{path} already exists: a store has one key, made once. Keep it.") from None
    try:
        write_fully(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return key


def read_key(store_dir: str | os.PathLike) -> bytes | None:
    """The bytes of `store.key` as they are (None if there is none), without checking them."""
    path = key_path(store_dir)
    try:
        return read_private(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StoreError(f"cannot read the store's key {path} ({err}); it must be a plain file.") from err


def key_check(key: bytes) -> str:
    """A short public value that tells whether a key is the store's (kept in the manifest)."""
    return hmac.new(key, _CHECK_MESSAGE, hashlib.sha256).hexdigest()[:16]


def check_key(store_dir: str | os.PathLike, expected_check: str | None) -> bytes:
    """The store's key, refused with `StoreError` if it is missing, of the wrong size or not the key
    whose check value is `expected_check` (the manifest's)."""
    path = key_path(store_dir)
    key = read_key(store_dir)
    remedy = (
        "Restore store.key from a backup of this store: without it the store cannot tell which ids a "
        "model has forgotten, so it serves no forget request."
    )
    if expected_check is None:
        raise StoreError(f"the store at {store_dir} has no key (its manifest records none). {remedy}")
    if key is None:
        raise StoreError(f"the store's key {path} is missing. {remedy}")
    if len(key) != KEY_BYTES:
        raise StoreError(f"the store's key {path} holds {len(key)} bytes, not {KEY_BYTES}: it is damaged. {remedy}")
    if not hmac.compare_digest(key_check(key), expected_check):
        raise StoreError(f"{path} is not this store's key (its check value differs from the manifest's). {remedy}")
    return key


def load_key(store_dir: str | os.PathLike) -> bytes:
    """The store's key, checked against the manifest's `key_check` (`StoreError` if missing, of the
    wrong size, or another store's)."""
    from .manifest import Manifest  # manifest.py imports this module to make a new store's key

    manifest = Manifest.load(Path(store_dir))
    if manifest is None:
        raise StoreError(f"no hf_amnesia store at {store_dir} (no manifest), so no key to load.")
    return check_key(store_dir, manifest.key_check)


def _hmac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("ascii"), hashlib.sha256).hexdigest()


def id_digests(key: bytes, ids: Iterable[int]) -> list[str]:
    """HMAC-SHA256 of each id's decimal string, hex, 32 characters, in input order."""
    return [_hmac(key, str(int(i)))[:32] for i in ids]


def ids_digest(key: bytes, ids: Iterable[int]) -> str:
    """HMAC-SHA256 of the sorted unique ids (decimal, comma-separated), hex: identifies a request
    without listing, or letting anyone recover, who asked."""
    return _hmac(key, ",".join(str(i) for i in sorted({int(i) for i in ids})))
