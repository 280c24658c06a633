"""Named crash and pause points on the commit path, for the crash-consistency tests.

A test starts a writer process with CTXSTORE_CRASH_AT=<point> (optionally
CTXSTORE_CRASH_AFTER=<n>, the number of passes to let through first); that
process SIGKILLs itself when it reaches the point. Without the variable this
costs one comparison per point.

A pause point holds a process still instead, so that a test can act in a
window that is otherwise a few microseconds wide (a publisher truncating its
segment while the daemon reads it): with CTXSTORE_PAUSE_AT=<point> and
CTXSTORE_PAUSE_FILE=<path>, the thread that reaches the point creates
``<path>`` and waits until the test removes it (at most PAUSE_LIMIT_S, so a
test that dies never leaves a process stuck for good).
"""

from __future__ import annotations

import os
import signal
import threading
import time

COMMIT_POINTS = (
    "staging",  # some tensor files written into wal/<txid>
    "staged",  # every file and wal/<txid> itself fsynced, before the rename
    "renamed",  # wal/<txid> renamed into slots/, before the slot directory's fsync
    "in_transaction",  # rows inserted, before COMMIT
    "committed",  # after COMMIT, before the post-commit steps
    "retiring",  # retention removed rows, before the files are unlinked
)
#: Scale-out points (ctxstore.origin): a writer after uploading one object of a version
#: (before its manifest), a follower after downloading and hashing one object (before the
#: version's commit); and inside one object's transfer, at each chunk of it (a multipart
#: upload or ranged download with parts in flight).
ORIGIN_POINTS = (
    "origin_object_uploaded",
    "origin_object_downloaded",
    "origin_upload_progress",
    "origin_download_progress",
)
# Reached only when a step fails, so not in COMMIT_POINTS (tests/test_io_errors.py arms it
# under libfiu): "commit_failed", a COMMIT raised, before the write that settles its outcome.
#: Pause points: "publish_read", the daemon copied one tensor of a publish_shm segment
#: into its own memory and is about to read the next.
PAUSE_POINTS = ("publish_read",)
PAUSE_LIMIT_S = 60.0

_TARGET = os.environ.get("CTXSTORE_CRASH_AT") or None
_passes = [int(os.environ.get("CTXSTORE_CRASH_AFTER", "0") or 0)]
#: the uploader's and downloader's threads pass the origin points at once: each pass counts
_passes_lock = threading.Lock()
_PAUSE_AT = os.environ.get("CTXSTORE_PAUSE_AT") or None
_PAUSE_FILE = os.environ.get("CTXSTORE_PAUSE_FILE") or None


def crash_point(name: str) -> None:
    """SIGKILL this process if the test armed ``name``."""
    if _TARGET is None or name != _TARGET:
        return
    with _passes_lock:
        if _passes[0] > 0:
            _passes[0] -= 1
            return
    os.kill(os.getpid(), signal.SIGKILL)


def pause_point(name: str) -> None:
    """Wait here while the test that armed ``name`` holds its pause file (bounded)."""
    if _PAUSE_AT is None or name != _PAUSE_AT or _PAUSE_FILE is None:
        return
    with open(_PAUSE_FILE, "x"):
        pass
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while os.path.exists(_PAUSE_FILE) and time.monotonic() < deadline:
        time.sleep(0.01)
