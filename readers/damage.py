"""The versions a Reader found damaged, and whether the daemon of this session hears of them.

Integrity: each version is checked once in a reader process when it is first
mapped: hashed against its recorded checksums, unless the daemon recorded it
verified during this boot, a daemon runs, and every file still has the
identity the daemon hashed (one fstat per file; docs/reliability.md).
A version whose files do not match their record is never served: the reader
remembers it (bounded, oldest forgotten first), logs it once, reports it to the
daemon (``damage_report``) and serves the newest intact version instead, until
the daemon moves the slot's pointer (back) to an intact one. A
daemon from before that frame ends the session on it; that daemon is not told
again, a new one is (docs/reliability.md).
"""

from __future__ import annotations

import logging
from typing import Final

from ctxstore.errors import IntegrityError
from ctxstore.wire import MAX_REASON_BYTES, DamageReport

log = logging.getLogger("ctxstore.readers")

#: damaged versions this reader remembers (it neither maps nor re-reports them)
MAX_DAMAGED: Final = 1024
#: characters of an IntegrityError's text sent in a damage report
MAX_REPORT_CHARS: Final = 500


class DamageLog:
    """Damaged versions (slot, version) -> what was wrong, and the versions served instead."""

    def __init__(self) -> None:
        self._damaged: dict[tuple[int, int], str] = {}  # oldest first
        #: slot -> (damaged version, the version served instead of it)
        self.instead: dict[int, tuple[int, int]] = {}
        #: the pid of a daemon that refused damage_report (one from before the frame)
        self._refused_by: int | None = None
        self._daemon_pid: int | None = None

    def __contains__(self, key: tuple[int, int]) -> bool:
        return key in self._damaged

    def __len__(self) -> int:
        return len(self._damaged)

    def detail(self, key: tuple[int, int]) -> str | None:
        """What was wrong with ``key``, if it is known damaged."""
        return self._damaged.get(key)

    def record(self, slot: int, version: int, exc: IntegrityError) -> str | None:
        """Remember ``version`` as damaged; the report's text if it is new, else None."""
        key = (slot, version)
        if key in self._damaged:
            return None
        detail = report_detail(exc)
        self._damaged[key] = detail
        while len(self._damaged) > MAX_DAMAGED:
            del self._damaged[next(iter(self._damaged))]
        return detail

    def session_started(self, daemon_pid: int) -> list[DamageReport]:
        """A session with the daemon ``daemon_pid`` began: the reports it should hear (those
        posted while no daemon listened; the daemon ignores those it knows)."""
        self._daemon_pid = daemon_pid
        if not self.reports_welcome():
            return []
        return [DamageReport(slot=s, version=v, detail=d) for (s, v), d in self._damaged.items()]

    def session_ended(self, reason: str) -> None:
        """A session ended; one ended on our damage_report marks its daemon as not taking them."""
        if "damage_report" in reason:  # "unknown frame type": a daemon older than reports
            log.warning("the ctxstore daemon does not take damage reports; not sending more")
            self._refused_by = self._daemon_pid

    def reports_welcome(self) -> bool:
        """Whether the daemon of this session understands damage_report (a daemon from
        before the frame ends the session on it: such a daemon is not told again)."""
        return self._refused_by is None or self._refused_by != self._daemon_pid


def report_detail(exc: IntegrityError) -> str:
    """What a damage report says: the error's text, printable, within the frame's limit."""
    text = "".join(c if c.isprintable() else "?" for c in str(exc)[:MAX_REPORT_CHARS])
    return text.encode("utf-8", "replace")[:MAX_REASON_BYTES].decode("utf-8", "ignore")
