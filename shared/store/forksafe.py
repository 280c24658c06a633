"""Read connections that a fork never catches inside SQLite.

SQLite's mutexes (its allocator's, its global ones) are plain pthread mutexes:
a process that forks while one of its threads is inside SQLite hands the child
that mutex locked for good, and the child's first SQLite call (a forked worker
reopening its Reader, ``readers/reader.py``) hangs forever. So every statement
on a read connection runs whole (executed and fetched) inside
:data:`FORK_GUARD`, and a fork waits, in its ``before`` handler, until no other
thread is inside; statements other threads start meanwhile wait for the fork to
be made. The writer's own connection is not guarded: the daemon never forks.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import warnings
from typing import Any, Final

#: the longest a fork waits for other threads to leave SQLite; then it warns and goes on
#: (a statement may hold it for SQLite's busy timeout, 10 s, or a count may be stale)
FORK_WAIT_S: Final = 20.0


class ForkGuard:
    """Which threads are inside SQLite, and a fork that waits until no other thread is.

    Per thread (statements nest: opening a connection runs PRAGMAs). While a
    fork is under way a thread's new outermost statement waits for it; the
    forking thread itself never waits on its own count (a finalizer or a signal
    handler may run a statement inside the fork's window, or an interrupted
    statement may have left its count behind).
    """

    def __init__(self) -> None:
        # Reentrant: a signal handler or a garbage collector's finalizer may run a
        # statement in a thread that holds the lock (inside one of these methods).
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._depth: dict[int, int] = {}
        self._forker: int | None = None

    def __enter__(self) -> None:
        me = threading.get_ident()
        entered = False
        try:
            with self._lock:
                depth = self._depth.get(me, 0)
                while not depth and self._forker not in (None, me):
                    self._changed.wait()
                entered = True
                self._depth[me] = depth + 1
        except BaseException:  # an interrupt must not leave this thread counted inside
            if entered:
                self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        me = threading.get_ident()
        with self._lock:
            depth = self._depth.pop(me, 1) - 1
            if depth:
                self._depth[me] = depth
            self._changed.notify_all()

    def before_fork(self) -> None:
        """Mark the fork under way once no other thread is inside SQLite; after
        :data:`FORK_WAIT_S` warn, forget the threads still counted (an interrupt can
        leave a count behind, and it must not cost every later fork) and go on."""
        me = threading.get_ident()
        with self._lock:
            while self._forker not in (None, me):  # another thread's fork goes first
                self._changed.wait()
            self._forker = me
            deadline = time.monotonic() + FORK_WAIT_S
            while any(thread != me for thread in self._depth):
                left = deadline - time.monotonic()
                if left <= 0:
                    self._depth = {t: d for t, d in self._depth.items() if t == me}
                    warnings.warn(
                        f"forking while another thread has been inside SQLite for "
                        f"{FORK_WAIT_S:g} s: the child may hang at its first query",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    return
                self._changed.wait(left)

    def after_fork_in_parent(self) -> None:
        with self._lock:
            self._forker = None
            self._changed.notify_all()

    def after_fork_in_child(self) -> None:
        """The child's only thread is the one that forked: nobody is inside."""
        self.__init__()  # type: ignore[misc]  # fresh locks, not the parent's


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
