"""The writer's connection and transactions: the write lock, BEGIN IMMEDIATE ... COMMIT,
and settling a failed COMMIT before anything else is written.

:class:`StoreWriting` holds the writer's state (``PersistentStore`` opens it); every
write of the writer goes through :meth:`StoreWriting._transaction` or, for a
commit, :meth:`StoreWriting._settling_transaction`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Set

from ..context import Context
from ..errors import (
    ClosedError,
    CtxStoreError,
    InvalidInputError,
    ReadOnlyError,
    StorageError,
)
from ..faults import crash_point
from ..records import Problem
from . import layout
from .connections import StoreConnections
from .db import (
    overwrite_stray_frames,
    transaction,
    translate_sqlite_error,
)
from .decode import RecordParts
from .durable import (
    remove_beneath,
)
from .lock import WriterLock
from .reads import PUBLISH_KEY_SQL
from .reaper import Reaper
from .view import StoreView

log = logging.getLogger("ctxstore.store")

PreCommitHook = Callable[[int, Context], None]
ProtectedVersions = Callable[[int], Set[int]]


class StoreWriting(StoreView):
    """The writer's state, its connection and its transactions (no open: see writer.py)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if retention < 1:
            raise InvalidInputError(f"retention must keep at least 1 version, got {retention}")
        StoreConnections.__init__(self, path, readonly=False, clock=clock)
        self.retention = retention
        self._write_lock = threading.RLock()
        self._lock: WriterLock | None = None
        self._conn: sqlite3.Connection | None = None
        self._reaper: Reaper | None = None
        self._slot_dirs: set[int] = set()  # slot directories this writer made sure exist
        #: slot -> (model type, next version) as this writer's last COMMIT left them; only
        #: save_context changes either, and only under the writer lock this store holds
        self._slot_heads: dict[int, tuple[str | None, int]] = {}
        #: versions whose COMMIT failed: files kept until a durable write settles their fate
        self._unsettled: set[tuple[int, int]] = set()
        #: a COMMIT failed since the last durable write: its WAL frames may still be replayed
        self._frames_at_risk = False
        self._spare_staging: str | None = None
        #: (slot, version, what its announced record is made of) of the last commit when
        #: it recorded itself verified: the config, metadata and manifest texts its
        #: transaction wrote, its files' identities and the boot id (None: none was read)
        self._committed: tuple[int, int, RecordParts] | None = None
        self._spare_lock = threading.Lock()
        #: checks run before every commit; each raises to reject (issue: hooks)
        self.pre_commit_hooks: list[PreCommitHook] = []
        #: versions that retention must keep besides its own rules (readers still holding them)
        self.protected_versions: ProtectedVersions | None = None
        #: what recovery found at open that it could not mend (rows whose files are gone)
        self.recovery_problems: list[Problem] = []

    def _report_refusal(self, problem: Problem) -> None:
        """Log and keep what recovery refused to touch or found out of place."""
        log.warning("store %s: %s", self.root, problem.detail)
        self.recovery_problems.append(problem)

    def _remove_version_dir(self, slot: int, version: int) -> None:
        """Delete a version directory no row names, following no link (reported if refused)."""
        refusal = remove_beneath(self._root_str, f"{layout.SLOTS_DIR}/{slot}/{version}")
        if refusal is not None:
            self._report_refusal(Problem("stray_entry", refusal, slot, version))

    def _writer_conn(self) -> sqlite3.Connection:
        if self._closed or self._conn is None:
            raise ClosedError(f"store {self.root} is closed")
        if os.getpid() != self._pid:
            raise ReadOnlyError(
                f"store {self.root} was opened for writing by pid {self._pid}; "
                "a forked child must open its own store"
            )
        return self._conn

    def _settled_writer_conn(self) -> sqlite3.Connection:
        """The writer connection, once no failed commit is left undecided (under the
        write lock, before any write: :meth:`_settle` raises while it cannot decide)."""
        conn = self._writer_conn()
        if self._unsettled or self._frames_at_risk:
            self._settle(conn)
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock:
            conn = self._settled_writer_conn()
            with self._settling_transaction(conn):
                yield conn

    @contextlib.contextmanager
    def _settling_transaction(
        self, conn: sqlite3.Connection, version: tuple[int, int] | None = None
    ) -> Iterator[sqlite3.Connection]:
        """:func:`transaction`, for every write: when its COMMIT fails, that COMMIT's
        WAL frames are buried (:meth:`_settle`) before anything else is written, so a
        write reported failed does not come back with the next WAL recovery.
        ``version``: the (slot, version) this transaction commits, whose files stay
        until the settling write has decided whether it has a row."""
        body_done = False
        try:
            with transaction(conn):
                yield conn
                body_done = True
        except BaseException:
            if body_done:  # the statements ran: it was the COMMIT that failed
                self._frames_at_risk = True
                if version is not None:
                    self._unsettled.add(version)
                crash_point("commit_failed")
                try:
                    self._settle(conn)
                except CtxStoreError as exc:
                    log.warning("after a failed write to the index: %s", exc)
            raise

    def write_transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT on the writer connection, under the store's write lock.

        For the index's own tables that live beside the versions (the daemon's
        job queue). Nothing is visible unless COMMIT returns; sqlite errors are
        translated. ReadOnlyError on a read-only store, ClosedError after close().
        """
        return self._transaction()

    def _settle(self, conn: sqlite3.Connection) -> None:
        """Decide the versions whose COMMIT failed: a durable write first overwrites
        whatever frames that COMMIT left in the WAL, so none can be replayed later;
        then a version with a row is committed (files kept), one without is removed.

        Raises StorageError while the index cannot sync: no commit goes ahead then.
        """
        try:
            overwrite_stray_frames(conn)
        except CtxStoreError as exc:
            raise StorageError(
                f"a failed write to the index is not settled yet (the index cannot sync: "
                f"{exc}); nothing is written until it is, and a failed commit's files are kept"
            ) from exc
        self._frames_at_risk = False
        for slot, version in sorted(self._unsettled):
            if not self._version_recorded(conn, slot, version):
                self._remove_version_dir(slot, version)
            self._unsettled.discard((slot, version))

    def _version_recorded(self, conn: sqlite3.Connection, slot: int, version: int) -> bool:
        """After a failed COMMIT (and a settling write), ask the index what happened."""
        try:
            row = conn.execute(
                "SELECT 1 FROM versions WHERE slot = ? AND version = ?", (slot, version)
            ).fetchone()
        except sqlite3.DatabaseError as exc:
            raise translate_sqlite_error(exc) from exc
        return row is not None

    def publish_key_version(self, key: str) -> tuple[int, int] | None:
        """(slot, version) committed with publish key ``key``, while retention keeps it.

        A writer asks on its own connection (the daemon asks before each keyed publish,
        from any worker thread: no reader connection is opened in each of them).
        """
        with self._write_lock:
            try:
                rows = self._writer_conn().execute(PUBLISH_KEY_SQL, (key,)).fetchall()
            except sqlite3.DatabaseError as exc:
                raise translate_sqlite_error(exc) from exc
        return (rows[0][0], rows[0][1]) if rows else None
