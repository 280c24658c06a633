"""The admin API's HTTP server: uvicorn, inside the daemon's own event loop.

We bind the listening socket ourselves, so a busy or forbidden address is a
clear error at start (the daemon exits 1) rather than uvicorn calling
``sys.exit`` from inside our loop, and so the real port of ``HOST:0`` is
known at once. uvicorn must not touch signals: the daemon owns SIGTERM,
SIGINT and SIGHUP, so :class:`EmbeddedServer` turns ``capture_signals`` into
a no-op. Stopping ends every ``/events`` stream first, then asks uvicorn to
exit and waits for it, bounded.

Each HTTP connection holds a file descriptor, so at most ``http_connections``
(daemon/limits.py) are open at once: one more is answered with a 503 and
closed at once, and a connection must send its first request within
uvicorn's keep-alive timeout, as it must between requests. The descriptors the
limits keep for the Unix socket stay free whatever arrives on the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from ctxstore.errors import ConflictError, InvalidInputError
from ctxstore.messages import Announce

from ..events import DEFAULT_HEARTBEAT, EventBroadcaster
from ..limits import HTTP_BACKLOG
from ..logs import LogLimiter
from ..metrics import DaemonMetrics
from .app import create_app
from .guard import LOOPBACK_HOSTS

if TYPE_CHECKING:
    from ..server import Daemon

log = logging.getLogger("ctxstore.daemon")

#: seconds uvicorn may spend finishing requests in flight at shutdown
GRACEFUL_SECONDS = 3.0
BACKLOG = HTTP_BACKLOG


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket; ConflictError when the address is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidInputError(f"http host {host!r} cannot be resolved: {exc}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise ConflictError(
                f"http address {where} is already in use (choose another with --http "
                "HOST:PORT, or --http off)"
            ) from exc
        raise InvalidInputError(f"http cannot listen on {where}: {exc.strerror}") from exc
    return sock


_refusals = LogLimiter(log, burst=20)


def capped_protocol(max_connections: Callable[[], int]) -> type[H11Protocol]:
    """uvicorn's h11 protocol, refusing a connection past ``max_connections()`` open ones
    with a 503, and closing one that sends no request within the keep-alive timeout."""

    class CappedProtocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            limit = max_connections()
            if len(self.connections) > limit:
                _refusals.log(
                    "http refused",
                    logging.WARNING,
                    "http: refused a connection: %d open, the limit is "
                    "limits.http_connections = %d",
                    len(self.connections) - 1,
                    limit,
                )
                transport.write(_busy_response(limit))
                transport.close()
                return
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    return CappedProtocol


def _busy_response(limit: int) -> bytes:
    message = (
        f"too many HTTP connections: the limit is limits.http_connections = {limit}; "
        "try again later"
    )
    body = json.dumps({"error": {"type": "daemon_unavailable", "message": message}}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\nretry-after: 1\r\n\r\n"
    )
    return head.encode() + body


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the daemon's loop owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ApiServer:
    """The admin API app, its metrics and event streams, served on one TCP address."""

    def __init__(
        self, daemon: Daemon, host: str, port: int, *, heartbeat: float = DEFAULT_HEARTBEAT
    ) -> None:
        self.host, self.port = host, port
        self.metrics = DaemonMetrics(daemon)
        self.daemon = daemon
        limits = getattr(daemon, "limits", None)
        self.events = EventBroadcaster(
            heartbeat=heartbeat, max_streams=None if limits is None else limits.event_streams
        )
        trusted = LOOPBACK_HOSTS | {host} if is_loopback(host) else None
        self.app: FastAPI = create_app(
            daemon, metrics=self.metrics, events=self.events, trusted_hosts=trusted
        )
        self._server: EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None

    def bind(self) -> None:
        """Take the address now (ConflictError when it is in use); serving starts in start()."""
        if self._sock is None:
            self._sock = bind(self.host, self.port)
            self.port = self._sock.getsockname()[1]

    async def start(self) -> None:
        self.bind()
        sock, self._sock = self._sock, None
        assert sock is not None
        config = uvicorn.Config(
            self.app,
            log_config=None,
            lifespan="off",
            access_log=False,
            proxy_headers=False,
            server_header=False,
            ws="none",
            http=capped_protocol(self._http_connections),
            timeout_graceful_shutdown=int(GRACEFUL_SECONDS),
            backlog=BACKLOG,  # asyncio accepts this many per wake-up: a bounded burst
        )
        self._server = EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="ctxstore-http")
        self._task.add_done_callback(_report_end)
        shown = f"[{self.host}]" if ":" in self.host else self.host
        log.info("http listening on %s:%d", shown, self.port)

    def _http_connections(self) -> int:
        """The cap in force (a SIGHUP may change it); no cap for a daemon without limits."""
        limits = getattr(self.daemon, "limits", None)
        return 1 << 30 if limits is None else int(limits.http_connections)

    def announced(self, announce: Announce, sessions: list[int]) -> None:
        """Feed an announcement to /events and to the ack-latency metric; never blocks."""
        self.events.publish(announce)
        self.metrics.announced(announce, sessions)

    async def stop(self) -> None:
        self.events.close()
        if self._sock is not None:  # bound, never served
            self._sock.close()
            self._sock = None
        server, task = self._server, self._task
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), GRACEFUL_SECONDS + 2)
        except TimeoutError:
            log.warning("http server did not stop in time; closing its connections")
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        except Exception as exc:  # _report_end logged it with its traceback
            log.debug("http server ended with %r", exc)


def _report_end(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("http server failed: %s", exc, exc_info=exc)
