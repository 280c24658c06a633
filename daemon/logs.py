"""The daemon's logging: human-readable lines by default, one JSON object per line on request.

Everything goes to stderr, where systemd's journal (or whoever started the
daemon) collects it. ``setup_logging`` may be called again, on SIGHUP, to change
the level and the format in place: it reuses its one handler, so records are
never duplicated and nothing is lost between the old format and the new one.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

from ctxstore.errors import InvalidInputError

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "TEXT_FORMAT", "JsonFormatter", "setup_logging"]

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
