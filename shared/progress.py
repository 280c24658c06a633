"""A progress line on stderr for long publishes (``ctxstore publish`` and ``build``).

Fed the daemon's Progress frames. On a terminal it redraws one line from the
first frame on; elsewhere (a log, a pipe) it stays quiet for the first
``quiet_for`` seconds, then writes a line at most every ``every`` seconds, so
a quick publish prints nothing and a slow one shows it is alive.
"""

from __future__ import annotations

from typing import TextIO

from .wire import Progress


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def describe(label: str, update: Progress) -> str:
    """One line: ``slot 3: reading 1.0 GiB of 3.0 GiB (33%), 12 s``."""
    text = f"{label}: {update.stage}"
    if update.total:
        share = 100 * update.done // update.total
        text += f" {_size(update.done)} of {_size(update.total)} ({share}%)"
    return f"{text}, {update.elapsed:.0f} s"


class ProgressLine:
    """Writes Progress frames to ``stream`` as described in the module docstring."""

    def __init__(
        self,
        stream: TextIO,
        label: str,
        *,
        tty: bool | None = None,
        quiet_for: float = 3.0,
        every: float = 10.0,
    ) -> None:
        self.stream = stream
        self.label = label
        self.tty = stream.isatty() if tty is None else tty
        self.quiet_for = quiet_for
        self.every = every
        self._last: float | None = None
        self._width = 0

    def __call__(self, update: Progress) -> None:
        text = describe(self.label, update)
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        elif update.elapsed >= self.quiet_for and (
            self._last is None or update.elapsed - self._last >= self.every
        ):
            self.stream.write(text + "\n")
        else:
            return
        self._last = update.elapsed
        self.stream.flush()

    def finish(self) -> None:
        """End a redrawn line, so what follows starts on a line of its own."""
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
