"""The build-job queue the daemon holds: what callers submit, list, cancel and wait for.

:class:`JobQueue` validates and stores jobs in the table (``table.py``,
persistent: a restart loses no queued job) and owns the workers that run them
(``workers.py``). ``start()`` and ``stop()`` belong to the daemon's loop; the
other methods are synchronous and thread-safe. Time is injected (``clock``,
``sleep``, ``jitter``), so tests drive retries without sleeping.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

from ctxstore.errors import (
    ConflictError,
    CtxStoreError,
    InvalidInputError,
    WaitTimeoutError,
)
from ctxstore.nodes import get_node_type
from ctxstore.store import PersistentStore
from ctxstore.validation import check_slot, freeze_mapping, thaw_json

from .records import (
    DEFAULT_KEEP_FINISHED,
    DEFAULT_MAX_PENDING,
    DEFAULT_STOP_TIMEOUT,
    JOB_STATES,
    MAX_LIST,
    Job,
    Runner,
    check_count,
    check_job_id,
    check_priority,
    check_progress,
    is_number,
)
from .signals import LiveBuilds, Wakeups
from .table import JobTable
from .workers import Workers

log = logging.getLogger("ctxstore.daemon.jobs")


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
        check_count("concurrency", concurrency, 1)
        check_count("max_attempts", max_attempts, 1)
        check_count("keep_finished", keep_finished, 0)
        check_count("max_pending", max_pending, 1)
        if not is_number(backoff_initial) or not backoff_initial > 0:
            raise InvalidInputError(f"backoff_initial must be > 0 seconds, got {backoff_initial!r}")
        if not is_number(backoff_max) or not backoff_max >= backoff_initial:
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
        self._clock = clock
        self._wakeups = Wakeups()
        self._live = LiveBuilds()
        self._workers = Workers(
            self.table,
            run,
            settings=self,
            wakeups=self._wakeups,
            live=self._live,
            clock=clock,
            sleep=sleep,
            jitter=jitter,
        )
        self._writes: set[asyncio.Future[None]] = set()

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """True from stop() until the next start(): workers take no new job."""
        return self._workers.stop_requested.is_set()

    async def start(self) -> None:
        """Re-queue what a dead daemon left 'processing', then start the workers."""
        if self._workers.started:
            raise ConflictError("the job queue is already running")
        self._wakeups.bind()
        self._workers.stop_requested.clear()
        self._wakeups.wake()  # a wait() begun before start() looks again, on this loop's event
        requeued, failed = await asyncio.to_thread(
            self.table.requeue_interrupted, self.keep_finished
        )
        if requeued:
            log.warning(
                "re-queued %d job(s) interrupted by a daemon stop: %s", len(requeued), requeued
            )
        if failed:
            log.error("jobs %s failed: the daemon stopped during their last attempt", failed)
        self._workers.start(self.concurrency)

    async def stop(self, timeout: float | None = DEFAULT_STOP_TIMEOUT) -> None:
        """Take no new job; let builds in flight finish for up to ``timeout`` seconds.

        Builds still running then are cancelled and their jobs go back to
        pending (the interrupted attempt is not counted), to run at the next
        start. Returns once every worker has exited.
        """
        await self._workers.stop(timeout)
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
        self._wakeups.notify()
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
        self._wakeups.notify()
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
        if not self._live.update(job_id, value, self._clock()):
            return
        if self._wakeups.on_loop():
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
                    changed = self._wakeups.event()
                    job = self.get(job_id)
                    if job.finished:
                        return job
                    await changed.wait()
        except TimeoutError:
            raise WaitTimeoutError(f"job {job_id} did not finish within {timeout} s") from None

    # -- wake-ups and progress ------------------------------------------------------------------

    def _with_live_progress(self, job: Job) -> Job:
        if job.state != "processing":
            return job
        progress = self._live.progress(job.id)
        return (
            job if progress is None or progress == job.progress else replace(job, progress=progress)
        )

    def _write_progress(self, job_id: int, progress: float) -> None:
        try:
            self.table.write_progress(job_id, progress)
        except CtxStoreError as exc:  # progress is advisory: a failed write never fails the build
            log.warning("job %d: progress not recorded: %s", job_id, exc)
