"""Every file name of a store, and the durable ways those files are written.

Names live here and nowhere else (the layout is in `hf_amnesia/store/__init__.py` and
docs/store-format.md): the other store modules ask for a path, never spell one. Writes that
readers must see whole go through `write_atomic` / `save_npy` (a temporary file, fsync, rename);
every file is created with mode 0600, and no file is created, written or read through a symbolic
link (`O_NOFOLLOW`): a link planted in the store folder is refused, never followed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MANIFEST_NAME = "manifest.json"
JOURNAL = "forget-journal.json"  # a committed forget being rolled forward
AUDIT = "audit.jsonl"  # one record per completed forget request
AUDIT_TORN = "audit.jsonl.torn"  # the unfinished last lines of interrupted appends, kept aside
LOCK = ".lock"  # held by the one job working on the store (training, forget, recovery, migration)
STORE_KEY = "store.key"  # the store's secret key: keyed digests of ids (audit log, lineage)
LINEAGE = "lineage.jsonl"  # which model weights the store serves, and which ids each has forgotten
STAGING_SUFFIX = ".amnesia-staging"  # next to a forget's `save_to`: the new model, before the swap
REPLACED_SUFFIX = ".amnesia-replaced"  # next to a forget's `save_to`: the old model, during the swap
TMP_SUFFIX = ".tmp"  # a file being written, renamed over its target once durable


def shard_stem(store_dir: str | os.PathLike, rank: int) -> Path:
    """`shard-RRRRR`: the common start of a shard's file names."""
    return Path(store_dir) / f"shard-{rank:05d}"


def shard_state_path(store_dir: str | os.PathLike, rank: int) -> Path:
    """`shard-RRRRR.json`: the shard's committed state."""
    return shard_stem(store_dir, rank).with_suffix(".json")


def recording_marker(store_dir: str | os.PathLike, rank: int) -> Path:
    """Present while a training run records into this shard; removed when it finishes."""
    return shard_stem(store_dir, rank).with_suffix(".recording")


def log_path(store_dir: str | os.PathLike, rank: int) -> Path:
    """`shard-RRRRR.log`: the records appended while training."""
    return shard_stem(store_dir, rank).with_suffix(".log")


def generation_paths(store_dir: str | os.PathLike, rank: int, generation: int) -> tuple[Path, Path, Path]:
    """(ids, rows, sums) files of one generation of a shard."""
    stem = f"shard-{rank:05d}.g{generation:06d}"
    folder = Path(store_dir)
    return folder / f"{stem}.ids.npy", folder / f"{stem}.rows", folder / f"{stem}.sums.npy"


def generations_on_disk(store_dir: str | os.PathLike, rank: int) -> list[int]:
    """The generations of a shard that have a rows file in the folder, ascending."""
    found = []
    for rows_path in sorted(Path(store_dir).glob(f"shard-{rank:05d}.g*.rows")):
        found.append(int(rows_path.name.split(".g")[1].split(".")[0]))
    return found


def staging_dir(save_to: str | os.PathLike) -> Path:
    """Where a committed forget stages the model it will save at `save_to`."""
    target = Path(save_to)
    return target.with_name(target.name + STAGING_SUFFIX)


def replaced_dir(save_to: str | os.PathLike) -> Path:
    """Where the model at `save_to` waits while a forget swaps the staged one in."""
    target = Path(save_to)
    return target.with_name(target.name + REPLACED_SUFFIX)


def open_private(path: Path, flags: int) -> int:
    """`os.open` creating the file with mode 0600 (a store holds information about its samples),
    never through a symbolic link (`OSError` ELOOP if `path` is one)."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o600)


def create_new(path: Path) -> int:
    """A new, empty file at `path` open for writing: a stale one (or a link planted there) is
    removed first, then the file is created exclusively, so nothing existing is written through."""
    path.unlink(missing_ok=True)  # removes a link itself, never its target
    return open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)


def read_private(path: Path) -> bytes:
    """The bytes of a store file, not read through a symbolic link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def truncate_private(path: Path, size: int) -> None:
    """Cut a store file to `size` bytes (`os.truncate` would follow a symbolic link)."""
    fd = open_private(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_fully(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd`: `os.write` may write less than it was given (a signal, a full
    disk); a write that makes no progress raises `OSError`."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(f"no progress writing {len(view)} more bytes")
        view = view[written:]


def write_atomic(path: Path, data: bytes) -> None:
    """Write a small file so that readers see either the old or the new content."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = create_new(tmp)
    try:
        write_fully(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def save_npy(path: Path, array: np.ndarray) -> None:
    """`np.save` (no pickle) made durable before it replaces `path`."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = create_new(tmp)
    with os.fdopen(fd, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(folder: Path) -> None:
    """Make the folder's entries (new and renamed files) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file under a folder (what a method keeps on disk)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
