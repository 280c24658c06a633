"""Read connections that a fork never catches inside SQLite.

SQLite's mutexes (its allocator's, its global ones) are plain pthread mutexes:
a process that forks while one of its threads is inside SQLite hands the child
that mutex locked for good, and the child's first SQLite call (a forked worker
reopening its Reader, ``readers/reader.py``) hangs forever. So every statement
on a read connection runs whole (executed and fetched) inside
:data:`FORK_GUARD`, and a fork waits, in its ``before`` handler, until no thread
is inside; statements started meanwhile wait for the fork. The writer's own
connection is not guarded: the daemon never forks.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any


class ForkGuard:
    """A count of threads inside SQLite, and a fork that waits for it to reach zero."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._quiet = threading.Condition(self._lock)
        self._inside = 0

    def __enter__(self) -> None:
        with self._lock:  # held by a fork under way: wait for it
            self._inside += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._inside -= 1
            if not self._inside:
                self._quiet.notify_all()

    def before_fork(self) -> None:
        """Hold the guard through the fork, once no thread is inside SQLite."""
        self._lock.acquire()
        while self._inside:
            self._quiet.wait()

    def after_fork_in_parent(self) -> None:
        self._lock.release()

    def after_fork_in_child(self) -> None:
        """The child's only thread is the one that forked: nobody is inside."""
        self.__init__()  # type: ignore[misc]  # fresh locks, not the parent's held one


FORK_GUARD = ForkGuard()
os.register_at_fork(
    before=FORK_GUARD.before_fork,
    after_in_parent=FORK_GUARD.after_fork_in_parent,
    after_in_child=FORK_GUARD.after_fork_in_child,
)


class Rows(list[Any]):
    """A statement's rows, fetched: what callers of a cursor use of it."""

    def fetchone(self) -> Any:
        return self[0] if self else None

    def fetchall(self) -> Rows:
        return self


class ForkSafeConnection(sqlite3.Connection):
    """A read connection whose statements run whole inside :data:`FORK_GUARD`."""

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        with FORK_GUARD:
            return Rows(super().execute(sql, parameters).fetchall())

    def close(self) -> None:
        with FORK_GUARD:
            super().close()
