"""What the queue and its workers share in memory: the change signal and builds in flight.

:class:`Wakeups` tells every worker and waiter to look at the table again
(a submit, a cancel, a finished attempt); :class:`LiveBuilds` holds the
progress of the builds running now, newer than what the table has.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass

from ctxstore.errors import NotFoundError

from .records import PROGRESS_INTERVAL, PROGRESS_STEP


class Wakeups:
    """An asyncio.Event replaced at each change, so whoever took it before the change wakes.

    :meth:`bind` ties it to the running loop (the queue's start);
    :meth:`notify` may be called from any thread.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread: int | None = None
        self._changed: asyncio.Event | None = None

    def bind(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()

    def on_loop(self) -> bool:
        return self.loop is not None and threading.get_ident() == self.loop_thread

    def event(self) -> asyncio.Event:
        """The event the next change sets: take it before looking, then wait on it."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def wake(self) -> None:
        """On the loop: every worker and waiter looks again (the queue changed)."""
        event, self._changed = self._changed, asyncio.Event()
        if event is not None:
            event.set()

    def notify(self) -> None:
        """:meth:`wake` from any thread."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self.loop_thread:
            self.wake()
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(self.wake)


@dataclass(slots=True)
class Live:
    """Progress of a job in flight: the newest value and the last one written."""

    progress: float = 0.0
    written: float = 0.0
    written_at: float = 0.0


class LiveBuilds:
    """The jobs being built now, by id, behind a lock (build threads report progress)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[int, Live] = {}

    def begin(self, job_id: int, now: float) -> None:
        with self._lock:
            self._jobs[job_id] = Live(written_at=now)

    def end(self, job_id: int) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def progress(self, job_id: int) -> float | None:
        with self._lock:
            live = self._jobs.get(job_id)
            return None if live is None else live.progress

    def update(self, job_id: int, progress: float, now: float) -> bool:
        """Take a build's newest progress; True when it is time to write it to the table.

        Writes are coalesced: when the value moved by PROGRESS_STEP, after
        PROGRESS_INTERVAL seconds, or on reaching 1. NotFoundError when the job
        is not being built here (its build was cancelled, say).
        """
        with self._lock:
            live = self._jobs.get(job_id)
            if live is None:
                raise NotFoundError(f"job {job_id!r:.40} is not being built by this queue")
            live.progress = progress
            if progress == live.written or not (
                abs(progress - live.written) >= PROGRESS_STEP
                or progress == 1.0
                or now - live.written_at >= PROGRESS_INTERVAL
            ):
                return False
            live.written, live.written_at = progress, now
            return True
