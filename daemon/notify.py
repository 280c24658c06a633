"""sd_notify for the daemon: readiness, status, reload, watchdog and stopping.

systemd's notification protocol is one datagram per message, sent over an
``AF_UNIX``/``SOCK_DGRAM`` socket named by ``$NOTIFY_SOCKET`` (a path, or an
abstract address written with a leading ``@``), carrying newline-separated
``KEY=value`` assignments (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ...).
The protocol is short and stable, so this module speaks it with the standard
library instead of adding a dependency.

Outside systemd (``$NOTIFY_SOCKET`` unset) every call is a no-op. A failed send
is logged and reported as ``False``, never raised: losing a status line must
not take the daemon down. If the watchdog pings stop because the daemon is
stuck or unhealthy, systemd restarts it, which is the point.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

from ctxstore.errors import InvalidInputError

__all__ = ["Notifier", "parse_notify_address", "watchdog_loop"]

log = logging.getLogger(__name__)

#: a blocked send (systemd not draining its socket) gives up after this many seconds
SEND_TIMEOUT = 2.0

NotifyAddress = str | bytes


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def parse_notify_address(value: str) -> NotifyAddress:
    """The ``socket.sendto`` address for a ``$NOTIFY_SOCKET`` value.

    An absolute path is used as is; ``@name`` is the abstract-namespace socket
    ``\\0name``. Other forms (relative paths, ``vsock:`` addresses) are refused
    with :class:`InvalidInputError`.
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return value
    raise InvalidInputError(
        f"NOTIFY_SOCKET={value!r} is neither an absolute path nor an '@' abstract address"
    )


def _parse_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _one_line(text: str) -> str:
    """A newline would start a new assignment in the datagram: flatten it."""
    return " ".join(text.splitlines())


#: how often the daemon's STATUS= line is brought up to date (when it changed)
STATUS_INTERVAL = 2.0


class Notifier:
    """Sends sd_notify messages for this process; a no-op outside systemd.

    The environment is read once, at construction (``environ`` defaults to
    ``os.environ``). Every sending method returns ``True`` when the datagram
    went out and ``False`` when notification is disabled or the send failed.
    Safe to call from any thread.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        clock_usec: Callable[[], int] = _monotonic_usec,
    ) -> None:
        env = os.environ if environ is None else environ
        self._clock_usec = clock_usec
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._address: NotifyAddress | None = None
        self._socket: socket.socket | None = None
        self._failing = False
        raw = env.get("NOTIFY_SOCKET")
        if raw:
            try:
                self._address = parse_notify_address(raw)
            except InvalidInputError as exc:
                log.warning("sd_notify disabled: %s", exc)
            else:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.settimeout(SEND_TIMEOUT)

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere: a socket was given and close() was not called."""
        return self._socket is not None

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (the socket accepts connections)."""
        return self._send(["READY=1"], status)

    def status(self, text: str) -> bool:
        """Publish a one-line status, shown by ``systemctl status``."""
        return self._send([], text)

    def watchdog(self) -> bool:
        """Ping the watchdog: the daemon is alive and healthy."""
        return self._send(["WATCHDOG=1"], None)

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd a clean shutdown has begun."""
        return self._send(["STOPPING=1"], status)

    def reloading(self, status: str | None = None) -> bool:
        """Tell systemd a reload has begun; send :meth:`ready` when it is done.

        Carries ``MONOTONIC_USEC``, which ``Type=notify-reload`` (systemd 253+)
        requires; plain ``Type=notify`` accepts it too.
        """
        return self._send(["RELOADING=1", f"MONOTONIC_USEC={self._clock_usec()}"], status)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd gives up on a slow start or stop."""
        if not math.isfinite(seconds) or seconds <= 0:
            raise InvalidInputError(f"extend_timeout needs a positive duration, got {seconds!r}")
        return self._send([f"EXTEND_TIMEOUT_USEC={math.ceil(seconds * 1_000_000)}"], None)

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``WatchdogSec``), or None.

        None when systemd set no watchdog, when ``WATCHDOG_USEC`` is not a
        positive integer, or when ``WATCHDOG_PID`` names another process (the
        watchdog is then not ours to feed, e.g. in a forked child).
        """
        if not self.enabled or self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and _parse_int(self._watchdog_pid) != os.getpid():
            return None
        usec = _parse_int(self._watchdog_usec)
        if usec is None or usec <= 0:
            log.warning("ignoring WATCHDOG_USEC=%r: not a positive integer", self._watchdog_usec)
            return None
        return usec / 2_000_000

    def close(self) -> None:
        """Release the socket; every later call is a no-op."""
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, fields: list[str], status: str | None) -> bool:
        sock, address = self._socket, self._address
        if sock is None or address is None:
            return False
        if status is not None:
            fields = [*fields, f"STATUS={_one_line(status)}"]
        payload = "\n".join(fields).encode("utf-8", "replace")
        try:
            sock.sendto(payload, address)
        except OSError as exc:
            self._report_failure(exc)
            return False
        self._failing = False
        return True

    def _report_failure(self, exc: OSError) -> None:
        # Warn once per run of failures: a vanished socket would otherwise log on every ping.
        level = logging.DEBUG if self._failing else logging.WARNING
        log.log(level, "sd_notify to %r failed: %s", self._address, exc)
        self._failing = True


async def watchdog_loop(
    notifier: Notifier,
    interval: float,
    is_healthy: Callable[[], bool],
    *,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """Ping the watchdog every ``interval`` seconds while ``is_healthy()`` holds.

    Runs until cancelled. While the daemon reports itself unhealthy (or the
    check raises) no ping is sent, so systemd restarts the service once
    ``WatchdogSec`` passes; pings resume if health comes back before then.
    ``sleep`` is injectable so tests drive the cadence without a clock.
    """
    if not math.isfinite(interval) or interval <= 0:
        raise InvalidInputError(f"watchdog interval must be a positive duration, got {interval!r}")
    healthy_before = True
    while True:
        healthy = _check(is_healthy)
        if healthy:
            if not healthy_before:
                log.warning("daemon healthy again: watchdog pings resume")
            notifier.watchdog()
        elif healthy_before:
            log.warning("daemon unhealthy: withholding watchdog pings so systemd can restart it")
        healthy_before = healthy
        await sleep(interval)


def _check(is_healthy: Callable[[], bool]) -> bool:
    try:
        return bool(is_healthy())
    except Exception:
        log.exception("health check raised; counting the daemon as unhealthy")
        return False


async def status_loop(
    notifier: Notifier,
    describe: Callable[[], str],
    running: Callable[[], bool],
    interval: float = STATUS_INTERVAL,
    *,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """Publish ``describe()`` as STATUS= whenever it changed, checking every ``interval`` s.

    What ``systemctl status`` shows stays current (peers, commits, the last
    commit) without a datagram per commit. Ends once ``running()`` is false, so
    the line a shutdown publishes is never overwritten; a failing ``describe``
    is logged and skipped.
    """
    shown: str | None = None
    while running():
        try:
            text = describe()
        except Exception:
            log.exception("cannot describe the daemon for systemd's STATUS=")
        else:
            if text != shown:
                notifier.status(text)
                shown = text
        await sleep(interval)
