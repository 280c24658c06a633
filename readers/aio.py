"""The Reader for asyncio servers: awaitables that never block the event loop.

:class:`AsyncReader` wraps a :class:`~ctxstore.readers.Reader`. A ``get()``
served from memory answers on the loop itself (a microsecond); anything that
maps files or runs SQL goes to a worker thread. The reader's socket thread
hands events to the loop with ``loop.call_soon_threadsafe``, so waiting for a
version and iterating announcements cost nothing while nothing happens::

    async with AsyncReader(store, socket) as reader:
        ctx = await reader.wait_for(3, 12, timeout=5)
        async with reader.announcements(slots=[3]) as stream:
            async for event in stream:
                ctx = await reader.get(event.slot)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Self

from ctxstore.context import Context
from ctxstore.errors import ClosedError, WaitTimeoutError
from ctxstore.validation import check_slot, check_version

from .reader import POLL_INTERVAL, Reader, deadline
from .subscriptions import Subscription, VersionEvent


class AsyncReader:
    """An asyncio face on a Reader (made here from the same arguments, or wrapped)."""

    def __init__(
        self,
        store: str | os.PathLike[str] | None = None,
        socket: str | os.PathLike[str] | None = None,
        name: str | None = None,
        *,
        reader: Reader | None = None,
        **options: object,
    ) -> None:
        """Open a new Reader (``Reader(store, socket, name, **options)``) or wrap ``reader``.

        A wrapped reader is not closed by :meth:`close`; one made here is.
        """
        if reader is None:
            self._reader = Reader(store, socket, name, **options)  # type: ignore[arg-type]
            self._owned = True
        else:
            self._reader = reader
            self._owned = False

    @property
    def reader(self) -> Reader:
        """The underlying thread-safe Reader (for stats(), versions_held(), ...)."""
        return self._reader

    async def get(self, slot: int, version: int | str | None = None) -> Context:
        """Like Reader.get; a hit answers at once, a miss maps the files in a worker thread."""
        if version is None:
            ctx = self._reader.peek(slot)
            if ctx is not None:
                return ctx
        return await asyncio.to_thread(self._reader.get, slot, version)

    async def wait_for(self, slot: int, version: int, timeout: float | None = None) -> Context:
        """Wait, without blocking the loop, until the reader has adopted ``version`` or newer.

        Raises WaitTimeoutError after ``timeout`` seconds (None: no limit).
        """
        slot = check_slot(slot)
        version = check_version(version)
        until = deadline(timeout)
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def adopted(adopted_slot: int, adopted_version: int) -> None:
            if adopted_slot == slot and adopted_version >= version:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(woken.set)

        reader = self._reader
        reader.add_adoption_listener(adopted)
        try:
            while True:
                woken.clear()
                ctx = reader.peek(slot)
                if ctx is None or (ctx.version or 0) < version:
                    ctx = await asyncio.to_thread(reader.reached, slot, version)
                if ctx is not None:
                    return ctx
                remaining = until - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeoutError(
                        f"slot {slot} did not reach version {version} within {timeout} s"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), min(remaining, POLL_INTERVAL))
        finally:
            reader.remove_adoption_listener(adopted)

    def announcements(
        self,
        slots: int | Iterable[int] | None = None,
        groups: str | Iterable[str] | None = None,
        *,
        all: bool = False,
    ) -> AnnouncementStream:
        """An async iterator of VersionEvents for these slots (see Reader.subscribe).

        Subscribes when iteration (or its ``async with``) starts; ends when
        closed, or when the reader closes.
        """
        return AnnouncementStream(self._reader, slots, groups, all)

    async def close(self) -> None:
        """Close the reader if this object opened it (joins its threads off the loop)."""
        if self._owned:
            await asyncio.to_thread(self._reader.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class AnnouncementStream:
    """VersionEvents of one subscription, delivered on the event loop.

    A consumer slower than the publisher sees the newest version of each slot:
    pending events for a slot coalesce, as the daemon's outbox does, so the
    backlog never exceeds one event per slot.
    """

    def __init__(
        self,
        reader: Reader,
        slots: int | Iterable[int] | None,
        groups: str | Iterable[str] | None,
        all_slots: bool,
    ) -> None:
        self._reader = reader
        self._spec = (slots, groups, all_slots)
        self._pending: dict[int, VersionEvent] = {}
        self._subscription: Subscription | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = asyncio.Event()
        self._closed = False

    def _start(self) -> None:
        if self._subscription is not None or self._closed:
            return
        self._loop = asyncio.get_running_loop()
        slots, groups, all_slots = self._spec
        self._subscription = self._reader.subscribe(slots, groups, all=all_slots, sink=self)

    # EventSink: called on the reader's socket thread

    def push(self, event: VersionEvent) -> None:
        self._call(self._deliver, event)

    def close(self) -> None:
        """Stop the subscription; iteration ends once pending events are consumed."""
        if self._loop is not None and not _on_loop(self._loop):
            self._call(self._finish)
            return
        self._finish()

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(fn, *args)

    # on the loop

    def _deliver(self, event: VersionEvent) -> None:
        self._pending.pop(event.slot, None)
        self._pending[event.slot] = event
        self._ready.set()

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ready.set()
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with contextlib.suppress(ClosedError):
                self._reader.unsubscribe(subscription)

    def __aiter__(self) -> Self:
        self._start()
        return self

    async def __anext__(self) -> VersionEvent:
        self._start()
        while not self._pending:
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        slot = next(iter(self._pending))
        return self._pending.pop(slot)

    async def aclose(self) -> None:
        self._finish()

    async def __aenter__(self) -> Self:
        self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._finish()


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
