"""Driving the job queue on a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from ctxstore.daemon.jobs import (
    Job,
    JobQueue,
)
from ctxstore.store import PersistentStore

T = TypeVar("T")


BOUND = 30.0  # seconds; only a hung scenario gets near it


def run_async(scenario: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(scenario, BOUND)

    return asyncio.run(bounded())


class FakeTime:
    """A clock that only moves when the queue sleeps: every sleep returns at once."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay
        await asyncio.sleep(0)


def make_queue(
    store: PersistentStore, run: Callable[[Job], Awaitable[int]], time: FakeTime, **options: Any
) -> JobQueue:
    options.setdefault("concurrency", 1)
    options.setdefault("jitter", lambda: 1.0)
    return JobQueue(store, run, clock=time.clock, sleep=time.sleep, **options)
