"""Fault injection for the crash-consistency tests.

`HF_AMNESIA_CRASH_AT=name` (or `name#n` for its n-th passage) makes the process SIGKILL itself
at that named point of recording, checkpointing, compaction or forgetting. Unset, it costs a
dictionary lookup.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "HF_AMNESIA_CRASH_AT"
_passes: dict[str, int] = {}


def crash_point(name: str) -> None:
    wanted = os.environ.get(CRASH_ENV)
    if not wanted or not wanted.startswith(name):
        return
    _passes[name] = _passes.get(name, 0) + 1
    target, _, nth = wanted.partition("#")
    if target == name and _passes[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
