"""Publishers' shared-memory segments: copied with reads that cannot fault, reclaimed when orphaned.

A ``publish_shm`` segment belongs to the client for the whole publish: it may
truncate it (a mapping would then kill the daemon with SIGBUS on its next
touch) or write into it (a mapping would then commit bytes other than those
the hooks vetted and the checksum hashed). So the daemon never maps it. It
reads each tensor with ``preadv`` on the segment's descriptor into an array
of its own: a read past a truncated end returns short, never a signal, and
the commit works only from the copies. The cost is one private copy of the
publish, held until the commit and its post-commit stage are done, and
bounded by ``max_publish_bytes``.

Segments are named ``/ctxstore-pub-<pid>-<token>`` by the client that creates
them (``ctxstore.client.publish_segment_name``), so the daemon can unlink the
segments of publishers that died before they could (SIGKILL mid-publish):
:func:`reclaim_orphans` touches only names of exactly that form whose pid is
gone, never anything else in /dev/shm.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import posix_ipc

from ctxstore.client import SHM_PREFIX, publish_segment_owner
from ctxstore.dtypes import dtype_from_spec
from ctxstore.errors import InvalidInputError, NotFoundError
from ctxstore.faults import pause_point
from ctxstore.store.lock import pid_alive
from ctxstore.wire import TensorSpec

log = logging.getLogger("ctxstore.daemon")

#: where POSIX shared memory lives on Linux
SHM_DIR = "/dev/shm"  # noqa: S108 (not a temporary file: the kernel's shm mount)
#: bytes per read: progress moves at least this often, and no single call is huge
READ_CHUNK = 64 << 20
#: the most segments one sweep unlinks (the rest wait for the next sweep)
MAX_RECLAIM_PER_SWEEP = 1000


@dataclass(frozen=True, slots=True)
class Segment:
    """An open publisher segment: its descriptor (read-only), size and owner at open time."""

    name: str
    fd: int
    size: int
    owner: int


@contextlib.contextmanager
def open_segment(name: str, shm_dir: str = SHM_DIR) -> Iterator[Segment]:
    """The segment ``name`` opened read-only (never mapped); closed when the block ends.

    Opened as shm_open(3) would, plus O_NONBLOCK: a FIFO planted under a
    segment's name is refused at once instead of blocking the commit.
    """
    if not name.startswith(SHM_PREFIX) or "/" in name[1:]:
        raise InvalidInputError(f"shared-memory segment {name!r} must be named {SHM_PREFIX}*")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(f"{shm_dir}/{name[1:]}", flags)
    except FileNotFoundError:
        raise NotFoundError(f"shared-memory segment {name!r} does not exist") from None
    except OSError as exc:
        raise InvalidInputError(
            f"shared-memory segment {name!r} cannot be opened: {exc.strerror}"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInputError(f"shared-memory segment {name!r} is not a regular file")
        yield Segment(name, fd, info.st_size, info.st_uid)
    finally:
        os.close(fd)


def read_tensors(
    segment: Segment,
    manifest: Collection[TensorSpec],
    *,
    max_bytes: int,
    progress: Callable[[int], None] = lambda done: None,
) -> dict[str, np.ndarray[Any, Any]]:
    """A private copy of every tensor of ``manifest``, read from ``segment`` with preadv.

    Refuses (InvalidInputError) a manifest whose ranges do not fit the segment
    or whose total exceeds ``max_bytes``, and a segment that ends early while
    it is being read (truncated by its owner during the publish). ``progress``
    is told the bytes copied so far, from this (worker) thread.
    """
    total = sum(spec.nbytes for spec in manifest)
    if total > max_bytes:
        raise InvalidInputError(
            f"publish of {total} bytes exceeds the daemon's max_publish_bytes ({max_bytes})"
        )
    for spec in manifest:
        if spec.offset + spec.nbytes > segment.size:
            raise InvalidInputError(
                f"tensor {spec.name!r} at offset {spec.offset} with {spec.nbytes} bytes does "
                f"not fit the {segment.size}-byte segment {segment.name!r}"
            )
    copies: dict[str, np.ndarray[Any, Any]] = {}
    done = 0
    for index, spec in enumerate(manifest):
        if index:
            pause_point("publish_read")
        raw = np.empty(spec.nbytes, np.uint8)
        if spec.nbytes:
            done = _read_exactly(segment, spec, raw.data, done, progress)
        # Over a read-only view of the copy, so that Context takes it as immutable as it is
        # (an array owning writable memory would be copied once more).
        frozen = np.frombuffer(raw.data.toreadonly(), dtype_from_spec(spec.dtype))
        copies[spec.name] = frozen.reshape(spec.shape)
    return copies


def _read_exactly(
    segment: Segment,
    spec: TensorSpec,
    target: memoryview,
    done: int,
    progress: Callable[[int], None],
) -> int:
    filled = 0
    while filled < spec.nbytes:
        end = min(spec.nbytes, filled + READ_CHUNK)
        count = os.preadv(segment.fd, [target[filled:end]], spec.offset + filled)
        if count == 0:
            raise InvalidInputError(
                f"shared-memory segment {segment.name!r} ended at byte {spec.offset + filled} "
                f"while tensor {spec.name!r} was read (it was {segment.size} bytes when the "
                "publish began): its owner truncated it during the publish; nothing was committed"
            )
        filled += count
        progress(done + filled)
    return done + filled


def reclaim_orphans(
    busy: Collection[str],
    *,
    min_age: float = 0.0,
    shm_dir: str = SHM_DIR,
    limit: int = MAX_RECLAIM_PER_SWEEP,
    alive: Callable[[int], bool] | None = None,
) -> int:
    """Unlink publisher segments whose owning pid is gone; returns how many went.

    Only regular files named exactly ``ctxstore-pub-<pid>-<token>`` and last
    written more than ``min_age`` seconds ago are considered, never ``busy``
    ones (publishes in flight); a pid that exists (ours to signal or not)
    keeps its segments. Pids are this process's pid namespace's: run
    publishers in the daemon's. At most ``limit`` per call.
    """
    is_alive = alive or pid_alive
    prefix = SHM_PREFIX.lstrip("/")
    reclaimed = 0
    try:
        entries = os.scandir(shm_dir)
    except OSError as exc:
        log.debug("cannot list %s: %s", shm_dir, exc.strerror)
        return 0
    with entries:
        for entry in entries:
            if reclaimed >= limit:
                break
            if not entry.name.startswith(prefix):
                continue
            name = "/" + entry.name
            pid = publish_segment_owner(name)
            if pid is None or name in busy or is_alive(pid):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode) or time.time() - info.st_mtime < min_age:
                    continue
                posix_ipc.unlink_shared_memory(name)
            except (OSError, posix_ipc.Error) as exc:  # another's segment, or gone already
                log.debug("segment %s of dead pid %d not reclaimed: %s", name, pid, exc)
                continue
            reclaimed += 1
    return reclaimed
