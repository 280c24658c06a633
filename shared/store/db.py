"""SQLite connections and transactions with the settings the store relies on.

WAL mode so readers never block the writer, synchronous=FULL so COMMIT is the
durable commit point, foreign keys on, a busy timeout instead of instant
SQLITE_BUSY. Connections run in autocommit mode; every write goes through
:func:`transaction`, which takes the write lock up front (BEGIN IMMEDIATE).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import IntegrityError, NotFoundError, StorageError
from .forksafe import FORK_GUARD, ForkSafeConnection

BUSY_TIMEOUT_MS = 10_000


def connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """Open ``path``; a read-only connection never creates or writes the database."""
    if readonly:
        if not path.exists():
            raise NotFoundError(f"no store index at {path}")
        uri = f"file:{path}?mode=ro"
    else:
        uri = f"file:{path}?mode=rwc"
    try:
        with FORK_GUARD:  # a read connection's statements are guarded by its class
            conn = sqlite3.connect(
                uri,
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=BUSY_TIMEOUT_MS / 1000,
                factory=ForkSafeConnection if readonly else sqlite3.Connection,
            )
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
            if not readonly:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
    except sqlite3.OperationalError as exc:
        raise IntegrityError(f"cannot open store index {path}: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise damaged_index(path, exc) from exc
    return conn


def damaged_index(path: Path, exc: sqlite3.DatabaseError) -> IntegrityError:
    """What to say when SQLite finds the index file itself damaged: what, and what to do."""
    return IntegrityError(
        f"the store index {path} is damaged ({exc}); ctxstore can neither read nor repair "
        f"it. Stop the daemon, move {path.name} (and {path.name}-wal, {path.name}-shm) "
        "aside and restore them from a backup; the tensor files under slots/ are plain "
        ".npy files that numpy.load reads"
    )


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT; ROLLBACK and re-raise on any error.

    sqlite3 errors are translated: a damaged file becomes IntegrityError, an
    I/O or full-disk failure StorageError. Nothing of the transaction is
    visible unless COMMIT returned.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        raise StorageError(f"cannot start a write transaction: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise translate_sqlite_error(exc) from exc
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.DatabaseError):
            raise translate_sqlite_error(exc) from exc
        raise


def overwrite_stray_frames(conn: sqlite3.Connection) -> None:
    """Commit one durable write (the schema version, unchanged).

    SQLite appends it where the WAL's valid frames end, so whatever a failed
    COMMIT wrote beyond them (frames with a commit marker whose sync failed,
    invisible now but replayed by the next WAL recovery) is overwritten or cut
    off from the checksum chain: it can never come back.
    """
    with transaction(conn):
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        conn.execute(f"PRAGMA user_version = {int(version)}")


def translate_sqlite_error(exc: sqlite3.DatabaseError) -> Exception:
    """Map a sqlite3 error to the ctxstore class that says whose fault it is."""
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and (
        "disk" in text or "I/O" in text or "full" in text
    ):
        return StorageError(f"index write failed: {text}")
    if isinstance(exc, sqlite3.IntegrityError):
        return IntegrityError(f"index constraint failed: {text}")
    if isinstance(exc, sqlite3.OperationalError):
        return StorageError(f"index operation failed: {text}")
    return IntegrityError(
        f"the store index is damaged or unreadable ({text}): `ctxstore verify` says what it "
        "finds; an index SQLite cannot read must be restored from a backup"
    )
