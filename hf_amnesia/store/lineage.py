"""The lineage file (`lineage.jsonl`): which model weights the store serves, and which ids each
of them has forgotten.

One JSON line per registration: `{"weights": <fingerprint>, "forgotten": [sorted id digests],
"count": n, "checksum": ...}`, the digests being `keys.id_digests` of the ids (keyed, so the file
does not list who asked). The latest line for a fingerprint is what those weights have forgotten
(`lookup`). Lines are appended in full and made durable (`register`, under the store's lock, as
part of a committed forget's roll forward); an unfinished last line is what an interrupted append
leaves, and its request is still in the journal: it is ignored with a warning, and cut off by the
next append. A damaged line anywhere else is a `StoreError`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import StoreError
from .checksums import RESTORE, checksum_matches, with_checksum
from .files import LINEAGE, open_private, read_private, write_fully

logger = logging.getLogger(__name__)


def lineage_path(store_dir: str | os.PathLike) -> Path:
    return Path(store_dir) / LINEAGE


def _read(store_dir: str | os.PathLike) -> tuple[list[dict], bytes, int]:
    """(entries, unfinished last line, length of the complete part in bytes)."""
    path = lineage_path(store_dir)
    try:
        data = read_private(path)
    except FileNotFoundError:
        return [], b"", 0
    except OSError as err:
        raise StoreError(f"cannot read the lineage file {path} ({err}; it must be a plain file). {RESTORE}") from err
    cut = data.rfind(b"\n") + 1  # after the last newline: what follows is an unfinished line
    complete, torn = data[:cut], data[cut:]
    found = []
    for number, line in enumerate(complete.split(b"\n"), start=1):
        if not line.strip():
            continue
        entry = _parse(line)
        if entry is None:
            raise StoreError(
                f"the lineage file {path} is damaged at line {number}: it is not a lineage entry, or fails its "
                f"checksum. {RESTORE}"
            )
        found.append(entry)
    if torn:
        logger.warning(
            "the lineage file %s ends with an unfinished line (%d bytes, an interrupted append); it is ignored, "
            "and the interrupted request registers again when its journal is recovered.",
            path,
            len(torn),
        )
    return found, torn, len(complete)


def _parse(line: bytes) -> dict | None:
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not checksum_matches(entry):
        return None
    weights, forgotten, count = entry.get("weights"), entry.get("forgotten"), entry.get("count")
    if not isinstance(weights, str) or not isinstance(forgotten, list) or not isinstance(count, int):
        return None
    if not all(isinstance(d, str) for d in forgotten) or forgotten != sorted(set(forgotten)) or count != len(forgotten):
        return None
    return {"weights": weights, "forgotten": forgotten, "count": count}


def entries(store_dir: str | os.PathLike) -> list[dict]:
    """Every complete entry, oldest first: `{"weights", "forgotten" (sorted digests), "count"}`
    (`StoreError` if a line other than an unfinished last one is damaged)."""
    return _read(store_dir)[0]


def lookup(store_dir: str | os.PathLike, weights: str) -> frozenset[str] | None:
    """The id digests the weights with fingerprint `weights` have forgotten (their latest entry), or
    None if the store has never served those weights."""
    for entry in reversed(entries(store_dir)):
        if entry["weights"] == weights:
            return frozenset(entry["forgotten"])
    return None


def register(store_dir: str | os.PathLike, weights: str, digests: Iterable[str]) -> None:
    """Record that the weights `weights` have forgotten exactly the ids of `digests`: one complete,
    durable line (skipped if the last line already says so: a repeated registration, as a recovered
    roll forward makes). The caller holds the store's lock."""
    forgotten = sorted({str(d) for d in digests})
    found, torn, complete = _read(store_dir)
    if found and found[-1]["weights"] == weights and found[-1]["forgotten"] == forgotten:
        return
    line = json.dumps(with_checksum({"weights": str(weights), "forgotten": forgotten, "count": len(forgotten)}))
    fd = open_private(lineage_path(store_dir), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        if torn:  # an interrupted append's start: cut off, the line it was is written again below or later
            os.ftruncate(fd, complete)
        write_fully(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
