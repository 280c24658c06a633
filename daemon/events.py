"""Server-Sent Events: the daemon's announcements for consumers that are not Python.

The daemon calls :meth:`EventBroadcaster.publish` on its loop for every
announcement; each connected ``GET /events`` client has an
:class:`EventStream` with a bounded backlog. Publishing never waits: a client
that falls behind has its backlog coalesced to the newest announcement per
slot, and when even that exceeds the bound the oldest slots are dropped and
the client is told how many with an ``event: dropped`` frame, so it can
re-read ``GET /slots``. Idle streams get a comment line every ``heartbeat``
seconds so proxies and clients see the connection alive.

Each stream holds a connection, so a file descriptor, for as long as it is
open: at most ``max_streams`` are open at once (daemon/limits.py derives the
default from RLIMIT_NOFILE, keeping descriptors for the Unix socket's peers);
one more is refused with DaemonUnavailableError, a 503 that says why.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection
from typing import Any

from ctxstore.errors import DaemonUnavailableError
from ctxstore.wire import Announce

DEFAULT_HEARTBEAT = 15.0
#: slots a slow client may have pending before the oldest are dropped
DEFAULT_MAX_PENDING = 1024
#: how long an SSE client waits before reconnecting, in milliseconds (sent once)
RETRY_MS = 3000


def announce_payload(announce: Announce) -> dict[str, Any]:
    """The JSON object one ``announce`` event carries."""
    return {
        "slot": announce.slot,
        "version": announce.version,
        "seq": announce.seq,
        "committed_at": announce.committed_at,
        "model_type": announce.model_type,
        "aliases": dict(announce.aliases),
    }


def format_announce(announce: Announce) -> str:
    data = json.dumps(announce_payload(announce), separators=(",", ":"))
    return f"id: {announce.seq}\nevent: announce\ndata: {data}\n\n"


def format_dropped(count: int) -> str:
    return f'event: dropped\ndata: {{"dropped":{count}}}\n\n'


class EventStream:
    """One client's backlog: newest announcement per slot, in announcement order."""

    def __init__(
        self,
        owner: EventBroadcaster,
        slots: Collection[int] | None,
        *,
        max_pending: int,
        heartbeat: float,
    ) -> None:
        self._owner = owner
        self._slots = frozenset(slots) if slots else None
        self._max_pending = max_pending
        self._heartbeat = heartbeat
        self._pending: OrderedDict[int, Announce] = OrderedDict()
        self._wake = asyncio.Event()
        self._closed = False
        self.dropped = 0

    def offer(self, announce: Announce) -> None:
        """Queue ``announce`` (replacing an older one of its slot); never blocks."""
        if self._closed or (self._slots is not None and announce.slot not in self._slots):
            return
        self._pending.pop(announce.slot, None)
        self._pending[announce.slot] = announce
        while len(self._pending) > self._max_pending:
            self._pending.popitem(last=False)
            self.dropped += 1
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def frames(self) -> AsyncIterator[str]:
        """The SSE text of this stream until it is closed (or the client goes away)."""
        try:
            yield f": ctxstore events\nretry: {RETRY_MS}\n\n"
            while True:
                if not self._pending and not self._closed:
                    try:
                        await asyncio.wait_for(self._wake.wait(), self._heartbeat)
                    except TimeoutError:
                        yield ": heartbeat\n\n"
                        continue
                self._wake.clear()
                if self.dropped:
                    count, self.dropped = self.dropped, 0
                    yield format_dropped(count)
                while self._pending:
                    _, announce = self._pending.popitem(last=False)
                    yield format_announce(announce)
                if self._closed:
                    return
        finally:
            self._owner.discard(self)


class EventBroadcaster:
    """Every open ``/events`` stream; lives on the daemon's event loop."""

    def __init__(
        self,
        *,
        heartbeat: float = DEFAULT_HEARTBEAT,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_streams: int | None = None,
    ) -> None:
        self.heartbeat = heartbeat
        self.max_pending = max_pending
        #: open streams allowed at once (None: no limit)
        self.max_streams = max_streams
        self.refused = 0
        self._streams: set[EventStream] = set()
        self._closed = False

    def subscribe(self, slots: Collection[int] | None = None) -> EventStream:
        """A new stream (every slot, or only ``slots``); already closed after :meth:`close`.

        DaemonUnavailableError when ``max_streams`` are open already.
        """
        if self.max_streams is not None and len(self._streams) >= self.max_streams:
            self.refused += 1
            raise DaemonUnavailableError(
                f"too many /events streams: {len(self._streams)} open, the limit is "
                f"limits.event_streams = {self.max_streams}; try again later"
            )
        stream = EventStream(self, slots, max_pending=self.max_pending, heartbeat=self.heartbeat)
        if self._closed:
            stream.close()
        else:
            self._streams.add(stream)
        return stream

    def discard(self, stream: EventStream) -> None:
        self._streams.discard(stream)

    def publish(self, announce: Announce) -> None:
        for stream in list(self._streams):
            stream.offer(announce)

    def close(self) -> None:
        """End every stream (daemon shutdown): clients see the response finish."""
        self._closed = True
        for stream in list(self._streams):
            stream.close()

    def __len__(self) -> int:
        return len(self._streams)
