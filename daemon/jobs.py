"""The daemon's build-job queue: persistent in the index, priority-ordered, bounded, retried.

A job asks for one build: a node type and its config, for a slot. It lives in
the ``jobs`` table of the store's index, so a restart loses no queued job. Its
states and what moves it between them::

    pending    -> processing   a worker claims it (highest priority, then oldest; retry time due)
    pending    -> cancelled    cancel()
    processing -> done         run() returned the committed version
    processing -> pending      the attempt failed and attempts remain (a retry time is set),
                               or stop() / a restart after a crash interrupted it
    processing -> failed       attempts used up, or a permanent error

The queue hands the highest-priority eligible job (then the first submitted)
to one of ``concurrency`` asyncio workers, which awaits ``run(job)``: the
daemon's build + commit, returning the committed version. A failed attempt is
retried after ``min(backoff_max, backoff_initial * 2**(attempt - 1)) * (0.5 +
jitter / 2)`` seconds until ``max_attempts``; InvalidInputError,
NotFoundError, ConflictError and PermissionDeniedError fail the job at once
(retrying a bad config, a missing file, a model-type clash or a file outside
the import roots cannot help). What can be known at submission is refused
there instead: a file import whose file does not exist is never queued.

Every SQL statement runs on the store's connections: writes through
``store.write_transaction()``, which shares the commit path's write lock, so
the workers make them in a worker thread and the event loop never waits for
a commit in progress. Time is injected (``clock``, ``sleep``, ``jitter``), so
tests drive retries without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, TypeGuard, get_args

from ctxstore.errors import (
    ClosedError,
    ConflictError,
    CtxStoreError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    WaitTimeoutError,
)
from ctxstore.nodes import get_node_type
from ctxstore.store import PersistentStore
from ctxstore.validation import check_slot, check_version, freeze_mapping, thaw_json

log = logging.getLogger("ctxstore.daemon.jobs")

JobState = Literal["pending", "processing", "done", "failed", "cancelled"]
JOB_STATES: tuple[JobState, ...] = get_args(JobState)
FINISHED_STATES: frozenset[str] = frozenset({"done", "failed", "cancelled"})
#: errors that no retry can mend: the job fails on the attempt that raised them (a missing
#: file is NotFoundError: it does not appear by trying again a few seconds later)
PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    InvalidInputError,
    NotFoundError,
    ConflictError,
    PermissionDeniedError,
)

MIN_PRIORITY, MAX_PRIORITY = -(2**31), 2**31 - 1
MAX_JOB_ID = 2**63 - 1
MAX_LIST = 10_000
MAX_ERROR_CHARS = 2_000
#: progress is written when it moved by this much, or after PROGRESS_INTERVAL seconds
PROGRESS_STEP = 0.05
PROGRESS_INTERVAL = 2.0
DEFAULT_STOP_TIMEOUT = 30.0
DEFAULT_KEEP_FINISHED = 10_000
DEFAULT_MAX_PENDING = 100_000

Runner = Callable[["Job"], Awaitable[int]]

_COLUMNS = (
    "id, slot, node_type, config, priority, state, attempts, max_attempts, progress, "
    "error, version, created_at, updated_at, next_attempt_at"
)
_SELECT = "SELECT " + _COLUMNS + " FROM jobs"  # noqa: S608 - a constant column list
_RETURNING = " RETURNING " + _COLUMNS


@dataclass(frozen=True, slots=True)
class Job:
    """One build job as stored; ``config`` is the frozen config the caller submitted."""

    id: int
    slot: int
    node_type: str
    config: Mapping[str, Any]
    priority: int
    state: JobState
    attempts: int
    max_attempts: int
    progress: float
    error: str | None
    version: int | None
    created_at: float
    updated_at: float
    next_attempt_at: float | None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (the config as dicts and lists)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["config"] = thaw_json(self.config)
        return out


def backoff_delay(attempt: int, initial: float, maximum: float, jitter: float) -> float:
    """Seconds to wait after the ``attempt``-th failed attempt (jitter in [0, 1])."""
    base = min(maximum, initial * 2.0 ** min(attempt - 1, 64))
    return base * (0.5 + min(max(jitter, 0.0), 1.0) / 2)


def check_job_id(job_id: object) -> int:
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 1 <= job_id <= MAX_JOB_ID:
        raise InvalidInputError(f"job id must be a positive integer, got {job_id!r:.40}")
    return job_id


def check_priority(priority: object) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidInputError(f"priority must be an integer, got {priority!r:.40}")
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidInputError(
            f"priority must be between {MIN_PRIORITY} and {MAX_PRIORITY}, got {priority}"
        )
    return priority


def check_progress(progress: object) -> float:
    if not _is_number(progress) or not 0 <= progress <= 1:
        raise InvalidInputError(f"progress must be a number in [0, 1], got {progress!r:.40}")
    return float(progress)


def describe_error(exc: BaseException) -> str:
    """The message stored with a failed attempt: the class and what it said, bounded."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _job_from_row(row: tuple[Any, ...]) -> Job:
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
        self.store = store
        self.clock = clock

    # -- reads (the thread's read connection: never waits for the writer) -----------------

    def get(self, job_id: int) -> Job:
        rows = self.store.read_query(_SELECT + " WHERE id = ?", (job_id,))
        if not rows:
            raise NotFoundError(f"no job {job_id}")
        return _job_from_row(rows[0])

    def recent(self, state: str | None, limit: int) -> list[Job]:
        rows = self.store.read_query(
            _SELECT + " WHERE ?1 IS NULL OR state = ?1 ORDER BY id DESC LIMIT ?2",
            (state, limit),
        )
        return [_job_from_row(row) for row in rows]

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
        return _job_from_row(rows[0])

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
        return _job_from_row(rows[0])

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
                return _job_from_row(rows[0]), None
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


@dataclass(slots=True)
class _Live:
    """Progress of a job in flight: the newest value and the last one written."""

    progress: float = 0.0
    written: float = 0.0
    written_at: float = 0.0


class JobQueue:
    """Build jobs: submitted from any thread, run by ``concurrency`` workers on the event loop.

    ``run(job)`` builds and commits, returning the committed version; it may
    report progress through :meth:`set_progress` (from the loop or from its
    build thread). ``start()`` and ``stop()`` belong to the daemon's loop; the
    other methods are synchronous and thread-safe. Reads never wait for the
    writer; ``submit`` and ``cancel`` take the store's write lock, so an event
    loop handler should call them through ``asyncio.to_thread``.
    """

    def __init__(
        self,
        store: PersistentStore,
        run: Runner,
        *,
        concurrency: int = 2,
        max_attempts: int = 3,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        keep_finished: int = DEFAULT_KEEP_FINISHED,
        max_pending: int = DEFAULT_MAX_PENDING,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        _check_count("concurrency", concurrency, 1)
        _check_count("max_attempts", max_attempts, 1)
        _check_count("keep_finished", keep_finished, 0)
        _check_count("max_pending", max_pending, 1)
        if not _is_number(backoff_initial) or not backoff_initial > 0:
            raise InvalidInputError(f"backoff_initial must be > 0 seconds, got {backoff_initial!r}")
        if not _is_number(backoff_max) or not backoff_max >= backoff_initial:
            raise InvalidInputError(
                f"backoff_max must be >= backoff_initial ({backoff_initial}), got {backoff_max!r}"
            )
        self.table = JobTable(store, clock)
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.keep_finished = keep_finished
        self.max_pending = max_pending
        self._run = run
        self._clock = clock
        self._sleep = sleep
        self._jitter = jitter
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._changed: asyncio.Event | None = None  # replaced by every _wake()
        self._workers: list[asyncio.Task[None]] = []
        self._stop = threading.Event()  # set from stop() until the next start()
        self._running: dict[int, asyncio.Task[int]] = {}
        self._live: dict[int, _Live] = {}
        self._live_lock = threading.Lock()
        self._writes: set[asyncio.Future[None]] = set()

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """True from stop() until the next start(): workers take no new job."""
        return self._stop.is_set()

    async def start(self) -> None:
        """Re-queue what a dead daemon left 'processing', then start the workers."""
        if self._workers:
            raise ConflictError("the job queue is already running")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stop.clear()
        self._wake()  # a wait() begun before start() looks again, on this loop's event
        requeued, failed = await asyncio.to_thread(
            self.table.requeue_interrupted, self.keep_finished
        )
        if requeued:
            log.warning(
                "re-queued %d job(s) interrupted by a daemon stop: %s", len(requeued), requeued
            )
        if failed:
            log.error("jobs %s failed: the daemon stopped during their last attempt", failed)
        self._workers = [
            asyncio.create_task(self._worker(n), name=f"ctxstore-job-worker-{n}")
            for n in range(self.concurrency)
        ]

    async def stop(self, timeout: float | None = DEFAULT_STOP_TIMEOUT) -> None:
        """Take no new job; let builds in flight finish for up to ``timeout`` seconds.

        Builds still running then are cancelled and their jobs go back to
        pending (the interrupted attempt is not counted), to run at the next
        start. Returns once every worker has exited.
        """
        self._stop.set()
        self._wake()
        workers, self._workers = self._workers, []
        if workers:
            _, busy = await asyncio.wait(workers, timeout=timeout)
            if busy:
                log.warning(
                    "job queue stopping: cancelling %d build(s) still running after %s s; "
                    "they run again at the next start",
                    len(self._running),
                    timeout,
                )
                for task in list(self._running.values()):
                    task.cancel()
                await asyncio.wait(workers)
        if self._writes:
            await asyncio.wait(list(self._writes))

    # -- the operator's surface ---------------------------------------------------------------

    def submit(
        self,
        slot: int,
        node_type: str,
        config: Mapping[str, Any] | None = None,
        priority: int = 0,
    ) -> Job:
        """Validate and queue a build; raises before anything is stored when a part is bad.

        NotFoundError for an unknown node type (the message lists the known
        ones) or a file to import that does not exist (the message names it);
        InvalidInputError for a bad slot, config or priority; ConflictError
        when ``max_pending`` jobs are already waiting.
        """
        slot = check_slot(slot)
        node_class = get_node_type(node_type)
        plain = thaw_json(freeze_mapping(config, "job config"))
        full = node_class.validate_config(plain)
        priority = check_priority(priority)
        node_class.check_inputs(full)  # last: the only check that looks at the disk
        config_json = json.dumps(plain, separators=(",", ":"), allow_nan=False)
        job = self.table.insert(
            slot,
            node_type,
            config_json,
            priority=priority,
            max_attempts=self.max_attempts,
            max_pending=self.max_pending,
        )
        log.info(
            "job %d queued: %s build for slot %d (priority %d)", job.id, node_type, slot, priority
        )
        self._notify()
        return job

    def get(self, job_id: int) -> Job:
        return self._with_live_progress(self.table.get(check_job_id(job_id)))

    def list(self, state: str | None = None, limit: int = 100) -> list[Job]:
        """Jobs newest first, optionally only those in ``state``."""
        if state is not None and state not in JOB_STATES:
            raise InvalidInputError(
                f"job state must be one of {', '.join(JOB_STATES)}; got {state!r:.40}"
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
            raise InvalidInputError(
                f"limit must be an integer in [1, {MAX_LIST}], got {limit!r:.40}"
            )
        return [self._with_live_progress(job) for job in self.table.recent(state, limit)]

    def cancel(self, job_id: int) -> Job:
        """Cancel a pending job; ConflictError (naming its state) for any other."""
        job = self.table.cancel(check_job_id(job_id), self.keep_finished)
        log.info("job %d cancelled", job.id)
        self._notify()
        return job

    def depth(self) -> int:
        """How many jobs are pending (waiting or backing off)."""
        return self.table.depth()

    def counts(self) -> dict[str, int]:
        """Jobs per state, every state present."""
        return self.table.counts()

    def set_progress(self, job_id: int, progress: float) -> None:
        """Record how far a running build is (0..1); writes to the index are coalesced.

        The newest value is visible to :meth:`get` at once; the row is written
        when the value moved by PROGRESS_STEP, after PROGRESS_INTERVAL seconds,
        or on reaching 1. NotFoundError when the job is not running here (its
        build was cancelled, say): a build thread may take that as a signal to stop.
        """
        value = check_progress(progress)
        with self._live_lock:
            live = self._live.get(job_id)
            if live is None:
                raise NotFoundError(f"job {job_id!r:.40} is not being built by this queue")
            live.progress = value
            now = self._clock()
            if value == live.written or not (
                abs(value - live.written) >= PROGRESS_STEP
                or value == 1.0
                or now - live.written_at >= PROGRESS_INTERVAL
            ):
                return
            live.written, live.written_at = value, now
        if self._loop is not None and threading.get_ident() == self._loop_thread:
            write = asyncio.ensure_future(asyncio.to_thread(self._write_progress, job_id, value))
            self._writes.add(write)
            write.add_done_callback(self._writes.discard)
        else:  # the build's own thread: it can wait for the write lock
            self._write_progress(job_id, value)

    async def wait(self, job_id: int, timeout: float | None = None) -> Job:
        """The job once it is done, failed or cancelled; WaitTimeoutError after ``timeout``."""
        job_id = check_job_id(job_id)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    changed = self._event()
                    job = self.get(job_id)
                    if job.finished:
                        return job
                    await changed.wait()
        except TimeoutError:
            raise WaitTimeoutError(f"job {job_id} did not finish within {timeout} s") from None

    # -- workers ------------------------------------------------------------------------------

    async def _worker(self, number: int) -> None:
        while not self._stop.is_set():
            try:
                job = await self._next_job()
                if job is None:
                    return
                await self._execute(job)
            except ClosedError:
                log.error("job worker %d: the store is closed; the worker stops", number)
                return
            except Exception:
                log.exception("job worker %d: unexpected error; pausing", number)
                await self._wait(self._event(), self.backoff_initial)

    async def _next_job(self) -> Job | None:
        """The next job to run, waiting for a submit or a due retry; None once stopping."""
        while not self._stop.is_set():
            changed = self._event()  # taken before looking: a submit after the look wakes us
            job, wake_at = await asyncio.to_thread(self.table.claim, self.backoff_max)
            if job is not None:
                if self._stop.is_set():
                    await asyncio.to_thread(self.table.release, job.id)
                    return None
                return job
            if wake_at is None:
                await self._wait(changed, None)
                continue
            delay = min(wake_at - self._clock(), self.backoff_max)
            if delay > 0:
                await self._wait(changed, delay)
        return None

    async def _wait(self, changed: asyncio.Event, delay: float | None) -> None:
        """Until ``changed`` is set or ``delay`` seconds (the injected sleep) have passed."""
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(changed.wait())]
        if delay is not None:
            waiters.append(asyncio.ensure_future(self._sleep(delay)))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _execute(self, job: Job) -> None:
        log.info(
            "job %d: %s build for slot %d, attempt %d of %d",
            job.id,
            job.node_type,
            job.slot,
            job.attempts,
            job.max_attempts,
        )
        with self._live_lock:
            self._live[job.id] = _Live(written_at=self._clock())
        task: asyncio.Task[int] = asyncio.ensure_future(self._run(job))
        self._running[job.id] = task
        try:
            try:
                version = await task
            except asyncio.CancelledError as exc:
                await self._cancelled(job, exc)
            except PERMANENT_ERRORS as exc:
                await self._failed(job, exc, retry=False)
            except Exception as exc:
                await self._failed(job, exc, retry=True)
            else:
                await self._done(job, version)
        finally:
            del self._running[job.id]
            with self._live_lock:
                self._live.pop(job.id, None)
            self._notify()

    async def _cancelled(self, job: Job, exc: asyncio.CancelledError) -> None:
        """The build was cancelled: by stop(), with this worker, or by something inside run()."""
        current = asyncio.current_task()
        if current is not None and current.cancelling():  # this worker is going: no more awaits
            try:
                self.table.release(job.id)
            except CtxStoreError as error:  # the next start() re-queues it
                log.warning("job %d interrupted; left processing: %s", job.id, error)
            else:
                log.warning("job %d interrupted with its worker; pending again", job.id)
            raise exc
        if self._stop.is_set():
            await asyncio.to_thread(self.table.release, job.id)
            log.warning("job %d interrupted by the queue's stop; pending again", job.id)
            return
        # run() let a cancellation of its own escape: an error of that attempt, not a stop
        await self._failed(job, RuntimeError("the build was cancelled"), retry=True)

    async def _done(self, job: Job, version: object) -> None:
        try:
            number = check_version(version)
        except InvalidInputError:
            await self._failed(
                job, InvalidInputError(f"run() returned {version!r:.60}, not a version"), False
            )
            return
        await asyncio.to_thread(self.table.finish_done, job.id, number, self.keep_finished)
        log.info("job %d done: slot %d version %d", job.id, job.slot, number)

    async def _failed(self, job: Job, exc: Exception, retry: bool) -> None:
        error = describe_error(exc)
        if retry and job.attempts < job.max_attempts:
            delay = backoff_delay(
                job.attempts, self.backoff_initial, self.backoff_max, self._jitter()
            )
            await asyncio.to_thread(self.table.retry_later, job.id, error, delay)
            log.warning(
                "job %d attempt %d of %d failed (%s); retrying in %.3g s",
                job.id,
                job.attempts,
                job.max_attempts,
                error,
                delay,
            )
            return
        await asyncio.to_thread(self.table.finish_failed, job.id, error, self.keep_finished)
        log.error("job %d failed after %d attempt(s): %s", job.id, job.attempts, error)

    # -- wake-ups and progress ------------------------------------------------------------------

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _wake(self) -> None:
        """On the loop: every worker and waiter looks again (the queue changed)."""
        event, self._changed = self._changed, asyncio.Event()
        if event is not None:
            event.set()

    def _notify(self) -> None:
        """:meth:`_wake` from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            self._wake()
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(self._wake)

    def _with_live_progress(self, job: Job) -> Job:
        if job.state != "processing":
            return job
        with self._live_lock:
            live = self._live.get(job.id)
            progress = None if live is None else live.progress
        return (
            job if progress is None or progress == job.progress else replace(job, progress=progress)
        )

    def _write_progress(self, job_id: int, progress: float) -> None:
        try:
            self.table.write_progress(job_id, progress)
        except CtxStoreError as exc:  # progress is advisory: a failed write never fails the build
            log.warning("job %d: progress not recorded: %s", job_id, exc)


def _check_count(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r:.40}")


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
