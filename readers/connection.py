"""The reader's socket thread: a thin loop that moves bytes to and from the daemon.

All protocol rules live in :class:`ctxstore.protocol.Connection`; this module
only connects, feeds it bytes, writes the bytes it returns, answers pings,
sends heartbeats on time, and reconnects with exponential backoff and jitter
when the daemon goes away (EOF, goodbye, fatal error, broken frames). What the
messages mean is the :class:`SessionHandler`'s business (the Reader).

Other threads never touch the socket: they :meth:`ReaderConnection.post` messages
into an outbox and wake the loop through a pipe, so a caller never blocks on a
slow or stopped daemon. Messages posted while disconnected are dropped; the
handler restates what matters (subscriptions, adopted versions) when the next
session starts.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import math
import os
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from ctxstore.errors import InvalidInputError, LocalProtocolError, RemoteProtocolError
from ctxstore.protocol import (
    CLOSED,
    NEED_DATA,
    Connection,
    Error,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    Ping,
    Pong,
    Role,
    Welcome,
    error_frame_for,
)

log = logging.getLogger("ctxstore.readers")

RECV_SIZE: Final = 256 * 1024
MAX_OUTBOX: Final = 65536  # messages waiting for the loop; the oldest go first beyond this
MAX_UNSENT: Final = 8 << 20  # bytes the daemon has not read yet before we give up on it
DEFAULT_CONNECT_TIMEOUT: Final = 5.0
#: heartbeats go out every interval times a random factor in [1 - this, 1]
HEARTBEAT_JITTER: Final = 0.25


class SessionHandler(Protocol):
    """What the client calls, always from its own thread."""

    def session_started(self, welcome: Welcome) -> Iterable[Message]:
        """The handshake is done; return the messages that restate our state (subscribes...)."""

    def message_received(self, message: Message) -> None:
        """Any daemon message the client does not handle itself (subscribed, announce, error)."""

    def session_ended(self, reason: str) -> None:
        """The session is over (daemon gone, goodbye, protocol error, or close())."""

    def heartbeat(self) -> Heartbeat:
        """The heartbeat to send now."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: ``initial * 2**attempt`` up to ``maximum``, times a jitter in [0.5, 1]."""

    initial: float = 0.05
    maximum: float = 5.0

    def __post_init__(self) -> None:
        for value in (self.initial, self.maximum):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInputError(f"backoff delays must be numbers, got {value!r:.40}")
        if not (0 < self.initial <= self.maximum and math.isfinite(self.maximum)):
            raise InvalidInputError(
                f"backoff must satisfy 0 < initial <= maximum < inf, got "
                f"({self.initial}, {self.maximum})"
            )

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``attempt`` (0 after a session that worked)."""
        base = min(self.maximum, self.initial * 2.0 ** min(attempt, 64))
        return base * (0.5 + 0.5 * rand())


class _SessionEndedError(Exception):
    """Ends one session; the message says why (logged, handed to the handler)."""


class ReaderConnection:
    """Keeps one connection to the daemon alive from a background (daemon=True) thread."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str,
        handler: SessionHandler,
        heartbeat_interval: float = 1.0,
        backoff: Backoff = Backoff(),
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.path = Path(path)
        self.name = name
        self._handler = handler
        self._heartbeat_interval = heartbeat_interval
        self._backoff = backoff
        self._connect_timeout = connect_timeout
        self._clock = clock
        self._rand = rand
        self._outbox: collections.deque[Message] = collections.deque(maxlen=MAX_OUTBOX)
        self._stop = threading.Event()
        self._connected = False
        self._sock: socket.socket | None = None
        self._session: _Session | None = None  # the one being served (its thread only)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._quiet_failures = False
        #: sessions that completed the handshake
        self.sessions = 0
        #: why the last session ended or the last connect failed
        self.last_error: str | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"ctxstore-reader-{name}", daemon=True
        )
        #: the socket thread's ident once it runs (``Thread.ident`` is a Python property)
        self._ident: int | None = None

    # -- used by other threads -----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def connected(self) -> bool:
        """True between the daemon's welcome and the end of that session."""
        return self._connected

    @property
    def reconnects(self) -> int:
        """Sessions established after the first one."""
        return max(0, self.sessions - 1)

    @property
    def thread_ident(self) -> int | None:
        return self._thread.ident

    def post(self, message: Message) -> None:
        """Queue ``message`` for the daemon; dropped when not connected. Never blocks."""
        if self._connected:
            self._outbox.append(message)
            if threading.get_ident() != self._ident:
                self._wake()  # the loop itself drains the outbox before it next waits

    def send_now(self) -> None:
        """On the socket thread, in a handler: write what was posted so far (one send,
        without waiting), rather than when the handler returns. Elsewhere: nothing. While
        more received frames wait to be handled (a backlog of announcements), the acks
        wait for the last of them and leave together, in one send."""
        session = self._session
        if session is None or threading.get_ident() != self._ident:
            return
        if session.established and not session.conn.buffered:
            try:
                if self._outbox:
                    session.drain_outbox()
                if session.unsent:
                    session.flush()
            except _SessionEndedError:
                pass  # the loop's next flush meets it

    def close(self, timeout: float = 2.0) -> bool:
        """Say goodbye, stop the thread and release the fds; True if the thread stopped in time."""
        self._stop.set()
        self._wake()
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        if stopped:
            self._close_pipe()
        else:
            log.warning("reader client thread did not stop within %.1f s", timeout)
        return stopped

    def abandon(self) -> None:
        """In a forked child: drop the parent's socket and pipe without a word on the wire.

        Nothing here takes a lock: one the parent's socket thread held at the fork
        would never be released in the child."""
        self._stop = threading.Event()  # the parent's may be mid-set(); nothing waits on ours
        self._stop.set()
        self._connected = False
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()  # our copy of the fd only: no shutdown, the parent's session goes on
        self._close_pipe()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")  # a full pipe already means "wake up"

    def _close_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        self._ident = threading.get_ident()
        attempt = 0
        while not self._stop.is_set():
            try:
                established = self._connect_and_serve()
            except Exception:  # never let the thread die: log and reconnect
                log.exception("reader client failed unexpectedly; reconnecting")
                established = False
            if self._stop.is_set():
                break
            attempt = 0 if established else attempt + 1
            self._pause(self._backoff.delay(attempt, self._rand))

    def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` or until close(); wake-ups for posts are ignored meanwhile."""
        deadline = self._clock() + seconds
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return
                if sel.select(remaining):
                    self._drain_wake()

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 4096):
                pass

    def _connect_and_serve(self) -> bool:
        """One connection from connect to close; True if the handshake completed."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._connect_timeout)
        try:
            sock.connect(os.fspath(self.path))
        except OSError as exc:
            sock.close()
            self._connect_failed(exc)
            return False
        self._sock = sock
        session = self._session = _Session(self, sock)
        reason = "closed"
        try:
            session.run()
        except _SessionEndedError as over:
            reason = str(over)
        finally:
            self._sock = None
            self._session = None
            sock.close()
            if session.established:
                self._end_session(reason)
        if reason != "closed":
            self.last_error = reason
            log.info("ctxstore daemon session ended: %s", reason)
        return session.established

    def _connect_failed(self, exc: OSError) -> None:
        self.last_error = f"cannot connect to {self.path}: {exc.strerror or exc}"
        level = logging.DEBUG if self._quiet_failures else logging.INFO
        log.log(level, "%s; serving reads from the store, retrying with backoff", self.last_error)
        self._quiet_failures = True

    def _begin_session(self, welcome: Welcome) -> Iterable[Message]:
        self._outbox.clear()
        self._connected = True
        self.sessions += 1
        self._quiet_failures = False
        log.info(
            "connected to ctxstore daemon pid %d at %s (session %d)",
            welcome.daemon_pid, self.path, welcome.session,
        )  # fmt: skip
        return self._handler.session_started(welcome)

    def _end_session(self, reason: str) -> None:
        self._connected = False
        self._outbox.clear()
        try:
            self._handler.session_ended(reason)
        except Exception:
            log.exception("reader session_ended handler failed")


class _Session:
    """One connection's loop: select on the socket and the wake pipe, until it ends."""

    def __init__(self, client: ReaderConnection, sock: socket.socket) -> None:
        self.client = client
        self.sock = sock
        self.conn = Connection(Role.CLIENT)
        self.unsent = bytearray()
        #: one receive buffer for the session: ``recv(RECV_SIZE)`` allocated (and the
        #: allocator mapped, shrank and unmapped) 256 KiB per frame, and an munmap in a
        #: process with several threads costs a TLB shootdown on every CPU they ran on
        self.inbox = bytearray(RECV_SIZE)
        self.established = False
        self.next_heartbeat = math.inf

    def run(self) -> None:
        client = self.client
        self.sock.setblocking(False)
        self.queue(Hello(role="reader", name=client.name, pid=os.getpid()))
        handshake_deadline = client._clock() + client._connect_timeout
        with selectors.DefaultSelector() as sel:
            sel.register(client._wake_r, selectors.EVENT_READ, "wake")
            mask = selectors.EVENT_READ
            sel.register(self.sock, mask, "sock")
            while True:
                if client._stop.is_set():
                    self.say_goodbye()
                    return
                if self.established and client._outbox:
                    self.drain_outbox()
                if self.unsent:
                    self.flush()
                wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.unsent else 0)
                if wanted != mask:
                    mask = wanted
                    sel.modify(self.sock, mask, "sock")
                now = client._clock()
                if not self.established and now >= handshake_deadline:
                    raise _SessionEndedError("the daemon did not answer the hello in time")
                if self.established and now >= self.next_heartbeat:
                    self.send_heartbeat(now)
                    continue
                deadline = self.next_heartbeat if self.established else handshake_deadline
                for key, _events in sel.select(max(0.0, deadline - now)):
                    if key.data == "wake":
                        client._drain_wake()
                    else:
                        self.receive()

    def receive(self) -> None:
        try:
            received = self.sock.recv_into(self.inbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise _SessionEndedError(f"connection lost: {exc.strerror or exc}") from None
        try:
            self.conn.receive_data(bytes(memoryview(self.inbox)[:received]))
            while True:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    return
                if event is CLOSED:
                    raise _SessionEndedError("the daemon closed the connection")
                self.handle(event)
        except RemoteProtocolError as exc:
            with contextlib.suppress(OSError):
                self.sock.send(error_frame_for(exc))
            raise _SessionEndedError(f"the daemon broke the protocol: {exc}") from None

    def handle(self, message: Message) -> None:
        client = self.client
        match message:
            case Welcome():
                self.established = True
                for reply in client._begin_session(message):
                    self.queue(reply)
                self.next_heartbeat = client._clock()  # the first one at once
            case Ping(nonce=nonce):
                self.queue(Pong(nonce=nonce))
            case Pong():
                pass
            case Goodbye(reason=reason):
                raise _SessionEndedError(f"the daemon said goodbye ({reason or 'no reason given'})")
            case Error(fatal=True):
                log.warning("ctxstore daemon closed our session: %s: %s", message.kind,
                            message.message)  # fmt: skip
                raise _SessionEndedError(
                    f"fatal error from the daemon: {message.kind}: {message.message:.200}"
                )
            case _:
                try:
                    client._handler.message_received(message)
                except Exception:
                    log.exception("reader failed to handle a %r message", message.TYPE)

    def queue(self, message: Message) -> None:
        try:
            self.unsent += self.conn.send(message)
        except LocalProtocolError:
            log.exception("reader tried to send a %r message the protocol forbids", message.TYPE)
        if len(self.unsent) > MAX_UNSENT:
            raise _SessionEndedError(f"the daemon has not read {len(self.unsent)} bytes we sent")

    def drain_outbox(self) -> None:
        outbox = self.client._outbox
        while outbox:
            try:
                message = outbox.popleft()
            except IndexError:
                return
            self.queue(message)

    def send_heartbeat(self, now: float) -> None:
        """Send one; the next goes out after the interval times a jitter in [0.75, 1].

        Readers started together would otherwise beat in step forever, and N
        heartbeats landing on the daemon in the same millisecond stall the
        commits around them (measured by bench/disturbed.py: every slow
        version fell on the 1 s grid of 16 readers' heartbeats). Never later
        than the interval, so the daemon's silence limit keeps its margin.
        """
        client = self.client
        jitter = 1.0 - HEARTBEAT_JITTER * min(1.0, max(0.0, client._rand()))
        self.next_heartbeat = now + client._heartbeat_interval * jitter
        try:
            beat = client._handler.heartbeat()
        except Exception:
            log.exception("reader could not build its heartbeat")
            return
        self.queue(beat)

    def flush(self) -> None:
        while self.unsent:
            try:
                sent = self.sock.send(self.unsent)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    raise _SessionEndedError("the daemon closed the connection") from None
                raise _SessionEndedError(f"connection lost: {exc.strerror or exc}") from None
            del self.unsent[:sent]

    def say_goodbye(self) -> None:
        """Best effort on close(): one non-blocking write of what is pending plus a goodbye."""
        if self.established:
            self.drain_outbox()
            self.queue(Goodbye(reason="reader closing"))
        with contextlib.suppress(OSError, _SessionEndedError):
            self.flush()
