"""The persistent half of the job queue: the ``jobs`` table of the store's index.

Every statement the queue makes is here, synchronous, on the store's
connections: reads on the calling thread's read connection (they never wait
for the writer), writes through ``store.write_transaction()``, which shares
the commit path's write lock (so the event loop calls them in a thread).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

from ctxstore.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    ReadOnlyError,
)
from ctxstore.store import PersistentStore
from ctxstore.validation import freeze_mapping

from .records import JOB_STATES, Job

_COLUMNS = (
    "id, slot, node_type, config, priority, state, attempts, max_attempts, progress, "
    "error, version, created_at, updated_at, next_attempt_at"
)
_SELECT = "SELECT " + _COLUMNS + " FROM jobs"  # noqa: S608 - a constant column list
_RETURNING = " RETURNING " + _COLUMNS


def job_from_row(row: tuple[Any, ...]) -> Job:
    try:
        config = freeze_mapping(json.loads(row[3]), "job config")
    except (ValueError, InvalidInputError) as exc:
        raise IntegrityError(f"job {row[0]}: stored config is unreadable: {exc}") from exc
    return Job(row[0], row[1], row[2], config, *row[4:])


class JobTable:
    """The jobs table: every statement the queue makes, synchronous, on the store's connections.

    Callable from any thread; each write is one transaction under the store's
    write lock. ``clock`` stamps the rows.
    """

    def __init__(self, store: PersistentStore, clock: Callable[[], float]) -> None:
        if not isinstance(store, PersistentStore):  # a read-only view has no transactions
            raise ReadOnlyError(f"store {store.root} is open read-only: it holds no job queue")
        self.store = store
        self.clock = clock

    # -- reads (the thread's read connection: never waits for the writer) -----------------

    def get(self, job_id: int) -> Job:
        rows = self.store.read_query(_SELECT + " WHERE id = ?", (job_id,))
        if not rows:
            raise NotFoundError(f"no job {job_id}")
        return job_from_row(rows[0])

    def recent(self, state: str | None, limit: int) -> list[Job]:
        rows = self.store.read_query(
            _SELECT + " WHERE ?1 IS NULL OR state = ?1 ORDER BY id DESC LIMIT ?2",
            (state, limit),
        )
        return [job_from_row(row) for row in rows]

    def counts(self) -> dict[str, int]:
        found = dict(self.store.read_query("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
        return {state: int(found.get(state, 0)) for state in JOB_STATES}

    def depth(self) -> int:
        rows = self.store.read_query("SELECT COUNT(*) FROM jobs WHERE state = 'pending'")
        return int(rows[0][0])

    # -- writes -----------------------------------------------------------------------------

    def insert(
        self,
        slot: int,
        node_type: str,
        config_json: str,
        *,
        priority: int,
        max_attempts: int,
        max_pending: int,
    ) -> Job:
        now = self.clock()
        with self.store.write_transaction() as conn:
            (pending,) = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = 'pending'"
            ).fetchone()
            if pending >= max_pending:
                raise ConflictError(
                    f"the job queue is full ({pending} pending jobs); retry when it has drained"
                )
            rows = conn.execute(
                "INSERT INTO jobs(slot, node_type, config, priority, state, attempts, "
                "max_attempts, progress, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, 'pending', 0, ?, 0, ?, ?)" + _RETURNING,
                (slot, node_type, config_json, priority, max_attempts, now, now),
            ).fetchall()
        return job_from_row(rows[0])

    def cancel(self, job_id: int, keep_finished: int) -> Job:
        with self.store.write_transaction() as conn:
            found = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchall()
            if not found:
                raise NotFoundError(f"no job {job_id}")
            if found[0][0] != "pending":
                raise ConflictError(
                    f"job {job_id} is {found[0][0]}; only a pending job can be cancelled"
                )
            rows = conn.execute(
                "UPDATE jobs SET state = 'cancelled', next_attempt_at = NULL, "  # noqa: S608
                "updated_at = ? WHERE id = ?" + _RETURNING,
                (self.clock(), job_id),
            ).fetchall()
            _prune(conn, keep_finished)
        return job_from_row(rows[0])

    def claim(self, retry_horizon: float) -> tuple[Job | None, float | None]:
        """Take the next eligible pending job, or say when the earliest retry is due.

        Eligible: no retry time, or one that has come. A retry time further
        ahead than ``retry_horizon`` (the longest backoff) can only come from a
        wall clock that went back: such a job is taken now rather than stranded.
        """
        now = self.clock()
        with self.store.write_transaction() as conn:
            rows = conn.execute(
                "UPDATE jobs SET state = 'processing', attempts = attempts + 1, "  # noqa: S608
                "progress = 0, next_attempt_at = NULL, updated_at = ?1 WHERE id = (SELECT id "
                "FROM jobs WHERE state = 'pending' AND (next_attempt_at IS NULL OR "
                "next_attempt_at <= ?1 OR next_attempt_at > ?1 + ?2) "
                "ORDER BY priority DESC, id LIMIT 1)" + _RETURNING,
                (now, retry_horizon),
            ).fetchall()
            if rows:
                return job_from_row(rows[0]), None
            # INDEXED BY: without statistics the planner would walk every pending row
            (wake_at,) = conn.execute(
                "SELECT MIN(next_attempt_at) FROM jobs INDEXED BY jobs_pending_retry "
                "WHERE state = 'pending'"
            ).fetchone()
        return None, wake_at

    def finish_done(self, job_id: int, version: int, keep_finished: int) -> None:
        with self.store.write_transaction() as conn:
            conn.execute(
                "UPDATE jobs SET state = 'done', version = ?, progress = 1, error = NULL, "
                "next_attempt_at = NULL, updated_at = ? WHERE id = ? AND state = 'processing'",
                (version, self.clock(), job_id),
            )
            _prune(conn, keep_finished)

    def finish_failed(self, job_id: int, error: str, keep_finished: int) -> None:
        with self.store.write_transaction() as conn:
            conn.execute(
                "UPDATE jobs SET state = 'failed', error = ?, next_attempt_at = NULL, "
                "updated_at = ? WHERE id = ? AND state = 'processing'",
                (error, self.clock(), job_id),
            )
            _prune(conn, keep_finished)

    def retry_later(self, job_id: int, error: str, delay: float) -> float:
        """Back to pending with the attempt's error; eligible again ``delay`` seconds from now."""
        now = self.clock()
        with self.store.write_transaction() as conn:
            conn.execute(
                "UPDATE jobs SET state = 'pending', error = ?, progress = 0, "
                "next_attempt_at = ?, updated_at = ? WHERE id = ? AND state = 'processing'",
                (error, now + delay, now, job_id),
            )
        return now + delay

    def release(self, job_id: int) -> None:
        """An attempt interrupted by us (stop): pending again, the attempt not counted."""
        with self.store.write_transaction() as conn:
            conn.execute(
                "UPDATE jobs SET state = 'pending', attempts = MAX(attempts - 1, 0), "
                "progress = 0, next_attempt_at = NULL, updated_at = ? "
                "WHERE id = ? AND state = 'processing'",
                (self.clock(), job_id),
            )

    def requeue_interrupted(self, keep_finished: int) -> tuple[list[int], list[int]]:
        """After a daemon died: 'processing' rows go back to pending; (requeued, failed) ids.

        The interrupted attempt counts: a job whose build kills the daemon
        every time must not crash-loop it forever, so one that had used its
        last attempt fails instead.
        """
        now = self.clock()
        with self.store.write_transaction() as conn:
            rows = conn.execute(
                "SELECT id, attempts, max_attempts FROM jobs WHERE state = 'processing'"
            ).fetchall()
            exhausted = [job_id for job_id, attempts, most in rows if attempts >= most]
            requeued = [job_id for job_id, attempts, most in rows if attempts < most]
            conn.executemany(
                "UPDATE jobs SET state = 'pending', progress = 0, next_attempt_at = NULL, "
                "updated_at = ? WHERE id = ?",
                [(now, job_id) for job_id in requeued],
            )
            conn.executemany(
                "UPDATE jobs SET state = 'failed', next_attempt_at = NULL, updated_at = ?, "
                "error = ? WHERE id = ?",
                [
                    (now, "interrupted: the daemon stopped during its last attempt", job_id)
                    for job_id in exhausted
                ],
            )
            _prune(conn, keep_finished)
        return requeued, exhausted

    def write_progress(self, job_id: int, progress: float) -> None:
        with self.store.write_transaction() as conn:
            conn.execute(
                "UPDATE jobs SET progress = ?, updated_at = ? "
                "WHERE id = ? AND state = 'processing'",
                (progress, self.clock(), job_id),
            )


def _prune(conn: sqlite3.Connection, keep_finished: int) -> None:
    """Forget finished jobs beyond the newest ``keep_finished`` (a walk of the partial index)."""
    conn.execute(
        "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs INDEXED BY jobs_finished "
        "WHERE state IN ('done', 'failed', 'cancelled') "
        "ORDER BY id DESC LIMIT -1 OFFSET ?)",
        (keep_finished,),
    )
