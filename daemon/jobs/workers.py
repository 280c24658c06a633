"""The runner half of the job queue: ``concurrency`` asyncio workers that build jobs.

Each worker claims the highest-priority eligible job from the table, awaits
``run(job)`` (the daemon's build + commit, returning the committed version)
and records the outcome: done, a retry after a backoff, or failed. A failed
attempt is retried after :func:`~.records.backoff_delay` seconds until
``max_attempts``; the errors in ``PERMANENT_ERRORS`` fail the job at once.
Stopping lets builds in flight finish for a while, then cancels them and puts
their jobs back to pending (the interrupted attempt not counted).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ctxstore.errors import ClosedError, CtxStoreError, InvalidInputError
from ctxstore.validation import check_version

from .records import PERMANENT_ERRORS, Job, Runner, backoff_delay, describe_error
from .signals import LiveBuilds, Wakeups
from .table import JobTable

log = logging.getLogger("ctxstore.daemon.jobs")


class RetrySettings(Protocol):
    """The settings the workers read at each decision (a SIGHUP may change them)."""

    max_attempts: int
    backoff_initial: float
    backoff_max: float
    keep_finished: int


class Workers:
    """The worker tasks, the builds they run, and what each outcome writes to the table."""

    def __init__(
        self,
        table: JobTable,
        run: Runner,
        *,
        settings: RetrySettings,
        wakeups: Wakeups,
        live: LiveBuilds,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        jitter: Callable[[], float],
    ) -> None:
        self.table = table
        self.settings = settings
        self.wakeups = wakeups
        self.live = live
        self._run = run
        self._clock = clock
        self._sleep = sleep
        self._jitter = jitter
        self.stop_requested = threading.Event()  # set from stop() until the next start()
        self._tasks: list[asyncio.Task[None]] = []
        self._running: dict[int, asyncio.Task[int]] = {}

    @property
    def started(self) -> bool:
        return bool(self._tasks)

    def start(self, concurrency: int) -> None:
        self._tasks = [
            asyncio.create_task(self._worker(n), name=f"ctxstore-job-worker-{n}")
            for n in range(concurrency)
        ]

    async def stop(self, timeout: float | None) -> None:
        """Let builds in flight finish for ``timeout`` seconds, then cancel them; wait for all."""
        self.stop_requested.set()
        self.wakeups.wake()
        workers, self._tasks = self._tasks, []
        if not workers:
            return
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

    async def _worker(self, number: int) -> None:
        while not self.stop_requested.is_set():
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
                await self._wait(self.wakeups.event(), self.settings.backoff_initial)

    async def _next_job(self) -> Job | None:
        """The next job to run, waiting for a submit or a due retry; None once stopping."""
        while not self.stop_requested.is_set():
            changed = self.wakeups.event()  # taken before looking: a submit after the look wakes us
            job, wake_at = await asyncio.to_thread(self.table.claim, self.settings.backoff_max)
            if job is not None:
                if self.stop_requested.is_set():
                    await asyncio.to_thread(self.table.release, job.id)
                    return None
                return job
            if wake_at is None:
                await self._wait(changed, None)
                continue
            delay = min(wake_at - self._clock(), self.settings.backoff_max)
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
        self.live.begin(job.id, self._clock())
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
            self.live.end(job.id)
            self.wakeups.notify()

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
        if self.stop_requested.is_set():
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
        await asyncio.to_thread(self.table.finish_done, job.id, number, self.settings.keep_finished)
        log.info("job %d done: slot %d version %d", job.id, job.slot, number)

    async def _failed(self, job: Job, exc: Exception, retry: bool) -> None:
        error = describe_error(exc)
        if retry and job.attempts < job.max_attempts:
            settings = self.settings
            delay = backoff_delay(
                job.attempts, settings.backoff_initial, settings.backoff_max, self._jitter()
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
        keep = self.settings.keep_finished
        await asyncio.to_thread(self.table.finish_failed, job.id, error, keep)
        log.error("job %d failed after %d attempt(s): %s", job.id, job.attempts, error)
