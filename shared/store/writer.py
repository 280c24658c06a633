"""PersistentStore: the writer of one store directory, and the store's entry point.

``PersistentStore(path)`` takes the store's writer lock, creates or migrates the
index and recovers what a crash left (``recovery.py``); it commits
(``commit.py``), moves pointers (``pointers.py``), applies retention
(``retention.py``) and records checks and repairs (``repair.py``), on top of every
read of the read-only view (``view.py``). ``PersistentStore(path, readonly=True)``
returns that view (:class:`StoreView`), which has no write method at all.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Literal, overload

from ..errors import (
    InvalidInputError,
    StorageError,
)
from ..hierarchy import NodeHierarchy
from . import layout
from .db import (
    connect,
    damaged_index,
)
from .durable import (
    make_dir,
)
from .lock import WriterLock
from .recovery import StoreRecovery
from .schema import migrate
from .view import StoreView

DEFAULT_RETENTION = 5


class PersistentStore(StoreRecovery):
    """One store directory's writer (holding the LOCK); ``readonly=True`` gives the view.

    (``__new__`` returns a :class:`StoreView`, no writer, for ``readonly=True``: the
    ``type: ignore[misc]`` below say so to mypy, which types every call as the writer;
    code that wants the view's type names ``StoreView(path)``.)
    """

    hierarchy: NodeHierarchy

    @overload
    def __new__(
        cls,
        path: str | os.PathLike[str],
        readonly: Literal[False] = False,
        *,
        retention: int = DEFAULT_RETENTION,
        clock: Callable[[], float] = time.time,
    ) -> PersistentStore: ...

    @overload
    def __new__(  # type: ignore[misc]
        cls,
        path: str | os.PathLike[str],
        readonly: Literal[True],
        *,
        retention: int = DEFAULT_RETENTION,
        clock: Callable[[], float] = time.time,
    ) -> StoreView: ...

    @overload
    def __new__(  # type: ignore[misc]
        cls,
        path: str | os.PathLike[str],
        readonly: bool,
        *,
        retention: int = DEFAULT_RETENTION,
        clock: Callable[[], float] = time.time,
    ) -> StoreView: ...

    def __new__(  # type: ignore[misc]
        cls,
        path: str | os.PathLike[str],
        readonly: bool = False,
        *,
        retention: int = DEFAULT_RETENTION,
        clock: Callable[[], float] = time.time,
    ) -> StoreView:
        if retention < 1:
            raise InvalidInputError(f"retention must keep at least 1 version, got {retention}")
        if readonly:
            return StoreView(path, clock=clock)  # no writer: Python skips __init__
        return super().__new__(cls)

    def __init__(
        self,
        path: str | os.PathLike[str],
        readonly: bool = False,
        *,
        retention: int = DEFAULT_RETENTION,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(path, retention=retention, clock=clock)
        self._view: StoreView | None = None
        self._view_lock = threading.Lock()
        self._open_writer()
        self.hierarchy = NodeHierarchy(self._reader, self._transaction)

    @property
    def view(self) -> StoreView:
        """This store as a :class:`StoreView` of its own, opened on first use and closed
        with the writer: what the writer hands to code that may only read (post-commit
        hooks, the HTTP API's read routes). Not the writer under a narrower type: the view
        has no write method, so such code cannot even name one."""
        with self._view_lock:
            if self._view is None:
                self._refuse_if_closed()
                self._view = StoreView(self.root, clock=self._clock)
            return self._view

    def _open_writer(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot create store {self.root}: {exc}") from exc
        self._lock = WriterLock(layout.lock_path(self.root))
        self._lock.acquire()
        try:
            make_dir(layout.slots_dir(self.root))
            make_dir(layout.wal_dir(self.root))
            self._require_slots_dir()
            self._conn = connect(layout.index_path(self.root), readonly=False)
            try:
                migrate(self._conn)
                self._recover()
            except sqlite3.DatabaseError as exc:
                raise damaged_index(layout.index_path(self.root), exc) from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close connections and release the writer lock; idempotent.

        A commit in flight in another thread finishes first. In a forked child
        only this process's handles go: the parent's locks and threads are not
        its own.
        """
        if os.getpid() == self._pid:
            with self._write_lock:
                self._closed = True
                reaper, self._reaper = self._reaper, None
            if reaper is not None:
                reaper.close()  # while we still hold the lock: recovery owns wal/ after us
            spare = self._take_spare_staging()
            if spare is not None:
                with contextlib.suppress(OSError):
                    os.rmdir(spare)
        with self._view_lock:
            view, self._view = self._view, None
        if view is not None:
            view.close()
        super().close()
        if os.getpid() == self._pid and self._conn is not None:
            # The index stays in WAL mode: switching journal modes at close and open
            # leaves a window where a killed writer's hot journal locks out every
            # read-only opener until a writer returns (found by the crash tests).
            self._conn.close()
        self._conn = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
