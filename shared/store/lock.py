"""The writer lock: an flock on <store>/LOCK holding the writer's pid.

flock locks belong to an open file description, so a second open in the same
process conflicts just like another process; the kernel drops the lock when
the holder dies, SIGKILL included.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import StorageError, WriterLockedError


class WriterLock:
    """Exclusive, non-blocking writer lock on one store."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot open lock {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another writer"
            raise WriterLockedError(
                f"store {self.path.parent} is locked by {who} (writer lock {self.path})",
                holder_pid=holder,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def lock_holder(path: Path) -> int | None:
    """The pid recorded in a lock file, or None (for messages; not proof the lock is held)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_pid(fd)
    finally:
        os.close(fd)


def writer_may_be_running(path: Path) -> bool:
    """Whether the pid recorded in a lock file is a live process: a writer may be at work.

    Only a hint, taken without touching the lock (a probe with flock could make a
    starting writer fail): the pid may have been reused, or live in another pid
    namespace. Good enough to decide whether to wait out a writer's passing states.
    """
    pid = lock_holder(path)
    return pid is not None and pid > 0 and pid_alive(pid)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (signal 0: a live process of another uid counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
