"""The store's SQLite connections: each thread's read connection and the read snapshot.

Every store (the read-only view and the writer) reads through one connection per
thread, opened on first use, reopened after a fork, closed when its thread ends
or the store closes. :class:`StoreConnections` also holds what both kinds of store
share: the root, the clock and the closed flag.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

from ..errors import (
    ClosedError,
)
from . import layout
from .db import (
    connect,
    translate_sqlite_error,
)
from .held import HeldMaps

#: taken while a forked child forgets a store's parent connections; new in each child
_forget_lock = threading.Lock()


def _new_forget_lock() -> None:
    global _forget_lock  # noqa: PLW0603 - per-process state, made again in the child
    _forget_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_forget_lock)


class StoreConnections:
    """One store directory's read connections; the base of the view and the writer."""

    #: False only for the writer (``PersistentStore``)
    readonly: bool

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        readonly: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(path).absolute()
        self._root_str = str(self.root)
        self.readonly = readonly
        self._clock = clock
        self._pid = os.getpid()
        self._closed = False
        self._local = threading.local()
        self._read_conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._conns_pid = self._pid  # whose connections and lock those are
        #: load_context(verify=True) in this process: versions hashed, and versions served
        #: on a writer's record without hashing (ctxstore.integrity)
        self.versions_hashed = 0
        self.versions_trusted = 0
        #: the arrays this process mapped from announcements, for the versions that
        #: share their files (``StoreReads.load_announced``)
        self.held_maps = HeldMaps()

    def close(self) -> None:
        """Close this store's read connections; idempotent. In a forked child they are
        only forgotten: closing the parent's SQLite connections could release its locks."""
        self._closed = True
        if os.getpid() != self._conns_pid:  # a forked child that never read: nothing of ours
            self._forget_parent()
            return
        with self._conns_lock:
            conns = list(self._read_conns)
            self._read_conns.clear()  # in place: the threads' finalizers see it
        for conn in conns:
            conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "readonly" if self.readonly else "writer"
        return f"<PersistentStore {self.root} {mode}{' closed' if self._closed else ''}>"

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection (reopened after fork, closed when the thread ends)."""
        held: _ThreadConnection | None = getattr(self._local, "held", None)
        if held is not None and held.pid == os.getpid():
            return held.conn
        self._refuse_if_closed()
        if os.getpid() != self._conns_pid:
            self._forget_parent()
        conn = connect(layout.index_path(self.root), readonly=True)
        with self._conns_lock:
            try:
                self._refuse_if_closed()  # close() may have run while we connected
            except ClosedError:
                conn.close()
                raise
            self._read_conns.append(conn)
        self._local.held = held = _ThreadConnection(conn, os.getpid())
        # A thread's locals die with it: short-lived threads (hooks) must not leave fds behind.
        finalizer = weakref.finalize(held, _forget_connection, held.conn, held.pid,
                                     self._read_conns, self._conns_lock)  # fmt: skip
        finalizer.atexit = False  # at exit a live thread may still be using it
        return conn

    def _forget_parent(self) -> None:
        """In a forked child: the parent's connections and lock are not ours (another
        thread of the parent may have held the lock at the fork, for good)."""
        with _forget_lock:  # the child's threads may get here together: one resets
            if self._conns_pid == os.getpid():
                return
            self._conns_lock = threading.Lock()
            self._read_conns = []
            self._conns_pid = os.getpid()

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise ClosedError(f"store {self.root} is closed")

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        """One read statement on this thread's connection, sqlite errors translated."""
        try:
            return self._reader().execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise translate_sqlite_error(exc) from exc

    def read_query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        """The rows of one read statement on this thread's read connection, errors translated."""
        return self._query(sql, args)

    @contextlib.contextmanager
    def _read_snapshot(self) -> Iterator[sqlite3.Connection]:
        """Several SELECTs that see one consistent state of the index."""
        conn = self._reader()
        try:
            conn.execute("BEGIN")
        except sqlite3.DatabaseError as exc:
            raise translate_sqlite_error(exc) from exc
        try:
            yield conn
        except sqlite3.DatabaseError as exc:
            raise translate_sqlite_error(exc) from exc
        finally:
            try:
                conn.execute("COMMIT")
            except sqlite3.DatabaseError:  # a damaged index fails even here; what was read stands
                with contextlib.suppress(sqlite3.DatabaseError):
                    conn.execute("ROLLBACK")


class _ThreadConnection:
    """One thread's read connection; its thread-local slot is the only strong reference."""

    __slots__ = ("__weakref__", "conn", "pid")

    def __init__(self, conn: sqlite3.Connection, pid: int) -> None:
        self.conn = conn
        self.pid = pid


def _forget_connection(
    conn: sqlite3.Connection, pid: int, conns: list[sqlite3.Connection], lock: threading.Lock
) -> None:
    """Close a dead thread's read connection unless close() took it or we are a forked child.

    A child must never close its parent's SQLite connection (it could release
    the parent's locks or checkpoint under it); it just forgets it.
    """
    if os.getpid() != pid:
        return
    with lock:
        if not any(c is conn for c in conns):
            return
        conns[:] = [c for c in conns if c is not conn]
    with contextlib.suppress(sqlite3.Error):
        conn.close()
