"""The daemon's logging: human-readable lines by default, one JSON object per line on request.

Everything goes to stderr, where systemd's journal (or whoever started the
daemon) collects it. ``setup_logging`` may be called again, on SIGHUP, to change
the level and the format in place: it reuses its one handler, so records are
never duplicated and nothing is lost between the old format and the new one.

A hostile or broken peer can make the same event happen thousands of times a
second (a refused connection, a protocol error, a write to a closed socket);
:class:`LogLimiter` keeps each such event to a few lines per interval and says
how many it left out, so the log never amplifies an attack.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from ctxstore.errors import InvalidInputError

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "TEXT_FORMAT",
    "JsonFormatter",
    "LogLimiter",
    "RepeatFilter",
    "flush_all",
    "limit_repeats",
    "limited_exception_handler",
    "setup_logging",
]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, message[, exception, stack].

    ``json.dumps`` escapes newlines inside strings, so a traceback never breaks
    the one-object-per-line framing that log shippers rely on.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class _DaemonHandler(logging.StreamHandler[TextIO]):
    """The handler ``setup_logging`` installs, recognisable when it is called again."""


def setup_logging(level: str, fmt: str, stream: TextIO | None = None) -> logging.Handler:
    """Send every record at ``level`` or above to ``stream`` (stderr) as ``fmt`` ("text"/"json").

    Calling it again changes the level, the format and (if given) the stream of
    the handler it installed the first time, and returns that handler.
    """
    if level not in LOG_LEVELS:
        raise InvalidInputError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    if fmt not in LOG_FORMATS:
        raise InvalidInputError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _DaemonHandler)), None)
    if handler is None:
        handler = _DaemonHandler(stream or sys.stderr)
        root.addHandler(handler)
    elif stream is not None:
        handler.setStream(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.setLevel(level)
    return handler


@dataclass(slots=True)
class _Window:
    started: float
    logged: int = 0
    suppressed: int = 0


class LogLimiter:
    """At most ``burst`` lines per ``interval`` seconds for each kind of repeated event.

    ``limiter.log(key, level, msg, *args)`` logs like ``logger.log`` while the
    key's window has room; past that the line is counted instead. The first line
    of the next window, or :meth:`flush` (called periodically by the daemon),
    reports the count: ``... (37 more like this in the last 10 s)``. Keys name a
    kind of event ("refused", "protocol error"), so a flood from many peers is
    still a few lines per interval; the lines of a connection's ordinary life
    (connected, hello, closed) are keyed by the peer's pid as well, so one
    process that connects in a loop is summarized while every other process's
    sessions are still logged. :meth:`flush` forgets windows that are over, so
    the table holds only the keys seen in the last interval.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 10.0,
        burst: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._burst = burst
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._levels: dict[str, int] = {}
        _LIMITERS.add(self)

    def log(self, key: str, level: int, msg: str, *args: object) -> bool:
        """Log now, or count it for later; True when the line was written."""
        before = self.admit(key, level)
        if before is None:
            return False
        if before:
            msg += " (%d more like this in the last %.0f s)"
            args = (*args, before, self._interval)
        self._logger.log(level, msg, *args)
        return True

    def admit(self, key: str, level: int = logging.WARNING) -> int | None:
        """None: count this event, write nothing. Else write it (the caller does), and the
        number is how many of its kind the previous window counted without writing."""
        now = self._clock()
        window = self._windows.get(key)
        before = 0
        if window is None or now - window.started >= self._interval:
            before = 0 if window is None else window.suppressed
            window = self._windows[key] = _Window(now)
        if window.logged >= self._burst:
            window.suppressed += 1
            self._levels[key] = level
            return None
        window.logged += 1
        return before

    def suppressed(self, key: str) -> int:
        """Lines of ``key`` counted but not written in its current window."""
        window = self._windows.get(key)
        return 0 if window is None else window.suppressed

    def flush(self) -> None:
        """Report every count whose window is over (for events that stopped coming)."""
        now = self._clock()
        for key, window in list(self._windows.items()):
            if now - window.started < self._interval:
                continue
            del self._windows[key]
            if window.suppressed:
                self._logger.log(
                    self._levels.get(key, logging.WARNING),
                    "%s: %d more like this in the last %.0f s",
                    key,
                    window.suppressed,
                    self._interval,
                )


#: every limiter, for flush_all
_LIMITERS: weakref.WeakSet[LogLimiter] = weakref.WeakSet()


def flush_all() -> None:
    """:meth:`LogLimiter.flush` on every limiter (the daemon calls it every few seconds)."""
    for limiter in list(_LIMITERS):
        limiter.flush()


class RepeatFilter(logging.Filter):
    """A logging filter that passes each message (by its format string) through a LogLimiter.

    For loggers the daemon does not write itself (asyncio's "socket.send() raised
    exception.", "socket.accept() out of system resource", uvicorn's warnings):
    a repeated line becomes a few lines per interval and a count.
    """

    def __init__(
        self, interval: float = 10.0, burst: int = 5, logger: logging.Logger | None = None
    ) -> None:
        """``logger``: where :func:`flush_all` reports the counts (None: nowhere)."""
        super().__init__()
        self._limiter = LogLimiter(logger or _COUNTER, interval=interval, burst=burst)

    def filter(self, record: logging.LogRecord) -> bool:
        before = self._limiter.admit(f"{record.name}: {record.msg}", record.levelno)
        if before is None:
            return False
        if before:  # a new window: say what the last one left out
            record.msg = f"{record.getMessage()} ({before} more like this in the last window)"
            record.args = ()
        return True


#: a RepeatFilter without a logger to report counts to reports them here: nowhere
_COUNTER = logging.getLogger("ctxstore.daemon.repeats")
_COUNTER.disabled = True


def limit_repeats(*names: str, interval: float = 10.0) -> None:
    """Install a :class:`RepeatFilter` on each named logger (once; calling again is a no-op)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatFilter) for f in logger.filters):
            logger.addFilter(RepeatFilter(interval, logger=logger))


#: the one limiter of repeated per-peer events (connections, refusals, protocol errors,
#: drops); the daemon flushes it periodically so a count is reported once events stop
peer_events = LogLimiter(logging.getLogger("ctxstore.daemon"), burst=20)


#: the event loop's own error reports, by kind (see limited_exception_handler)
_loop_events = LogLimiter(logging.getLogger("asyncio"), burst=5)


def limited_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler, a few reports per kind per interval.

    On EMFILE asyncio reports "socket.accept() out of system resource" and
    retries a second later, once for every connection it could not accept;
    after the listening socket closes each retry fails again with its own
    traceback. Kinds are the message up to its first detail and the exception's
    type, so these are a few lines and a count, not thousands.
    """
    message = str(context.get("message", "unhandled exception in the event loop"))
    exc = context.get("exception")
    kind = message.split("(", maxsplit=1)[0].split("\n", maxsplit=1)[0][:80]
    key = kind + (f": {type(exc).__name__}" if exc else "")
    before = _loop_events.admit(key, logging.ERROR)
    if before is None:
        return
    if before:
        context = {**context, "message": f"{message} ({before} more like this in the last window)"}
    loop.default_exception_handler(context)
