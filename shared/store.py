"""PersistentStore: versions committed atomically to SQLite + .npy files, mapped zero-copy.

The commit protocol, in this order and only here (docs/reliability.md, "The commit path"):

1. validate the context;
2. write each new tensor into ``wal/<txid>/`` (or hard-link an identical stored
   one), and the version's extra files into ``wal/<txid>/files/``; fsync each
   file and the directories (their entries);
3. rename ``wal/<txid>`` to ``slots/<slot>/<version>``, fsync ``slots/<slot>``;
4. one SQLite transaction inserts the version, its tensors and files and moves the
   slot's current pointer: its COMMIT is the commit point (its statements run
   right after staging, while the CPU is warm; nothing of them is visible or
   durable before this COMMIT);
5. call the caller's ``on_committed`` (the daemon bumps its version table and
   announces there), then warm the files, apply retention (rows first, then unlink).

A crash before 4 leaves a directory with no row, which recovery deletes; a crash
after 4 leaves a whole version. A failed COMMIT keeps the files until a durable
write has buried its WAL frames (:meth:`PersistentStore._settle`). Readers only
ever follow rows, so they see whole versions or nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import secrets
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from . import layout
from .checksum import checksum_parts
from .context import Array, Context
from .db import (
    connect,
    damaged_index,
    overwrite_stray_frames,
    transaction,
    translate_sqlite_error,
)
from .durable import (
    SyncQueue,
    clear_scratch_dir,
    describe_entry,
    fsync_all,
    fsync_dir,
    hard_link,
    make_dir,
    remove_beneath,
    remove_tree,
    rename_dir,
    write_new_file,
)
from .errors import (
    ClosedError,
    ConflictError,
    CtxStoreError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    ReadOnlyError,
    StorageError,
)
from .faults import crash_point
from .hierarchy import NodeHierarchy
from .integrity import (
    DAMAGED,
    VERIFIED,
    Identity,
    boot_id,
    hash_file,
    identity_of,
    pack_identities,
    stat_file,
    unpack_identities,
)
from .lock import WriterLock, writer_may_be_running
from .manifest import Manifest, pack_manifest, unpack_manifest
from .npyfile import (
    check_npy_header,
    contiguous_bytes,
    dtype_from_text,
    dtype_name,
    dtype_to_text,
    map_array,
    map_arrays,
    npy_header,
    shape_from_text,
    shape_to_text,
)
from .reaper import Reaper
from .records import ContextMetadata, FileInfo, Problem, SlotInfo, TensorInfo, VersionInfo
from .schema import check_readable, migrate
from .sources import Imported, TensorSource, copy_buffer, same_file_bytes, write_streamed
from .validation import (
    MAX_TENSORS,
    check_alias,
    check_label,
    check_slot,
    check_tensor_name,
    check_version,
    freeze_trusted_json,
    thaw_json,
)
from .verify import find_orphans, real_dir_problem, recorded_version, verify_store
from .versionfiles import check_file_name, check_files

log = logging.getLogger("ctxstore.store")

DEFAULT_RETENTION = 5
#: what a writer's passing states look like to verify: checked again before reporting
PASSING_KINDS = frozenset({"orphan", "missing_file", "missing_version_dir"})
#: seconds between those checks, and the most verify waits for them to clear
VERIFY_SETTLE_S, VERIFY_SETTLE_MAX_S = 0.25, 10.0
#: how often load_context resolves a moving reference again after losing a race with retention
_LOAD_ATTEMPTS = 8

VersionRef = int | str | None
PreCommitHook = Callable[[int, Context], None]
ProtectedVersions = Callable[[int], Set[int]]


class _NewVersion(NamedTuple):
    """What one save_context call commits, once its version number is known."""

    slot: int
    version: int
    context: Context
    model_type: str | None
    aliases: tuple[str, ...]
    pin: bool
    publish_key: str | None = None
    #: extra files, by validated name
    files: Mapping[str, bytes] = MappingProxyType({})
    #: tensors streamed from an import's files (``context`` then holds none); the
    #: pre-commit hooks see them mapped from the staging directory
    sources: Mapping[str, Array | TensorSource] | None = None


class PersistentStore:
    """One store directory: a writer (holding the LOCK) or a read-only view of it."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        readonly: bool = False,
        *,
        retention: int = DEFAULT_RETENTION,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if retention < 1:
            raise InvalidInputError(f"retention must keep at least 1 version, got {retention}")
        self.root = Path(path).absolute()
        self._root_str = str(self.root)
        self.readonly = readonly
        self.retention = retention
        self._clock = clock
        self._pid = os.getpid()
        self._closed = False
        self._write_lock = threading.RLock()
        self._local = threading.local()
        self._read_conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
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
        self._spare_lock = threading.Lock()
        #: checks run before every commit; each raises to reject (issue: hooks)
        self.pre_commit_hooks: list[PreCommitHook] = []
        #: versions that retention must keep besides its own rules (readers still holding them)
        self.protected_versions: ProtectedVersions | None = None
        #: what recovery found at open that it could not mend (rows whose files are gone)
        self.recovery_problems: list[Problem] = []
        #: load_context(verify=True) in this process: versions hashed, and versions served
        #: on a writer's record without hashing (ctxstore.integrity)
        self.versions_hashed = 0
        self.versions_trusted = 0
        if readonly:
            self._open_readonly()
        else:
            self._open_writer()
        self.hierarchy = NodeHierarchy(self._reader, None if readonly else self._transaction)

    # -- opening, closing -----------------------------------------------------------------

    def _open_readonly(self) -> None:
        if not layout.index_path(self.root).exists():
            raise NotFoundError(f"no ctxstore store at {self.root} (no {layout.INDEX_NAME})")
        try:
            check_readable(self._reader())
        except sqlite3.OperationalError as exc:
            raise StorageError(
                f"cannot open store {self.root} read-only: {exc}; SQLite needs its -wal and "
                "-shm files, which only a writer can create or recover: start the daemon "
                "(or give this user write access to the store directory) and retry"
            ) from exc
        except sqlite3.DatabaseError as exc:
            raise damaged_index(layout.index_path(self.root), exc) from exc

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

    def _require_slots_dir(self) -> None:
        """Refuse a ``slots`` that is a symbolic link or no directory: the writer deletes
        beneath it (recovery, retention) and would follow the link out of the store."""
        slots = layout.slots_dir(self.root)
        mode = os.lstat(slots).st_mode
        if not stat.S_ISDIR(mode):
            raise StorageError(
                f"{slots} is {describe_entry(mode)}, not a directory; a writer follows no "
                f"link inside a store (it deletes beneath slots/): put the directory itself "
                f"at {slots} (the store directory {self.root} may be a link, nothing in it)"
            )

    def _recover(self) -> None:
        """Undo what a crash left before a commit point; report what it cannot mend.

        No symbolic link inside the store is followed and nothing outside it is
        deleted: ``wal/`` is emptied through a descriptor of it (a link in its place
        is unlinked, never its target), only real version directories are orphans,
        and they are removed by :func:`remove_beneath`. What it refused or found
        out of place is logged and kept in :attr:`recovery_problems`.
        """
        wal = layout.wal_dir(self.root)
        notes = clear_scratch_dir(self.root, layout.WAL_DIR)
        for note in notes:
            self._report_refusal(Problem("stray_entry", note))
        if notes:
            fsync_dir(self.root)  # a wal/ made anew
        conn = self._writer_conn()
        orphans: list[tuple[int, int]] = []
        for problem in find_orphans(self.root, conn, None):
            if (
                problem.kind == "orphan"
                and problem.slot is not None
                and problem.version is not None
            ):
                orphans.append((problem.slot, problem.version))
            else:  # not ours to delete (a foreign name): report it
                self.recovery_problems.append(problem)
        if orphans:
            # A failed COMMIT (or a kill between its frames and the index update) can
            # leave frames in the WAL behind this connection's view, replayed by a later
            # WAL recovery if another process holds the index open now: bury them first.
            overwrite_stray_frames(conn)
            still = {(p.slot, p.version) for p in find_orphans(self.root, conn, None)}
            for slot, version in orphans:
                if (slot, version) in still:
                    self._remove_version_dir(slot, version)
        fsync_dir(wal)
        for slot, version in conn.execute("SELECT slot, version FROM versions"):
            try:
                number = recorded_version(version, slot)
            except IntegrityError as exc:
                self.recovery_problems.append(Problem("bad_record", str(exc), slot))
                continue
            why = real_dir_problem(self.root, slot, number)
            if why is not None:
                self.recovery_problems.append(
                    Problem("missing_version_dir", f"recorded version has no files: {why}",
                            slot, number)
                )  # fmt: skip

    def _report_refusal(self, problem: Problem) -> None:
        """Log and keep what recovery refused to touch or found out of place."""
        log.warning("store %s: %s", self.root, problem.detail)
        self.recovery_problems.append(problem)

    def _remove_version_dir(self, slot: int, version: int) -> None:
        """Delete a version directory no row names, following no link (reported if refused)."""
        refusal = remove_beneath(self._root_str, f"{layout.SLOTS_DIR}/{slot}/{version}")
        if refusal is not None:
            self._report_refusal(Problem("stray_entry", refusal, slot, version))

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
        self._closed = True
        with self._conns_lock:
            conns = list(self._read_conns)
            self._read_conns.clear()  # in place: the threads' finalizers see it
        if os.getpid() == self._pid:
            for conn in conns:
                conn.close()
            if self._conn is not None:
                # The index stays in WAL mode: switching journal modes at close and open
                # leaves a window where a killed writer's hot journal locks out every
                # read-only opener until a writer returns (found by the crash tests).
                self._conn.close()
        self._conn = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> PersistentStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "readonly" if self.readonly else "writer"
        return f"<PersistentStore {self.root} {mode}{' closed' if self._closed else ''}>"

    # -- connections ----------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection (reopened after fork, closed when the thread ends)."""
        held: _ThreadConnection | None = getattr(self._local, "held", None)
        if held is not None and held.pid == os.getpid():
            return held.conn
        self._refuse_if_closed()
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

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise ClosedError(f"store {self.root} is closed")

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        """One read statement on this thread's connection, sqlite errors translated."""
        try:
            return self._reader().execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise translate_sqlite_error(exc) from exc

    def _writer_conn(self) -> sqlite3.Connection:
        if self.readonly:
            raise ReadOnlyError(f"store {self.root} is open read-only")
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

    # -- commit ---------------------------------------------------------------------------

    def save_context(
        self,
        slot_id: int,
        context: Context,
        *,
        model_type: str | None = None,
        aliases: tuple[str, ...] = (),
        pin: bool = False,
        publish_key: str | None = None,
        files: Mapping[str, bytes] | None = None,
        on_committed: Callable[[int], None] | None = None,
        version: int | None = None,
    ) -> int:
        """Commit ``context`` as the next version of ``slot_id`` and make it current.

        ``publish_key``: a publisher's idempotency key, recorded with the version in
        the same COMMIT (see :meth:`publish_key_version`); no two versions share one.
        ``files``: extra files that travel with the version byte-exact (a
        checkpoint's ``config.json``, tokenizer files ...), by plain name; read
        back with :meth:`read_file` (docs/huggingface.md).
        ``on_committed(version)``: called in this thread right after the COMMIT,
        before the chores that may follow it (warming, retention), so a daemon
        publishes the version first; what it raises is logged, never raised.
        ``version``: commit as exactly this number rather than the next one (a
        follower keeping its origin's numbering, docs/scale-out.md); a number below
        the slot's next is a ConflictError, so a slot never moves backwards.
        """
        slot = check_slot(slot_id)
        if not isinstance(context, Context):
            raise InvalidInputError(f"expected a Context, got {type(context).__name__}")
        checked = check_files(files)
        for hook in self.pre_commit_hooks:
            hook(slot, context)
        return self._save(slot, context, model_type=model_type, aliases=aliases, pin=pin,
                          publish_key=publish_key, files=checked, sources=None,
                          on_committed=on_committed,
                          number=version)  # fmt: skip

    def save_import(
        self,
        slot_id: int,
        imported: Imported,
        *,
        model_type: str | None = None,
        aliases: tuple[str, ...] = (),
        pin: bool = False,
        publish_key: str | None = None,
        on_committed: Callable[[int], None] | None = None,
        version: int | None = None,
    ) -> int:
        """Commit what an importer read (``ctxstore.nodes.open_import``) as the next version.

        Tensors given as sources are copied from their files into the staging
        directory a chunk at a time and hashed as they are written: the memory
        this takes does not grow with the checkpoint. The importer already
        checked the limits on its files; the names are checked again here.
        ``on_committed``: as for :meth:`save_context`.
        ``version``: as in :meth:`save_context`.
        """
        slot = check_slot(slot_id)
        context = Context(None, imported.config, imported.metadata)
        checked = {check_file_name(name): data for name, data in imported.files.items()}
        if len(imported.tensors) > MAX_TENSORS:
            raise InvalidInputError(f"a context holds at most {MAX_TENSORS} tensors")
        for name in imported.tensors:
            check_tensor_name(name)
        return self._save(slot, context, model_type=model_type, aliases=aliases, pin=pin,
                          publish_key=publish_key, files=checked,
                          sources=imported.tensors, on_committed=on_committed,
                          number=version)  # fmt: skip

    def _save(
        self,
        slot: int,
        context: Context,
        *,
        model_type: str | None,
        aliases: tuple[str, ...],
        pin: bool,
        publish_key: str | None,
        files: Mapping[str, bytes],
        sources: Mapping[str, Array | TensorSource] | None,
        on_committed: Callable[[int], None] | None = None,
        number: int | None = None,
    ) -> int:
        if number is not None:
            number = check_version(number)
        if model_type is not None:
            check_label(model_type, "model type")
        aliases = tuple(check_alias(a) for a in aliases)
        with self._write_lock:
            conn = self._settled_writer_conn()
            stored_type, version = self._slot_head(conn, slot)
            if model_type and stored_type and stored_type != model_type:
                raise ConflictError(
                    f"slot {slot} holds model type {stored_type!r}, not {model_type!r}"
                )
            if number is not None:
                if number < version:
                    raise ConflictError(
                        f"slot {slot} cannot take version {number}: its next version is "
                        f"{version} (a slot's numbers only go up)"
                    )
                version = number
            new = _NewVersion(slot, version, context, model_type, aliases, pin, publish_key,
                              files, sources)  # fmt: skip
            # Forgotten until this commit returns: whatever interrupts it (a failed
            # COMMIT that was durable after all, a KeyboardInterrupt after it) leaves
            # the next commit to read the number from the index.
            self._slot_heads.pop(slot, None)
            retired, linked = self._commit(conn, new)
            self._slot_heads[slot] = (model_type or stored_type, version + 1)
            crash_point("committed")
            try:  # the version is committed: what follows must not make this call fail
                if on_committed is not None:
                    on_committed(version)
            except Exception:
                log.exception("slot %d version %d committed; on_committed failed", slot, version)
            try:
                self._warm(slot, version, linked)
                self._retire_files(retired, then=self._prepare_spare_staging)
            except Exception:
                log.exception("slot %d version %d committed; a later chore failed", slot, version)
        return version

    def _slot_head(self, conn: sqlite3.Connection, slot: int) -> tuple[str | None, int]:
        """The slot's model type and the number its next version gets (1 for a new slot)."""
        head = self._slot_heads.get(slot)
        if head is None:
            row = conn.execute(
                "SELECT model_type, next_version FROM slots WHERE slot = ?", (slot,)
            ).fetchone()
            head = (row[0], row[1]) if row else (None, 1)
        return head

    def _take_spare_staging(self) -> str | None:
        """The empty staging directory prepared after the last commit, if it is ready."""
        with self._spare_lock:
            spare, self._spare_staging = self._spare_staging, None
        return spare

    def _prepare_spare_staging(self) -> None:
        """Create the next commit's staging directory in wal/ (recovery removes a leftover)."""
        with self._spare_lock:
            if self._spare_staging is not None or self._closed:
                return
            spare = str(
                layout.spare_staging_dir(self.root, f"{os.getpid()}-{secrets.token_hex(6)}")
            )
            make_dir(spare, durable=False)
            self._spare_staging = spare

    def _commit(
        self, conn: sqlite3.Connection, new: _NewVersion
    ) -> tuple[list[tuple[int, int]], list[int]]:
        """Steps 2 to 4 of the commit protocol; returns the versions retention retired
        and the positions of the tensors that were hard-linked rather than written.

        A failure before COMMIT leaves no directory behind and no row. A failed
        COMMIT leaves the version's files in place: its frames may sit in the WAL
        with a commit marker that the next WAL recovery would replay, so they go
        only once a durable write has buried those frames (:meth:`_settle`).
        """
        staging = self._take_spare_staging()
        if staging is None:
            staging = str(layout.wal_dir(self.root) / f"{os.getpid()}-{secrets.token_hex(6)}")
            make_dir(staging, durable=False)
        placed = reached_commit = False
        early = SyncQueue()  # an import's files, each fsynced as soon as it is written
        try:
            with self._settling_transaction(conn, (new.slot, new.version)):
                # Staged inside the transaction, so dedup's lookups share its snapshot
                # instead of each opening one (only this writer takes the write lock).
                tensors, written, linked = self._stage(staging, new, early)
                written += self._stage_files(staging, new.files)
                if new.sources is not None and self.pre_commit_hooks:
                    self._run_hooks_on_staged(staging, new, tensors)
                # The rows go in while the CPU is still warm from staging (after an
                # fsync's sleep the same statements took several times longer); none
                # of them is visible, or durable, before the COMMIT after the fsyncs.
                retired = self._insert_version(conn, new, tensors)
                fsync_all(written)
                early.wait()
                if new.files:
                    fsync_dir(f"{staging}/{layout.FILES_DIR}")
                # The directory's entries, after the files: their journal commit already
                # carries most of it (measured 0.06 ms here, where syncing the version
                # directory beside the slot directory after the rename added 0.08 ms).
                fsync_dir(staging)
                crash_point("staged")
                slot_dir = self._place(staging, new.slot, new.version)
                placed = True
                crash_point("renamed")
                fsync_dir(slot_dir)  # the version directory's entry in it
                crash_point("in_transaction")
                reached_commit = True
        except BaseException:
            early.abandon()
            self._slot_dirs.discard(new.slot)  # the next commit makes sure it exists again
            if not reached_commit:  # no COMMIT ran: nothing of this version can come back
                # Only what this call made: a directory of that number that it did not
                # rename into place belongs to a version committed before it.
                remove_tree(layout.version_dir(self.root, new.slot, new.version)
                            if placed else staging)  # fmt: skip
            raise
        return retired, linked

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

    def _place(self, staging: str, slot: int, version: int) -> str:
        """Step 3: rename the staging directory (its files and entries already
        durable) into place; returns the slot directory, whose new entry the
        caller makes durable.

        The staging directory's own creation and its removal from wal/ need not
        be durable: recovery deletes whatever wal/ holds.
        """
        slot_dir = layout.slot_dir_str(self._root_str, slot)
        if slot not in self._slot_dirs:
            # Its entry in slots/ is made durable once per writer, not only when this
            # mkdir creates it: a writer killed between a mkdir and its fsync leaves a
            # directory whose entry nothing else would ever sync.
            make_dir(slot_dir, durable=False)
            mode = os.lstat(slot_dir).st_mode
            if not stat.S_ISDIR(mode):  # a link would take this version out of the store
                raise StorageError(
                    f"{slot_dir} is {describe_entry(mode)}, not a directory: slot {slot} "
                    "cannot be written until it is removed (see `ctxstore verify`)"
                )
            fsync_dir(os.path.dirname(slot_dir))
            self._slot_dirs.add(slot)
        rename_dir(staging, layout.version_dir_str(self._root_str, slot, version))
        return slot_dir

    def _stage(
        self, staging: str, new: _NewVersion, early: SyncQueue
    ) -> tuple[list[TensorRow], list[str], list[int]]:
        """Write (or link) every tensor into ``staging``: the rows, the files still to
        sync, and the positions hard-linked to a stored file. A streamed tensor's file
        goes to ``early`` instead, its fsync started as soon as it is written."""
        rows: list[TensorRow] = []
        written: list[str] = []
        linked: list[int] = []
        staged: dict[str, str] = {}
        tensors = new.context.weights if new.sources is None else new.sources
        buffer = copy_buffer() if new.sources is not None else None
        for position, (name, array) in enumerate(tensors.items()):
            if isinstance(array, TensorSource):
                assert buffer is not None
                rows.append(self._stage_source(staging, position, name, array, buffer,
                                               staged=staged, early=early,
                                               linked=linked))  # fmt: skip
                crash_point("staging")
                continue
            header = npy_header(array.dtype, array.shape)
            data = contiguous_bytes(array)
            checksum = checksum_parts((header, data))
            path = f"{staging}/{layout.tensor_file_name(position)}"
            source = staged.get(checksum) or self._stored_duplicate(checksum, header, data)
            if source is None or not hard_link(source, path):
                write_new_file(path, (header, data), sync=False)
                written.append(path)
            elif checksum not in staged:  # linked to a stored file, not to one staged here
                linked.append(position)
            staged.setdefault(checksum, path)
            rows.append(
                (
                    position,
                    name,
                    dtype_to_text(array.dtype),
                    shape_to_text(array.shape),
                    len(header),
                    data.nbytes,
                    checksum,
                )
            )
            crash_point("staging")
        return rows, written, linked

    def _stage_source(
        self,
        staging: str,
        position: int,
        name: str,
        source: TensorSource,
        buffer: memoryview,
        *,
        staged: dict[str, str],
        early: SyncQueue,
        linked: list[int],
    ) -> TensorRow:
        """Copy a streamed tensor into ``staging``, hashing it as it is written; then,
        when an identical file is staged or stored already, link that one instead
        (the copy was needed to know the checksum without holding the tensor)."""
        header = npy_header(source.dtype, source.shape)
        path = f"{staging}/{layout.tensor_file_name(position)}"
        checksum = write_streamed(path, header, source.chunks(buffer))
        duplicate = staged.get(checksum)
        if duplicate is None or not same_file_bytes(duplicate, path):
            duplicate = self._stored_duplicate_file(checksum, path)
        if duplicate is not None and _replace_with_link(duplicate, path):
            if checksum not in staged:
                linked.append(position)
        else:
            early.start(path)
        staged.setdefault(checksum, path)
        dtype = dtype_to_text(source.dtype)
        return (position, name, dtype, shape_to_text(source.shape), len(header),
                source.nbytes, checksum)  # fmt: skip

    def _stored_duplicate_file(self, checksum: str, path: str) -> str | None:
        """A stored tensor file with the same bytes as the staged file at ``path``."""
        candidates = self._writer_conn().execute(
            "SELECT slot, version, position FROM tensors WHERE checksum = ? LIMIT 4", (checksum,)
        )
        for slot, version, position in candidates:
            stored = layout.tensor_path_str(self._root_str, slot, version, position)
            if same_file_bytes(stored, path):
                return stored
        return None

    def _stage_files(self, staging: str, files: Mapping[str, bytes]) -> list[str]:
        """Write (or link an identical stored one) each extra file into ``staging/files``;
        returns the paths written, which still need their fsync."""
        if not files:
            return []
        make_dir(f"{staging}/{layout.FILES_DIR}", durable=False)
        written: list[str] = []
        for name, data in files.items():
            path = f"{staging}/{layout.FILES_DIR}/{name}"
            checksum = checksum_parts((data,))
            source = self._stored_duplicate_extra(checksum, data)
            if source is None or not hard_link(source, path):
                write_new_file(path, (data,), sync=False)
                written.append(path)
        return written

    def _stored_duplicate_extra(self, checksum: str, data: bytes) -> str | None:
        rows = self._writer_conn().execute(
            "SELECT slot, version, name FROM version_files WHERE checksum = ? LIMIT 4",
            (checksum,),
        )
        for slot, version, name in rows:
            path = layout.version_file_str(self._root_str, slot, version, name)
            try:
                with open(path, "rb") as f:
                    if f.read(len(data) + 1) == data:
                        return path
            except OSError:
                continue
        return None

    def _run_hooks_on_staged(self, staging: str, new: _NewVersion, rows: list[TensorRow]) -> None:
        """The pre-commit hooks, for an import: they see the staged files, mapped."""
        weights = {
            name: map_array(f"{staging}/{layout.tensor_file_name(position)}",
                            dtype_from_text(dtype), shape_from_text(shape), offset, nbytes)
            for position, name, dtype, shape, offset, nbytes, _ in rows
        }  # fmt: skip
        context = Context._trusted(MappingProxyType(weights), new.context.config,
                                   new.context.metadata)  # fmt: skip
        for hook in self.pre_commit_hooks:
            hook(new.slot, context)

    def _stored_duplicate(self, checksum: str, header: bytes, data: memoryview) -> str | None:
        """A stored file with exactly these bytes, found by checksum and confirmed byte for byte."""
        candidates = self._writer_conn().execute(
            "SELECT slot, version, position FROM tensors WHERE checksum = ? LIMIT 4", (checksum,)
        )
        for slot, version, position in candidates:
            if not type(slot) is type(version) is type(position) is int:
                continue  # a tampered row names no file to link (verify reports it)
            path = layout.tensor_path_str(self._root_str, slot, version, position)
            if _same_bytes(path, header, data):
                return path
        return None

    def _insert_version(
        self, conn: sqlite3.Connection, new: _NewVersion, tensors: list[TensorRow]
    ) -> list[tuple[int, int]]:
        """Step 4's rows, inside the caller's transaction: the version, its tensors, the
        slot's current pointer and aliases, and retention's deletions (one synchronous
        COMMIT per commit; their files are unlinked after it). Returns those retired.
        """
        slot, version, context, model_type, aliases, pin, publish_key, files, _ = new
        now = self._clock()
        conn.execute(
            "INSERT INTO slots(slot, model_type, current_version, next_version, "
            "created_at, updated_at) VALUES (?1, ?2, ?3, ?3 + 1, ?4, ?4) "
            "ON CONFLICT(slot) DO UPDATE SET current_version = ?3, next_version = ?3 + 1, "
            "model_type = COALESCE(?2, model_type), updated_at = ?4",
            (slot, model_type, version, now),
        )
        conn.execute(
            "INSERT INTO versions(slot, version, created_at, config, metadata, "
            "n_tensors, nbytes, pinned, manifest, publish_key) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                slot,
                version,
                now,
                _dump_json(context.config),
                _dump_json(context.metadata),
                len(tensors),
                sum(row[5] for row in tensors),
                int(pin),
                pack_manifest(tensors),
                publish_key,
            ),
        )
        conn.executemany(
            "INSERT INTO tensors(slot, version, position, name, dtype, shape, "
            "data_offset, nbytes, checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(slot, version, *row) for row in tensors],
        )
        if files:
            conn.executemany(
                "INSERT INTO version_files(slot, version, name, size, checksum) "
                "VALUES (?, ?, ?, ?, ?)",
                [(slot, version, n, len(d), checksum_parts((d,))) for n, d in files.items()],
            )
        if aliases:
            conn.executemany(
                "INSERT INTO aliases(slot, name, version) VALUES (?, ?, ?) "
                "ON CONFLICT(slot, name) DO UPDATE SET version = excluded.version",
                [(slot, alias, version) for alias in aliases],
            )
        retired = self._retain(slot)
        if retired:
            conn.executemany(_DELETE_VERSION_SQL, retired)
        return retired

    def _version_recorded(self, conn: sqlite3.Connection, slot: int, version: int) -> bool:
        """After a failed COMMIT (and a settling write), ask the index what happened."""
        try:
            row = conn.execute(
                "SELECT 1 FROM versions WHERE slot = ? AND version = ?", (slot, version)
            ).fetchone()
        except sqlite3.DatabaseError as exc:
            raise translate_sqlite_error(exc) from exc
        return row is not None

    def _warm(self, slot: int, version: int, positions: list[int]) -> None:
        """Ask the kernel to read these files of the new version ahead, so readers map warm
        pages: the hard-linked ones, whose pages may have left the cache since they were
        written (a file this commit wrote went through the page cache)."""
        for position in positions:
            path = layout.tensor_path_str(self._root_str, slot, version, position)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # advisory only; verify reports missing files
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    # -- reading --------------------------------------------------------------------------

    def resolve(self, slot_id: int, version: VersionRef = None) -> int:
        """The version number ``version`` names: None = current, 'latest', an alias or an int."""
        slot = check_slot(slot_id)
        with self._read_snapshot() as conn:
            return _resolve(conn, slot, version)

    def load_context(
        self,
        slot_id: int,
        version: VersionRef = None,
        *,
        verify: bool = False,
        trust_verified: bool = False,
    ) -> Context:
        """The context at ``version`` (default: current), its arrays mapped read-only.

        File sizes are always checked against the record. With ``verify`` every
        file is also re-hashed against its recorded xxh3-128 (about 60 ms a GiB,
        and it reads the pages in), so a flipped byte is an IntegrityError, never
        wrong numbers: readers verify each version once, when they adopt it. A
        version recorded damaged (:meth:`mark_damaged`) is then an IntegrityError
        without hashing. ``trust_verified`` (with ``verify``): skip the hash when a
        writer recorded, during this boot, that it hashed these very files, and
        each mapped file's identity (size, mtime_ns, inode, device; one ``fstat``)
        is still the recorded one; the caller says whether a daemon vouches now.

        Retention may retire the version between the index read and the mapping of
        its files. A reference that moves (current, latest, an alias) is then
        resolved again; a numbered version that was retired is NotFoundError.
        """
        slot = check_slot(slot_id)
        moving = not isinstance(version, int) and not (
            isinstance(version, str) and version.isdigit()
        )
        for _ in range(_LOAD_ATTEMPTS if moving else 1):
            number, context = self._load_once(slot, version, verify, trust_verified)
            if context is not None:
                return context
        raise NotFoundError(f"slot {slot} version {number} was retired")

    def _load_once(
        self, slot: int, version: VersionRef, verify: bool, trust_verified: bool = False
    ) -> tuple[int, Context | None]:
        """The resolved version number and its context, or None when it was retired meanwhile."""
        row_number, *record = self._version_row(_RECORD_SQL, slot, version)
        number = recorded_version(row_number, slot)  # it names the directory to read
        manifest, plan = _read_plan(record[2])
        state, recorded_boot, recorded_files = record[3], record[4], record[5]
        if verify and state == DAMAGED:
            raise IntegrityError(
                f"slot {slot} version {number} is recorded damaged: {record[6]} "
                "(run `ctxstore verify`)"
            )
        vouched = (
            verify
            and trust_verified
            and state == VERIFIED
            and recorded_boot is not None
            and recorded_boot == boot_id()
        )
        stats: list[os.stat_result] | None = [] if vouched else None
        try:
            weights = self._map_tensors(slot, number, plan, stats)
        except NotFoundError:
            if self._version_exists(slot, number):
                raise IntegrityError(
                    f"slot {slot} version {number} is recorded but its files are missing"
                ) from None
            return number, None
        if verify:
            if stats is not None and _same_identities(stats, recorded_files):
                _check_mapped_headers(slot, number, manifest, weights, stats)
                self.versions_trusted += 1
            else:
                self.versions_hashed += 1
                _verify_mapped(slot, number, manifest, weights)
        return number, Context._trusted(
            MappingProxyType(weights),
            _load_json(record[0], "config"),
            _load_json(record[1], "metadata"),
            slot,
            number,
        )

    def _map_tensors(
        self,
        slot: int,
        version: int,
        plan: _ReadPlan,
        stats: list[os.stat_result] | None = None,
    ) -> dict[str, Array]:
        prefix = layout.tensor_path_str(self._root_str, slot, version, 0)[: -len("0.npy")]
        return dict(zip(plan.names, map_arrays(prefix, plan.specs, stats), strict=True))

    def _version_exists(self, slot: int, version: int) -> bool:
        row = (
            self._reader()
            .execute("SELECT 1 FROM versions WHERE slot = ? AND version = ?", (slot, version))
            .fetchone()
        )
        return row is not None

    def publish_key_version(self, key: str) -> tuple[int, int] | None:
        """(slot, version) committed with publish key ``key``, while retention keeps it.

        A writer asks on its own connection (the daemon asks before each keyed publish,
        from any worker thread: no reader connection is opened in each of them).
        """
        sql = "SELECT slot, version FROM versions WHERE publish_key = ?"
        if self.readonly:
            rows = self._query(sql, (key,))
        else:
            with self._write_lock:
                try:
                    rows = self._writer_conn().execute(sql, (key,)).fetchall()
                except sqlite3.DatabaseError as exc:
                    raise translate_sqlite_error(exc) from exc
        return (rows[0][0], rows[0][1]) if rows else None

    def current_version(self, slot_id: int) -> int | None:
        """The slot's current version, or None when the slot has none."""
        row = (
            self._reader()
            .execute("SELECT current_version FROM slots WHERE slot = ?", (check_slot(slot_id),))
            .fetchone()
        )
        return None if row is None or row[0] is None else recorded_version(row[0], slot_id)

    def current_versions(self) -> dict[int, int]:
        """Every slot's current version (the daemon's snapshot for the version table)."""
        rows = self._query(
            "SELECT slot, current_version FROM slots WHERE current_version IS NOT NULL"
        )
        return {slot: recorded_version(version, slot) for slot, version in rows}

    def _version_row(self, sql: str, slot: int, version: VersionRef) -> tuple[Any, ...]:
        """The row ``sql`` (ending in "v.version = ") selects for ``version`` of ``slot``.

        The current or a numbered version is one statement, consistent without a
        snapshot; aliases and ``latest`` resolve first, in the same read snapshot.
        """
        if isinstance(version, str) and version.isdigit():
            version = int(version)
        if version is None or version == "current":
            rows = self._query(sql + "s.current_version", (slot,))
        elif isinstance(version, int):
            rows = self._query(sql + "?2", (slot, check_version(version)))
        else:
            with self._read_snapshot() as conn:
                number = _resolve(conn, slot, version)
                rows = conn.execute(sql + "?2", (slot, number)).fetchall()
        if not rows:
            with self._read_snapshot() as conn:  # say precisely what is missing
                number = _resolve(conn, slot, version)
            raise NotFoundError(f"slot {slot} has no version {number}")
        row: tuple[Any, ...] = rows[0]
        return row

    def get_metadata(
        self, slot_id: int, version: VersionRef = None, *, tensors: bool = True
    ) -> ContextMetadata:
        """A version's model type, config, metadata and tensor table; opens no array file.

        The current version or a numbered one is one SQL statement; aliases and
        ``latest`` resolve first, in the same read snapshot.
        """
        slot = check_slot(slot_id)
        row = self._version_row(_METADATA_SQL, slot, version)
        number, model_type, current, created, config, metadata, pinned, aliases, blob = row
        number = recorded_version(number, slot)
        current = None if current is None else recorded_version(current, slot)
        return ContextMetadata(
            slot=slot,
            version=number,
            model_type=model_type,
            current_version=current,
            created_at=created,
            config=_load_json(config, "config"),
            metadata=_load_json(metadata, "metadata"),
            pinned=bool(pinned),
            aliases=tuple(aliases.split(",")) if aliases else (),
            tensors=_tensor_table(blob) if tensors else None,
        )

    def list_files(self, slot_id: int, version: VersionRef = None) -> tuple[FileInfo, ...]:
        """The extra files of a version (default: current), by name."""
        slot = check_slot(slot_id)
        with self._read_snapshot() as conn:
            number = _resolve(conn, slot, version)
            rows = conn.execute(
                "SELECT name, size, checksum FROM version_files WHERE slot = ? AND version = ? "
                "ORDER BY name",
                (slot, number),
            ).fetchall()
        return tuple(FileInfo(*row) for row in rows)

    def read_file(self, slot_id: int, version: VersionRef, name: str) -> bytes:
        """The bytes of extra file ``name`` of a version (None: current), checked against its
        recorded size and xxh3-128: damage is an IntegrityError, never wrong bytes."""
        slot = check_slot(slot_id)
        check_file_name(name)
        with self._read_snapshot() as conn:
            number = _resolve(conn, slot, version)
            row = conn.execute(
                "SELECT size, checksum FROM version_files WHERE slot = ? AND version = ? "
                "AND name = ?",
                (slot, number, name),
            ).fetchone()
        if row is None:
            raise NotFoundError(f"slot {slot} version {number} has no file {name!r}")
        size, checksum = row
        number = recorded_version(number, slot)
        where = f"slot {slot} version {number} file {name!r}"
        why = real_dir_problem(self.root, slot, number)
        if why is not None:
            raise IntegrityError(f"{where}: {why} (run `ctxstore verify`)")
        data = _read_extra_file(layout.version_dir_str(self._root_str, slot, number), name,
                                size, where)  # fmt: skip
        if len(data) != size or checksum_parts((data,)) != checksum:
            raise IntegrityError(
                f"{where} does not match its recorded size and checksum (run `ctxstore verify`)"
            )
        return data

    def list_slots(self, model_type: str | None = None, group: str | None = None) -> list[SlotInfo]:
        """Every slot with versions, optionally only one model type and/or one group."""
        if model_type is not None:
            check_label(model_type, "model type")
        if group is not None:
            check_label(group, "group")
        rows = self._query(
            "SELECT s.slot, s.model_type, s.current_version, "
            "(SELECT MAX(version) FROM versions v WHERE v.slot = s.slot), "
            "(SELECT COUNT(*) FROM versions v WHERE v.slot = s.slot), s.created_at, s.updated_at "
            "FROM slots s WHERE (?1 IS NULL OR s.model_type = ?1) AND (?2 IS NULL OR EXISTS "
            "(SELECT 1 FROM group_members g WHERE g.name = ?2 AND g.slot = s.slot)) "
            "ORDER BY s.slot",
            (model_type, group),
        )
        return [SlotInfo(*row) for row in rows]

    def list_versions(self, slot_id: int) -> list[VersionInfo]:
        """The slot's stored versions, oldest first; NotFoundError for an unknown slot."""
        slot = check_slot(slot_id)
        with self._read_snapshot() as conn:
            _require_slot(conn, slot)
            aliases: dict[int, list[str]] = {}
            for name, version in conn.execute(
                "SELECT name, version FROM aliases WHERE slot = ? ORDER BY name", (slot,)
            ):
                aliases.setdefault(version, []).append(name)
            rows = conn.execute(
                "SELECT version, created_at, n_tensors, nbytes, pinned FROM versions "
                "WHERE slot = ? ORDER BY version",
                (slot,),
            ).fetchall()
        return [
            VersionInfo(slot, v, created, n, size, bool(pinned), tuple(aliases.get(v, ())))
            for v, created, n, size, pinned in rows
        ]

    def get_aliases(self, slot_id: int) -> dict[str, int]:
        """The slot's aliases (``latest`` included) and the versions they name."""
        slot = check_slot(slot_id)
        with self._read_snapshot() as conn:
            _require_slot(conn, slot)
            aliases = dict(
                conn.execute(
                    "SELECT name, version FROM aliases WHERE slot = ? ORDER BY name", (slot,)
                )
            )
            aliases["latest"] = _resolve(conn, slot, "latest")
        return aliases

    # -- pointers: aliases, rollback, pins --------------------------------------------------

    def set_alias(self, slot_id: int, name: str, version: VersionRef) -> int:
        """Point alias ``name`` at ``version``; returns the version number."""
        slot, alias = check_slot(slot_id), check_alias(name)
        with self._transaction() as conn:
            number = _resolve(conn, slot, version)
            conn.execute(
                "INSERT INTO aliases(slot, name, version) VALUES (?, ?, ?) "
                "ON CONFLICT(slot, name) DO UPDATE SET version = excluded.version",
                (slot, alias, number),
            )
        return number

    def delete_alias(self, slot_id: int, name: str) -> None:
        slot, alias = check_slot(slot_id), check_alias(name)
        with self._transaction() as conn:
            cursor = conn.execute("DELETE FROM aliases WHERE slot = ? AND name = ?", (slot, alias))
            if cursor.rowcount == 0:
                raise NotFoundError(f"slot {slot} has no alias {alias!r}")

    def rollback(self, slot_id: int, version: VersionRef = None) -> int:
        """Move the current pointer to ``version`` (default: the one before current)."""
        slot = check_slot(slot_id)
        with self._transaction() as conn:
            if version is None:
                current = _resolve(conn, slot, None)
                row = conn.execute(
                    "SELECT MAX(version) FROM versions WHERE slot = ? AND version < ?",
                    (slot, current),
                ).fetchone()
                if row[0] is None:
                    raise NotFoundError(f"slot {slot} has no version older than {current}")
                number = recorded_version(row[0], slot)
            else:
                number = _resolve(conn, slot, version)
            conn.execute(
                "UPDATE slots SET current_version = ?, updated_at = ? WHERE slot = ?",
                (number, self._clock(), slot),
            )
        return number

    def pin(self, slot_id: int, version: VersionRef) -> int:
        """Keep ``version`` through retention until unpinned."""
        return self._set_pinned(slot_id, version, True)

    def unpin(self, slot_id: int, version: VersionRef) -> int:
        return self._set_pinned(slot_id, version, False)

    def _set_pinned(self, slot_id: int, version: VersionRef, pinned: bool) -> int:
        slot = check_slot(slot_id)
        with self._transaction() as conn:
            number = _resolve(conn, slot, version)
            conn.execute(
                "UPDATE versions SET pinned = ? WHERE slot = ? AND version = ?",
                (int(pinned), slot, number),
            )
        return number

    # -- retention ------------------------------------------------------------------------

    def apply_retention(self, slot_id: int | None = None) -> list[tuple[int, int]]:
        """Remove versions beyond the newest ``retention`` that nothing else keeps."""
        with self._write_lock:
            conn = self._settled_writer_conn()
            if slot_id is None:
                slots = [row[0] for row in conn.execute("SELECT slot FROM slots")]
            else:
                slots = [check_slot(slot_id)]
            with self._settling_transaction(conn):
                doomed = [pair for slot in slots for pair in self._retain(slot)]
                conn.executemany(_DELETE_VERSION_SQL, doomed)
            self._retire_files(doomed)
        return doomed

    def _retain(self, slot: int) -> list[tuple[int, int]]:
        """The versions of ``slot`` retention removes now (a query; the caller deletes them).

        Kept: the newest ``retention``, the current one, pinned and aliased ones,
        and whatever a connected reader holds. One query: the cutoff is the
        ``retention``-th newest version (none while the slot has fewer), found
        in O(retention) on the primary key. A version number that is no integer (a
        tampered index) is neither counted nor retired: ``verify`` names it.
        """
        candidates = [
            version
            for (version,) in self._writer_conn().execute(
                "SELECT v.version FROM versions v JOIN slots s ON s.slot = v.slot "
                "WHERE v.slot = ?1 AND typeof(v.version) = 'integer' AND v.version < ("
                "SELECT version FROM versions WHERE slot = ?1 AND typeof(version) = 'integer' "
                "ORDER BY version DESC LIMIT 1 OFFSET ?2) "
                "AND v.pinned = 0 AND v.version != s.current_version AND NOT EXISTS ("
                "SELECT 1 FROM aliases a WHERE a.slot = ?1 AND a.version = v.version)",
                (slot, self.retention - 1),
            )
            if type(version) is int  # what names a directory to delete is checked twice
        ]
        if candidates and self.protected_versions:  # asked only when something would go
            protected = self.protected_versions(slot)
            candidates = [version for version in candidates if version not in protected]
        return [(slot, version) for version in candidates]

    def _retire_files(
        self, doomed: list[tuple[int, int]], *, then: Callable[[], object] | None = None
    ) -> None:
        """After the COMMIT that removed their rows: hand their directories to the reaper,
        with ``then`` to run after them (one handover: each wakes the reaper thread).

        Deleting them here would make every commit wait: an unlink needs the
        filesystem journal that the commit's own fsyncs just engaged (0.2 ms for
        a 4 KiB version here), and freeing a large version's blocks and cached
        pages takes 0.25 s per GiB. A committed version's number is never reused, so the
        directories can wait where they are; a crash before the reaper gets to
        them leaves orphans that recovery deletes, and a reader still mapping
        the files keeps its pages.
        """
        if doomed:
            crash_point("retiring")
        if doomed or then is not None:
            dirs = [f"{layout.SLOTS_DIR}/{slot}/{v}" for slot, v in doomed]
            self._reaper_thread().remove(self._root_str, dirs, then=then)

    def _reaper_thread(self) -> Reaper:
        reaper = self._reaper
        if reaper is None or not reaper.usable:
            reaper = self._reaper = Reaper()
        return reaper

    def wait_background(self) -> None:
        """Block until the writer's background chores are done: deleting the files of the
        versions retired so far, preparing the next staging directory."""
        if self._reaper is not None:
            self._reaper.drain()

    # -- integrity ------------------------------------------------------------------------

    def verify(self, slot_id: int | None = None, *, rehash: bool = True) -> list[Problem]:
        """Re-check rows against files and checksums; an empty list means all is well.
        NotFoundError for a slot the store knows nothing of (no row, no directory).

        A writer at work (a daemon beside a read-only verify, or this store's own
        commits) shows passing states: a version directory exists before its row
        commits and after its row is retired, until its files are deleted (about
        0.25 s per GiB). So while a writer may be at work, the problems such states
        look like (orphan, missing file or directory) are checked again every
        ``VERIFY_SETTLE_S`` for up to ``VERIFY_SETTLE_MAX_S``; those that persist are
        reported. Every other kind of damage is reported at once.
        """
        slot = None if slot_id is None else check_slot(slot_id)
        if slot is not None and not layout.slot_dir(self.root, slot).exists():
            with self._read_snapshot() as conn:  # a slot with no directory but a row is damage
                _require_slot(conn, slot)
        self.wait_background()  # retired directories awaiting the reaper are not orphans
        problems = self._verify_once(slot, rehash)
        passing = [p for p in problems if p.kind in PASSING_KINDS and p.slot is not None]
        quiet = self.readonly and not writer_may_be_running(layout.lock_path(self.root))
        if not passing or quiet:
            return problems
        settled = [p for p in problems if p not in passing]
        deadline = time.monotonic() + VERIFY_SETTLE_MAX_S
        while passing and time.monotonic() < deadline:
            time.sleep(VERIFY_SETTLE_S)
            self.wait_background()
            again: dict[tuple[object, ...], Problem] = {}
            for s in sorted({p.slot for p in passing if p.slot is not None}):
                for problem in self._verify_once(s, False):  # these kinds need no hashing
                    again[_problem_key(problem)] = problem
            passing = [again[key] for p in passing if (key := _problem_key(p)) in again]
        return settled + passing

    def _verify_once(self, slot: int | None, rehash: bool) -> list[Problem]:
        try:
            with self._read_snapshot() as conn:
                return verify_store(self.root, conn, slot, rehash=rehash)
        except IntegrityError as exc:  # SQLite cannot read the index: that is the finding
            if not isinstance(exc.__cause__, sqlite3.DatabaseError):
                raise
            return [Problem("index_damaged", f"index unreadable: {exc.__cause__}")]

    def repair(
        self, slot_id: int | None = None, *, problems: list[Problem] | None = None
    ) -> list[Repair]:
        """Move every slot whose current version is damaged back to its newest intact one.

        Damaged versions stay where they are (``verify`` keeps naming them) but
        stop being served. A slot with no intact version is reported and left.
        ``problems``: what a ``verify(slot_id)`` just found (default: verify now);
        a slot whose current version changed since is left as it is. Nothing is
        deleted. The caller announces the moves (the daemon does; see ``ctxstore
        verify``).
        """
        if problems is None:
            problems = self.verify(slot_id)
        damaged: dict[int, set[int]] = {}
        for problem in problems:
            if problem.slot is not None and problem.version is not None:
                damaged.setdefault(problem.slot, set()).add(problem.version)
        repairs: list[Repair] = []
        for slot, bad in sorted(damaged.items()):
            if slot_id is not None and slot != slot_id:
                continue
            try:
                current = self.current_version(slot)
            except IntegrityError as exc:  # not even a number: verify says so, a human decides
                log.warning("repair leaves slot %d: %s", slot, exc)
                continue
            if current is None or current not in bad:
                continue
            numbers = self._query(
                "SELECT version FROM versions WHERE slot = ? AND typeof(version) = 'integer' "
                "AND version < ? ORDER BY version",
                (slot, current),
            )
            target = max((v for (v,) in numbers if v not in bad), default=None)
            if target is None:
                repairs.append(Repair(slot, current, None, sorted(bad)))
                continue
            self.rollback(slot, target)
            repairs.append(Repair(slot, current, target, sorted(bad)))
        return repairs

    # -- verify once per host (ctxstore.integrity) ----------------------------------------

    def check_version(
        self, slot_id: int, version: int, *, rehash: bool = True
    ) -> tuple[list[Problem], list[Identity]]:
        """Hash one version's files against their records: the problems found, and each
        file's identity as it was hashed (position order; complete only when all is well).

        Reads with ``pread`` (a file truncated meanwhile cannot fault this process),
        refuses symlinks and non-regular files. NotFoundError for an unknown version.
        ``rehash=False`` checks each file's type and size and takes its identity
        without reading it: for a version this writer has just committed, whose
        every file it hashed as it wrote it (or compared byte for byte with the
        stored file it linked).
        """
        slot, number = check_slot(slot_id), check_version(version)
        rows = self._query(
            "SELECT manifest FROM versions WHERE slot = ? AND version = ?", (slot, number)
        )
        if not rows:
            raise NotFoundError(f"slot {slot} has no version {number}")
        blob = rows[0][0]
        problems: list[Problem] = []
        identities: list[Identity] = []
        for position, (name, _, _, offset, nbytes, checksum) in enumerate(_read_plan(blob)[0]):
            path = layout.tensor_path_str(self._root_str, slot, number, position)
            try:
                digest, identity = hash_file(path) if rehash else (checksum, stat_file(path))
            except FileNotFoundError:
                found: tuple[str, str] | None = ("missing_file", f"{path} does not exist")
            except OSError as exc:
                found = ("unreadable_file", f"{path}: {exc}")
            else:
                identities.append(identity)
                found = None
                if identity[0] != offset + nbytes:
                    found = ("wrong_size", f"{path} has {identity[0]} bytes, the index says "
                             f"{offset + nbytes}")  # fmt: skip
                elif digest != checksum:
                    found = ("checksum_mismatch", f"{path} does not match its recorded xxh3-128")
            if found is not None:
                problems.append(Problem(*found, slot, number, name))
        return problems, identities

    def record_check(self, slot_id: int, version: int, *, rehash: bool = True) -> list[Problem]:
        """Hash one version (:meth:`check_version`; ``rehash=False``: a version this
        writer just committed, see there) and record the outcome in the index:
        ``verified`` with its files' identities and this boot, or ``damaged``.

        Writer only. The row is written without an fsync of its own (the next
        durable commit carries it): lost in a crash, it only makes readers hash.
        """
        problems, identities = self.check_version(slot_id, version, rehash=rehash)
        if problems:
            self.mark_damaged(slot_id, version, "; ".join(map(str, problems)))
        else:
            files = pack_identities(identities)
            self._write_check(check_slot(slot_id), version, VERIFIED, (boot_id(), files, None))
        return problems

    def mark_damaged(self, slot_id: int, version: int, detail: str) -> None:
        """Record ``version`` damaged: readers refuse it without hashing, verify names it.

        Writer only; the mark goes when retention removes the version.
        """
        number = check_version(version)
        self._write_check(check_slot(slot_id), number, DAMAGED, (None, None, detail[:2000]))

    def _write_check(
        self,
        slot: int,
        version: int,
        state: str,
        found: tuple[str | None, bytes | None, str | None],
    ) -> None:
        """Write one version_checks row: ``found`` is (boot id, file identities, detail)."""
        with self._write_lock:
            conn = self._settled_writer_conn()
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: no fsync for this COMMIT
            try:
                with self._settling_transaction(conn):
                    if not self._version_recorded(conn, slot, version):
                        raise NotFoundError(f"slot {slot} has no version {version}")
                    conn.execute(
                        "INSERT OR REPLACE INTO version_checks(slot, version, state, checked_at, "
                        "boot_id, files, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (slot, version, state, self._clock(), *found),
                    )
            finally:
                conn.execute("PRAGMA synchronous = FULL")

    def damaged_versions(self, slot_id: int | None = None) -> dict[tuple[int, int], str]:
        """(slot, version) -> what was found, for every version recorded damaged."""
        slot = None if slot_id is None else check_slot(slot_id)
        rows = self._query(
            "SELECT slot, version, detail FROM version_checks WHERE state = ? "
            "AND (?2 IS NULL OR slot = ?2) ORDER BY slot, version",
            (DAMAGED, slot),
        )
        return {(s, v): detail or "" for s, v, detail in rows}

    def unverified_current(self) -> list[tuple[int, int]]:
        """Each slot's current version that has no ``verified`` record of this boot (and is
        not recorded damaged): what readers would hash, unless a writer hashes it first."""
        rows = self._query(
            "SELECT s.slot, s.current_version FROM slots s LEFT JOIN version_checks c "
            "ON c.slot = s.slot AND c.version = s.current_version "
            "WHERE s.current_version IS NOT NULL AND (c.state IS NULL OR "
            "(c.state = ? AND (c.boot_id IS NULL OR c.boot_id IS NOT ?))) ORDER BY s.slot",
            (VERIFIED, boot_id()),
        )
        return [(slot, version) for slot, version in rows]

    def newest_intact(self, slot_id: int, below: int) -> int | None:
        """The newest version of the slot older than ``below`` whose files hash right
        (recorded ``verified`` as it is checked; a damaged one is recorded so). Writer only."""
        slot = check_slot(slot_id)
        damaged = self.damaged_versions(slot)
        for info in reversed(self.list_versions(slot)):
            if info.version >= below or (slot, info.version) in damaged:
                continue
            try:
                if not self.record_check(slot, info.version):
                    return info.version
            except NotFoundError:  # retired meanwhile
                continue
        return None


TensorRow = tuple[int, str, str, str, int, int, str]


@dataclass(frozen=True, slots=True)
class Repair:
    """What ``repair`` did to one slot: its pointer moved (or could not), and why."""

    slot: int
    from_version: int
    to_version: int | None
    damaged: list[int]


#: what load_context needs of one version (and a writer's check of it, if any);
#: completed by the version clause
_RECORD_SQL = (
    "SELECT v.version, v.config, v.metadata, v.manifest, c.state, c.boot_id, c.files, c.detail "
    "FROM slots s JOIN versions v ON v.slot = s.slot LEFT JOIN version_checks c "
    "ON c.slot = v.slot AND c.version = v.version WHERE s.slot = ?1 AND v.version = "
)
#: one version's record, its slot's pointer and its aliases; completed by the version clause
_METADATA_SQL = (
    "SELECT v.version, s.model_type, s.current_version, v.created_at, v.config, v.metadata, "
    "v.pinned, (SELECT group_concat(name, ',') FROM (SELECT name FROM aliases a "
    "WHERE a.slot = v.slot AND a.version = v.version ORDER BY name)), v.manifest "
    "FROM slots s JOIN versions v ON v.slot = s.slot WHERE s.slot = ?1 AND v.version = "
)


def _resolve(conn: sqlite3.Connection, slot: int, version: VersionRef) -> int:
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if version is None or version == "current":
        row = conn.execute("SELECT current_version FROM slots WHERE slot = ?", (slot,)).fetchone()
        if row is None or row[0] is None:
            raise NotFoundError(f"slot {slot} has no versions")
        return recorded_version(row[0], slot)
    if version == "latest":
        row = conn.execute("SELECT MAX(version) FROM versions WHERE slot = ?", (slot,)).fetchone()
        if row[0] is None:
            raise NotFoundError(f"slot {slot} has no versions")
        return recorded_version(row[0], slot)
    if isinstance(version, str):
        alias = check_alias(version)
        row = conn.execute(
            "SELECT version FROM aliases WHERE slot = ? AND name = ?", (slot, alias)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"slot {slot} has no alias {alias!r}")
        return recorded_version(row[0], slot)
    number = check_version(version)
    row = conn.execute(
        "SELECT 1 FROM versions WHERE slot = ? AND version = ?", (slot, number)
    ).fetchone()
    if row is None:
        raise NotFoundError(f"slot {slot} has no version {number}")
    return number


def _require_slot(conn: sqlite3.Connection, slot: int) -> None:
    if conn.execute("SELECT 1 FROM slots WHERE slot = ?", (slot,)).fetchone() is None:
        raise NotFoundError(f"slot {slot} does not exist")


class _ReadPlan(NamedTuple):
    """What the read path derives from one manifest, in position order."""

    names: tuple[str, ...]
    #: per tensor: file name, dtype, shape, data offset, data bytes (map_arrays' specs)
    specs: tuple[tuple[str, np.dtype[Any], tuple[int, ...], int, int], ...]


# Stored documents are immutable and the same few versions are read over and
# over, so what is decoded from them is memoized by their exact bytes: no key
# can go stale, and a hit costs a hash instead of a decode. Oversized documents
# are decoded each time rather than kept.
_MEMO_ENTRIES = 256
_MEMO_MAX_LEN = 256 << 10


@lru_cache(maxsize=_MEMO_ENTRIES)
def _memo_read_plan(blob: bytes) -> tuple[Manifest, _ReadPlan]:
    manifest = unpack_manifest(blob)  # every value checked, once per distinct manifest
    plan = _ReadPlan(
        tuple(entry[0] for entry in manifest),
        tuple(
            (layout.tensor_file_name(position), dtype_from_text(dtype), shape, offset, nbytes)
            for position, (_, dtype, shape, offset, nbytes, _) in enumerate(manifest)
        ),
    )
    return manifest, plan


def _read_plan(blob: bytes) -> tuple[Manifest, _ReadPlan]:
    """A version's manifest and how to map it, memoized by the manifest's bytes."""
    if len(_manifest_bytes(blob)) > _MEMO_MAX_LEN:
        return _memo_read_plan.__wrapped__(blob)
    return _memo_read_plan(blob)


@lru_cache(maxsize=_MEMO_ENTRIES)
def _memo_tensor_table(blob: bytes) -> tuple[TensorInfo, ...]:
    return tuple(
        TensorInfo(position, name, dtype_name(dtype), shape, nbytes, checksum)
        for position, (name, dtype, shape, _, nbytes, checksum) in enumerate(unpack_manifest(blob))
    )


def _tensor_table(blob: bytes) -> tuple[TensorInfo, ...]:
    """A version's tensor table, memoized by its manifest's bytes."""
    if len(_manifest_bytes(blob)) > _MEMO_MAX_LEN:
        return _memo_tensor_table.__wrapped__(blob)
    return _memo_tensor_table(blob)


def _manifest_bytes(blob: object) -> bytes:
    """A stored manifest as read from the index: bytes, or IntegrityError."""
    if type(blob) is not bytes:
        raise IntegrityError(f"stored tensor manifest is a {type(blob).__name__}, not bytes")
    return blob


def _verify_mapped(
    slot: int, version: int, manifest: Manifest, weights: Mapping[str, Array]
) -> None:
    """Re-hash each mapped file (header and data: the whole map) against the manifest,
    and compare its .npy header with the recorded dtype, shape and data offset.

    The checksum covers the file's bytes, not how the index says to read them: a
    record whose dtype or shape was changed to others of the same size would read
    the right bytes as wrong numbers, so the header the file was written with
    decides (it is in the pages being hashed anyway).
    """
    for name, _, shape, offset, _, checksum in manifest:
        array = weights[name]
        mapped: object = array.base
        matches = False
        if isinstance(mapped, mmap.mmap):
            with memoryview(mapped) as view:
                matches = checksum_parts((view,)) == checksum
        if not matches:
            raise IntegrityError(
                f"slot {slot} version {version} tensor {name!r} does not match its "
                "recorded checksum (run `ctxstore verify`)"
            )
        _check_mapped_header(slot, version, name, array, shape=shape, offset=offset)


#: (file identity, dtype, shape, data offset) whose .npy header this process found to
#: agree: a file keeps its header while it keeps its identity, so a file shared by many
#: versions (deduplicated by hard links) or a version mapped again is checked once
_HEADERS_AGREED: dict[tuple[Identity, np.dtype[Any], tuple[int, ...], int], None] = {}
_HEADERS_AGREED_MAX = 1 << 16


def _check_mapped_headers(
    slot: int,
    version: int,
    manifest: Manifest,
    weights: Mapping[str, Array],
    stats: list[os.stat_result],
) -> None:
    """Only the .npy header check of :func:`_verify_mapped`: for a version served on a
    writer's verified record, whose bytes are vouched for but whose index rows may
    have been changed since (the first page of each file; no hash). ``stats``: each
    mapped file's fstat, in manifest order; a file whose identity already passed the
    same comparison in this process is not read again."""
    agreed = _HEADERS_AGREED
    for (name, _, shape, offset, _, _), st in zip(manifest, stats, strict=True):
        array = weights[name]
        key = (identity_of(st), array.dtype, shape, offset)
        if key in agreed:
            continue
        _check_mapped_header(slot, version, name, array, shape=shape, offset=offset)
        if len(agreed) >= _HEADERS_AGREED_MAX:
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):  # other threads
                del agreed[next(iter(agreed))]
        agreed[key] = None


def _check_mapped_header(
    slot: int, version: int, name: str, array: Array, *, shape: tuple[int, ...], offset: int
) -> None:
    mapped: object = array.base
    header = b""
    if isinstance(mapped, mmap.mmap):
        with memoryview(mapped) as view:
            header = bytes(view[:offset])  # offset: checked to lie within the map
    try:
        check_npy_header(header, array.dtype, shape, offset)
    except IntegrityError as exc:
        raise IntegrityError(
            f"slot {slot} version {version} tensor {name!r}: its file's .npy header "
            f"disagrees with the index ({exc}; run `ctxstore verify`)"
        ) from None


def _same_identities(stats: list[os.stat_result], recorded: object) -> bool:
    """Whether the mapped files are the ones a writer hashed: same size, mtime, inode, device."""
    identities = unpack_identities(recorded)
    return identities is not None and identities == tuple(identity_of(st) for st in stats)


def _dump_json(value: Mapping[str, Any]) -> str:
    return _ENCODER.encode(thaw_json(value)) if value else "{}"


def _load_json(text: str, what: str) -> Mapping[str, Any]:
    """A stored config or metadata document, frozen, memoized by its text."""
    if len(text) > _MEMO_MAX_LEN:
        return _decode_json(text, what)
    return _memo_json(text, what)


def _decode_json(text: str, what: str) -> Mapping[str, Any]:
    """Decode and freeze a stored document (it was validated when it was committed)."""
    try:
        value = _DECODER.decode(text)
    except (ValueError, TypeError) as exc:
        raise IntegrityError(f"stored {what} is unreadable: {exc}") from exc
    if value is None:
        return _EMPTY
    if type(value) is not dict:
        raise IntegrityError(f"stored {what} is a {type(value).__name__}, not a JSON object")
    frozen: Mapping[str, Any] = freeze_trusted_json(value)
    return frozen


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a finite number")


_memo_json = lru_cache(maxsize=_MEMO_ENTRIES)(_decode_json)
_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _problem_key(problem: Problem) -> tuple[object, ...]:
    """The same problem in two passes of verify (its wording may differ)."""
    return (problem.kind, problem.slot, problem.version, problem.tensor)


_DELETE_VERSION_SQL = "DELETE FROM versions WHERE slot = ? AND version = ?"


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)  # one, not one per json.loads
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # and one per dumps


def _read_extra_file(version_dir: str, name: str, size: int, where: str) -> bytes:
    """At most ``size`` + 1 bytes of ``files/<name>`` under a version directory, opened
    relative to it without following a link (b"" when its size is not ``size``)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    opened: list[int] = []
    try:
        opened.append(os.open(version_dir, flags | os.O_DIRECTORY))
        opened.append(os.open(layout.FILES_DIR, flags | os.O_DIRECTORY, dir_fd=opened[-1]))
        opened.append(os.open(name, flags | os.O_NONBLOCK, dir_fd=opened[-1]))
        status = os.fstat(opened[-1])
        if not stat.S_ISREG(status.st_mode) or status.st_size != size:
            return b""
        return os.pread(opened[-1], size + 1, 0) if size else b""
    except FileNotFoundError:
        raise IntegrityError(f"{where} is missing (run `ctxstore verify`)") from None
    except OSError as exc:
        raise IntegrityError(
            f"{where} cannot be read: {exc.strerror} (run `ctxstore verify`)"
        ) from None
    finally:
        for fd in opened:
            os.close(fd)


def _replace_with_link(source: str, path: str) -> bool:
    """Replace the staged file ``path`` by a hard link to ``source``; False if it cannot be."""
    temporary = f"{path}.link"
    if not hard_link(source, temporary):
        return False
    try:
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise StorageError(exc.errno, f"cannot link {source} to {path}: {exc.strerror}") from exc
    return True


def _same_bytes(path: str, header: bytes, data: memoryview) -> bool:
    """True when the file at ``path`` holds exactly ``header`` + ``data``."""
    try:
        size = len(header) + data.nbytes
        stored = map_array(path, np.dtype(np.uint8), (size,), 0, size)
    except (NotFoundError, IntegrityError):
        return False
    if stored[: len(header)].tobytes() != header:
        return False
    return bool(np.array_equal(stored[len(header) :], np.frombuffer(data, dtype=np.uint8)))


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
