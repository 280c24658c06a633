"""Named crash points on the commit path, for the crash-consistency tests.

A test starts a writer process with CTXSTORE_CRASH_AT=<point> (optionally
CTXSTORE_CRASH_AFTER=<n>, the number of passes to let through first); that
process SIGKILLs itself when it reaches the point. Without the variable this
costs one comparison per point.
"""

from __future__ import annotations

import os
import signal

COMMIT_POINTS = (
    "staging",  # some tensor files written into wal/<txid>
    "staged",  # every file and wal/<txid> itself fsynced, before the rename
    "renamed",  # wal/<txid> renamed into slots/, before the slot directory's fsync
    "in_transaction",  # rows inserted, before COMMIT
    "committed",  # after COMMIT, before the post-commit steps
    "retiring",  # retention removed rows, before the files are unlinked
)
# Reached only when a step fails, so not in COMMIT_POINTS (tests/test_io_errors.py arms it
# under libfiu): "commit_failed", a COMMIT raised, before the write that settles its outcome.

_TARGET = os.environ.get("CTXSTORE_CRASH_AT") or None
_passes = [int(os.environ.get("CTXSTORE_CRASH_AFTER", "0") or 0)]


def crash_point(name: str) -> None:
    """SIGKILL this process if the test armed ``name``."""
    if _TARGET is None or name != _TARGET:
        return
    if _passes[0] > 0:
        _passes[0] -= 1
        return
    os.kill(os.getpid(), signal.SIGKILL)
