"""The audit log (`audit.jsonl`): one record per committed forget request, appended in full.

A record holds a keyed digest of the request's ids (HMAC with the store's key, `keys.py`), never the
ids themselves (`audit_record`). Each is one JSON line, with a `checksum` field over its other
fields (a line that fails it is damaged), written with `write_fully` and made durable; the journal
of its request is removed only after that, so a crash while appending leaves at most an unfinished
last line (a torn tail) whose request is still in the journal. `append_audit` moves such a tail
aside, to `audit.jsonl.torn`, loudly, before it appends; recovery then appends that request's
record in full. A damaged line elsewhere is not something an append leaves: `check_audit` refuses
it before a forget's commit point, and `load_audit` still reads every other record
(`hf-amnesia audit`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import StoreError
from .checksums import CHECKSUM, checksum_matches, read_file, with_checksum
from .files import AUDIT, AUDIT_TORN, open_private, truncate_private, write_fully
from .keys import ids_digest

logger = logging.getLogger(__name__)


@dataclass
class AuditLog:
    """What the audit log holds: its records, the line numbers (1-based) that are not records, and
    an unfinished last line (no newline: an interrupted append)."""

    records: list[dict] = field(default_factory=list)
    damaged: list[int] = field(default_factory=list)
    torn: bytes = b""


def load_audit(store_dir: str | os.PathLike) -> AuditLog:
    """Read the audit log, whatever state it is in. A line that is not JSON, or fails its checksum,
    is damaged; the records are returned without their `checksum` field."""
    path = Path(store_dir) / AUDIT
    log = AuditLog()
    if not path.exists() and not path.is_symlink():
        return log
    data = read_file(path, "the audit log")
    complete, _, log.torn = data.rpartition(b"\n") if not data.endswith(b"\n") else (data, b"", b"")
    for number, line in enumerate(complete.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if checksum_matches(record) and isinstance(record.get("request"), str):
            log.records.append({k: v for k, v in record.items() if k != CHECKSUM})
        else:
            log.damaged.append(number)
    return log


def check_audit(store_dir: str | os.PathLike) -> AuditLog:
    """The audit log, refused with `StoreError` if a line other than an unfinished last one is
    damaged (checked before a forget's commit point, so that its append cannot fail after it)."""
    log = load_audit(store_dir)
    if log.damaged:
        raise StoreError(
            f"the audit log {Path(store_dir) / AUDIT} is damaged at line(s) {log.damaged[:5]}: they are not audit "
            "records. Nothing was changed. Inspect it (`hf-amnesia audit` shows the readable records), restore it "
            "from a backup or remove those lines, then retry."
        )
    return log


def read_audit(store_dir: str | os.PathLike) -> list[dict]:
    """The audit log's records (`check_audit`: a damaged line raises `StoreError`)."""
    return check_audit(store_dir).records


def append_audit(store_dir: str | os.PathLike, record: dict) -> None:
    """Append one record to the audit log, in full and durably, once per request id, with its
    `checksum` field (sha256 of the record's canonical JSON)."""
    path = Path(store_dir) / AUDIT
    log = check_audit(store_dir)
    if any(r.get("request") == record["request"] for r in log.records):
        return
    if log.torn:
        _set_aside(path, log.torn)
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        write_fully(fd, (json.dumps(with_checksum(record), sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_aside(path: Path, torn: bytes) -> None:
    """Move an unfinished last line out of the log, into `audit.jsonl.torn`, and say so."""
    aside = path.with_name(AUDIT_TORN)
    fd = open_private(aside, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        write_fully(fd, torn + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    truncate_private(path, path.lstat().st_size - len(torn))
    logger.warning(
        "the audit log %s ended with an unfinished record (%d bytes, an interrupted append); it was moved to %s "
        "and the request's complete record follows once its journal is recovered.",
        path,
        len(torn),
        aside,
    )


def audit_record(
    ids: np.ndarray,
    forgotten: list[int],
    already: list[int],
    unknown: list[int],
    delta_norm: float,
    scale: float,
    repair_steps: int,
    before: str,
    after: str,
    save_to,
    purged: bool,
    *,
    key: bytes,
) -> dict:
    """The record of one committed request; `key` is the store's (`keys.load_key`), so that the ids'
    digest cannot be reversed by trying candidate ids."""
    return {
        "request": uuid.uuid4().hex,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ids_hmac": ids_digest(key, ids),
        "count": int(len(ids)),
        "forgotten": len(forgotten),
        "already_forgotten": len(already),
        "unknown": len(unknown),
        "delta_norm": float(delta_norm),
        "scale": float(scale),
        "repair_steps": int(repair_steps),
        "model_before": before,
        "model_after": after,
        "saved_to": str(save_to) if save_to is not None else None,
        "purged": bool(purged),
    }
