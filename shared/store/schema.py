"""The index schema and its migrations, versioned by SQLite's user_version.

Each migration is a list of statements that takes the schema from version
``n - 1`` to ``n``; a writer applies the missing ones in one transaction at
open. A store written by a newer ctxstore is refused rather than misread.
"""

from __future__ import annotations

import sqlite3

from ..errors import IntegrityError
from .db import transaction

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE slots (
            slot INTEGER PRIMARY KEY CHECK (slot >= 0),
            model_type TEXT,
            current_version INTEGER,
            next_version INTEGER NOT NULL DEFAULT 1,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE versions (
            slot INTEGER NOT NULL REFERENCES slots(slot),
            version INTEGER NOT NULL CHECK (version >= 1),
            created_at REAL NOT NULL,
            config TEXT NOT NULL,
            metadata TEXT NOT NULL,
            n_tensors INTEGER NOT NULL,
            nbytes INTEGER NOT NULL,
            pinned INTEGER NOT NULL DEFAULT 0,
            manifest BLOB NOT NULL,
            PRIMARY KEY (slot, version)
        ) WITHOUT ROWID""",
        """CREATE TABLE tensors (
            slot INTEGER NOT NULL,
            version INTEGER NOT NULL,
            position INTEGER NOT NULL,
            name TEXT NOT NULL,
            dtype TEXT NOT NULL,
            shape TEXT NOT NULL,
            data_offset INTEGER NOT NULL,
            nbytes INTEGER NOT NULL,
            checksum TEXT NOT NULL,
            PRIMARY KEY (slot, version, position),
            FOREIGN KEY (slot, version) REFERENCES versions(slot, version) ON DELETE CASCADE
        ) WITHOUT ROWID""",
        "CREATE INDEX tensors_by_checksum ON tensors(checksum)",
        """CREATE TABLE aliases (
            slot INTEGER NOT NULL,
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            PRIMARY KEY (slot, name),
            FOREIGN KEY (slot, version) REFERENCES versions(slot, version)
        ) WITHOUT ROWID""",
        "CREATE INDEX aliases_by_version ON aliases(slot, version)",
        """CREATE TABLE hierarchy (
            slot INTEGER PRIMARY KEY CHECK (slot >= 0),
            parent INTEGER REFERENCES hierarchy(slot)
        )""",
        "CREATE INDEX hierarchy_by_parent ON hierarchy(parent)",
        """CREATE TABLE group_members (
            name TEXT NOT NULL,
            slot INTEGER NOT NULL,
            PRIMARY KEY (name, slot)
        ) WITHOUT ROWID""",
        "CREATE INDEX group_members_by_slot ON group_members(slot, name)",
    ),
    # 2: the daemon's persistent build-job queue (ctxstore.daemon.jobs)
    2: (
        """CREATE TABLE jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            slot INTEGER NOT NULL CHECK (slot >= 0),
            node_type TEXT NOT NULL,
            config TEXT NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL
                CHECK (state IN ('pending', 'processing', 'done', 'failed', 'cancelled')),
            attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            max_attempts INTEGER NOT NULL CHECK (max_attempts >= 1),
            progress REAL NOT NULL DEFAULT 0 CHECK (progress >= 0 AND progress <= 1),
            error TEXT,
            version INTEGER,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            next_attempt_at REAL
        )""",
        # the queue order: highest priority first, then first submitted
        "CREATE INDEX jobs_by_state ON jobs(state, priority DESC, id)",
        # the earliest retry a sleeping worker waits for
        "CREATE INDEX jobs_pending_retry ON jobs(next_attempt_at) WHERE state = 'pending'",
        # pruning of old finished jobs, newest kept
        "CREATE INDEX jobs_finished ON jobs(id) WHERE state IN ('done', 'failed', 'cancelled')",
    ),
    # 3: a publisher's idempotency key, committed with its version (ctxstore.daemon.idempotency)
    3: (
        "ALTER TABLE versions ADD COLUMN publish_key TEXT",
        "CREATE UNIQUE INDEX versions_by_publish_key ON versions(publish_key) "
        "WHERE publish_key IS NOT NULL",
    ),
    # 4: what the daemon found when it hashed a version (ctxstore.integrity): 'verified'
    # with each tensor file's identity (readers then skip their own hash), or 'damaged'
    4: (
        """CREATE TABLE version_checks (
            slot INTEGER NOT NULL,
            version INTEGER NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('verified', 'damaged')),
            checked_at REAL NOT NULL,
            boot_id TEXT,
            files BLOB,
            detail TEXT,
            PRIMARY KEY (slot, version),
            FOREIGN KEY (slot, version) REFERENCES versions(slot, version) ON DELETE CASCADE
        ) WITHOUT ROWID""",
    ),
    # 5: extra files that travel with a version (config.json, tokenizer files ...), stored
    # in its directory's files/ and recorded in the version's own transaction
    5: (
        """CREATE TABLE version_files (
            slot INTEGER NOT NULL,
            version INTEGER NOT NULL,
            name TEXT NOT NULL,
            size INTEGER NOT NULL CHECK (size >= 0),
            checksum TEXT NOT NULL,
            PRIMARY KEY (slot, version, name),
            FOREIGN KEY (slot, version) REFERENCES versions(slot, version) ON DELETE CASCADE
        ) WITHOUT ROWID""",
        "CREATE INDEX version_files_by_checksum ON version_files(checksum)",
    ),
}

LATEST = max(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    return version


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the index to :data:`LATEST`; returns the version it started at."""
    with transaction(conn):
        start = schema_version(conn)
        if start > LATEST:
            raise IntegrityError(
                f"store index has schema version {start}; this ctxstore reads up to {LATEST} "
                "(upgrade ctxstore)"
            )
        for target in range(start + 1, LATEST + 1):
            for statement in MIGRATIONS[target]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
    return start


def check_readable(conn: sqlite3.Connection) -> None:
    """A read-only opener's check: the schema must be exactly one it understands."""
    version = schema_version(conn)
    if version == 0:
        raise IntegrityError("store index is empty: no writer has initialised this store")
    if version != LATEST:
        raise IntegrityError(
            f"store index has schema version {version}, this ctxstore expects {LATEST}: "
            "open it once with a writer of this version to migrate it"
            if version < LATEST
            else f"store index has schema version {version}; upgrade ctxstore"
        )
