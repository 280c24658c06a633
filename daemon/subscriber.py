"""One connected peer's I/O: its protocol state, its reads and its outbox.

What the peer's messages mean (its subscriptions, its requests) is its
session's business (daemon/session.py, sans-IO); this module moves the bytes.

The daemon never waits on a reader. An announcement is written straight to
the socket when nothing is queued for that reader; otherwise it replaces any
older announcement for the same slot in the reader's outbox (coalescing to
the newest version per slot), and the reader's own flush task drains it. A
reader whose backlog does not drain within ``stuck_timeout``, or that sends
nothing for ``silent_timeout`` while it has no request in flight, is
disconnected with a logged reason (a publisher waiting for a long commit is
silent because it waits for us).

What a peer sends is read within its budgets (daemon/budgets.py): so many
units a second, so many frames before the loop serves someone else, and a
frame once started must be finished within ``frame_timeout`` while the bytes
of unfinished frames of all peers together stay within one pool. Nothing is
written to a connection the peer has already closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ctxstore.errors import CtxStoreError, RemoteProtocolError
from ctxstore.wire import (
    NEED_DATA,
    Announce,
    Connection,
    Error,
    Goodbye,
    Message,
    Role,
    Signal,
    error_frame_for,
)

from .budgets import PartialPool, RateBudget, UidBudgets, answered, cost_of
from .listener import PeerCredentials
from .logs import peer_events

log = logging.getLogger("ctxstore.daemon")

#: what a peer between frames reads at a time while the partial pool is full (what it
#: sends next may be one more unfinished frame)
SMALL_READ = 4 << 10
MAX_CONTROL_BACKLOG = 256
#: how often a peer waiting for room in the partial pool is checked for a hang-up
HANG_UP_CHECK = 0.5
_HANG_UP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP


@dataclass(frozen=True, slots=True)
class PeerBudget:
    """The per-peer limits (daemon/budgets.py), shared by the daemon's subscribers."""

    frame_timeout: float = 10.0
    rate: int = 1000
    frames_per_turn: int = 32
    pool: PartialPool | None = None
    #: bytes of the peer's input read at a time (``limits.read_buffer``): complete frames
    #: waiting for the rate budget are at most this, the rest waits in the kernel
    read_size: int = 16 << 10
    #: the buckets answered frames also draw from, one per uid (``limits.uid_rate``)
    uids: UidBudgets | None = None


Handler = Callable[["Subscriber", Message], Awaitable[None]]


class Subscriber:
    """Moves bytes between one socket and its protocol Connection; never blocks the daemon."""

    def __init__(
        self,
        session: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: PeerCredentials,
        *,
        max_frame_size: int,
        stuck_timeout: float,
        silent_timeout: float,
        budget: PeerBudget | None = None,
    ) -> None:
        self.session = session
        self.peer = peer
        self.name = f"pid {peer.pid}"
        self._reader = reader
        self._writer = writer
        self._conn = Connection(Role.SERVER, max_frame_size=max_frame_size)
        self._stuck_timeout = stuck_timeout
        self._silent_timeout = silent_timeout
        self._pending: dict[int, tuple[Announce, bytes | None]] = {}
        self._control: deque[Message] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self.close_reason: str | None = None
        #: requests the daemon has not answered yet: while any is, silence is not a fault
        self.requests_in_flight = 0
        self._budget = budget or PeerBudget()
        self._rate = RateBudget(self._budget.rate, asyncio.get_running_loop().time)
        uids = self._budget.uids
        self._uid_rate = None if uids is None else uids.bucket(peer.uid)
        self._frame_started: float | None = None

    # -- outgoing ---------------------------------------------------------------------------

    def offer(self, announce: Announce, frame: bytes | None = None) -> None:
        """Queue (or write at once) an announcement; never waits.

        ``frame``: the announcement already encoded, shared by every subscriber.
        """
        if self._closed:
            return
        if not self._pending and not self._control and self._buffered() == 0:
            self._write(announce, frame)
            return
        self._pending.pop(announce.slot, None)  # a newer one replaces it, at the back:
        self._pending[announce.slot] = (announce, frame)  # batches go in seq order
        self._wake.set()

    def send(self, message: Message) -> None:
        """Queue a reply (welcome, subscribed, published, error...); bounded."""
        if self._closed:
            return
        if not self._pending and not self._control and self._buffered() == 0:
            self._write(message)
            return
        if len(self._control) >= MAX_CONTROL_BACKLOG:
            self.close(f"more than {MAX_CONTROL_BACKLOG} replies queued: reader is not reading")
            return
        self._control.append(message)
        self._wake.set()

    def _buffered(self) -> int:
        return self._writer.transport.get_write_buffer_size()

    def _write(self, message: Message, frame: bytes | None = None) -> None:
        if self._lost():
            return
        try:
            self._writer.write(self._conn.send(message, frame=frame))
        except CtxStoreError:
            log.exception("session %d: cannot send %s", self.session, type(message).__name__)

    def _lost(self) -> bool:
        """True (and closed) once the transport is closing: the peer went, or we closed it.

        asyncio logs "socket.send() raised exception." for each write after a
        connection is lost; a flood answered after its peer left would fill the log.
        """
        if self._writer.transport.is_closing():
            self.close(self.close_reason or "connection lost")
            return True
        return False

    async def flush_loop(self) -> None:
        """Drain the outbox; disconnect a reader whose backlog stays stuck."""
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            while (self._control or self._pending) and not self._closed:
                while self._control:
                    self._write(self._control.popleft())
                batch, self._pending = self._pending, {}
                for announce, frame in batch.values():
                    self._write(announce, frame)
                try:
                    async with asyncio.timeout(self._stuck_timeout):
                        await self._writer.drain()
                except TimeoutError:
                    self.close(f"stuck: its backlog did not drain in {self._stuck_timeout:g}s")
                except (ConnectionError, RuntimeError):
                    self.close("connection lost while writing")

    # -- incoming ---------------------------------------------------------------------------

    async def receive_loop(self, handle: Handler) -> None:
        """Read frames until EOF, a protocol violation, silence or an unfinished frame past
        its limit, or close; within the peer's budgets (see the module docstring)."""
        pool = self._budget.pool
        try:
            while not self._closed:
                try:
                    data = await self._read()
                except RemoteProtocolError as exc:  # a frame not finished in time
                    self._refuse(exc)
                    return
                except TimeoutError:
                    if self.requests_in_flight:
                        continue  # it waits for our answer
                    self.close(f"silent for {self._silent_timeout:g}s (no heartbeat)")
                    return
                except ConnectionError:
                    self.close("connection reset")
                    return
                ended = not data
                try:
                    self._conn.receive_data(data)
                    del data  # copied: this one must not wait out the rate budget too
                    await self._handle_events(handle)
                except RemoteProtocolError as exc:
                    self._refuse(exc)
                    return
                if pool is not None:
                    pool.hold(self.session, self._conn.buffered)
                if ended:
                    self.close("peer closed the connection")
                    return
        finally:
            if pool is not None:
                pool.release(self.session)

    async def _handle_events(self, handle: Handler) -> None:
        """Every complete frame received so far, each paid for from the rate budget (and
        an answered one from its uid's too), with a turn of the loop for everyone else
        every ``frames_per_turn`` frames."""
        handled = 0
        while not self._closed:
            event = self._conn.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, Signal):  # CLOSED
                self.close("peer closed the connection")
                return
            cost = cost_of(event)
            delay = self._rate.take(cost)
            if self._uid_rate is not None and answered(cost):
                delay = max(delay, self._uid_rate.take(cost))
            if delay:
                await asyncio.sleep(delay)
                if self.closed:  # while it waited for its budget
                    return
            await handle(self, event)
            handled += 1
            if handled % self._budget.frames_per_turn == 0:
                await asyncio.sleep(0)

    async def _read(self) -> bytes:
        """The next bytes from the peer, within the silence and unfinished-frame limits.

        Raises TimeoutError for silence, RemoteProtocolError for a frame not finished
        within ``frame_timeout`` (waiting for room in the partial pool included).
        """
        loop = asyncio.get_running_loop()
        chunk = self._budget.read_size
        if not self._conn.buffered:
            self._frame_started = None
            size = chunk
            pool = self._budget.pool
            if pool is not None and not pool.room():
                size = min(SMALL_READ, chunk)
            # asyncio.timeout, not wait_for: on 3.11 wait_for wraps every read in a Task
            async with asyncio.timeout(self._silent_timeout):
                return await self._reader.read(size)
        if self._frame_started is None:
            self._frame_started = loop.time()
        deadline = self._frame_started + self._budget.frame_timeout
        pool = self._budget.pool
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise self._unfinished()
            room = chunk if pool is None else pool.room()
            if room:
                break
            assert pool is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pool.wait_for_room(), min(left, HANG_UP_CHECK))
            if self._hung_up():  # its bytes are not read meanwhile, so neither is its EOF
                raise ConnectionResetError("peer hung up while its frame waited for room")
        try:
            async with asyncio.timeout(min(left, self._silent_timeout)):
                return await self._reader.read(min(chunk, room))
        except TimeoutError:
            if left <= self._silent_timeout:
                raise self._unfinished() from None
            raise

    def _hung_up(self) -> bool:
        """Whether the peer closed its end (POLLRDHUP: seen even with unread bytes queued)."""
        sock = self._writer.get_extra_info("socket")
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), _HANG_UP)
        return bool(poller.poll(0))

    def _unfinished(self) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"frame not finished within frame_timeout {self._budget.frame_timeout:g}s "
            f"({self._conn.buffered} bytes of it received)"
        )

    def _refuse(self, exc: RemoteProtocolError) -> None:
        """Answer a protocol violation with the protocol's error frame, then close."""
        peer_events.log(
            "protocol error",
            logging.WARNING,
            "session %d (%s): protocol error: %s",
            self.session,
            self.name,
            exc,
        )
        if not self._lost():
            with contextlib.suppress(Exception):
                self._writer.write(error_frame_for(exc))
        self.close(f"protocol error: {exc}")

    # -- closing ----------------------------------------------------------------------------

    def goodbye(self, reason: str) -> None:
        """Tell the peer we are going (daemon shutdown), then close."""
        if not self._closed:
            self._write_quietly(Goodbye(reason=reason))
        self.close(reason)

    def fail(self, error: Error) -> None:
        """Send a fatal error and close."""
        if not self._closed:
            self._write_quietly(error)
        self.close(error.message)

    def _write_quietly(self, message: Message) -> None:
        if self._lost():
            return
        with contextlib.suppress(Exception):
            self._writer.write(self._conn.send(message))

    def close(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self.close_reason = reason
        self._wake.set()
        self._writer.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def input_bytes(self) -> int:
        """Bytes of this peer's input the protocol holds: complete frames waiting for the
        rate budget and the frame being received (what its stream holds is bounded apart,
        by its limit)."""
        return self._conn.buffered
