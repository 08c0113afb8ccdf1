"""Fault injection for the crash-consistency tests.

`HF_AMNESIA_CRASH_AT=name` (or `name#n` for its n-th passage) makes the process SIGKILL itself
at that named point of recording, checkpointing, compaction or forgetting;
`HF_AMNESIA_FAIL_AT=name` (or `name#n`) raises `OSError(ENOSPC)` there instead, as a full disk
would. Unset, they cost a dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal

CRASH_ENV = "HF_AMNESIA_CRASH_AT"
FAIL_ENV = "HF_AMNESIA_FAIL_AT"
_passes: dict[tuple[str, str], int] = {}


def crash_point(name: str) -> None:
    if _reached(CRASH_ENV, name):
        os.kill(os.getpid(), signal.SIGKILL)
    if _reached(FAIL_ENV, name):
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")


def _reached(env: str, name: str) -> bool:
    target, _, nth = os.environ.get(env, "").partition("#")
    if target != name:
        return False
    _passes[env, name] = _passes.get((env, name), 0) + 1
    return _passes[env, name] == int(nth or 1)
