"""Who is connected and what they hold: the daemon's view of its readers.

Updated on the event loop from hello, ack and heartbeat frames; read by the
commit thread (retention must keep every version a connected reader holds)
and by status. A lock makes those cross-thread reads safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace


@dataclass(slots=True)
class ReaderState:
    session: int
    pid: int
    name: str
    uid: int
    role: str
    connected_at: float
    last_seen: float
    #: (slot, version) pairs: a reader may hold several versions of one slot
    held: set[tuple[int, int]] = field(default_factory=set)
    uss: int = 0
    pss: int = 0
    acks: int = 0


AckObserver = Callable[[int, int, int], None]


class Fleet:
    """The connected peers, keyed by session id."""

    def __init__(
        self, clock: Callable[[], float] = time.time, *, on_ack: AckObserver | None = None
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._readers: dict[int, ReaderState] = {}
        #: metrics hook, called as (session, slot, version) for every ack of a known peer
        self.on_ack = on_ack

    def join(self, session: int, *, pid: int, name: str, uid: int, role: str) -> None:
        now = self._clock()
        with self._lock:
            self._readers[session] = ReaderState(session, pid, name, uid, role, now, now)

    def leave(self, session: int) -> None:
        with self._lock:
            self._readers.pop(session, None)

    def seen(self, session: int) -> None:
        with self._lock:
            state = self._readers.get(session)
            if state is not None:
                state.last_seen = self._clock()

    def ack(self, session: int, slot: int, version: int) -> None:
        with self._lock:
            state = self._readers.get(session)
            if state is not None:
                state.held.add((slot, version))
                state.acks += 1
                state.last_seen = self._clock()
        if state is not None and self.on_ack is not None:
            self.on_ack(session, slot, version)

    def heartbeat(self, session: int, held: Iterable[tuple[int, int]], uss: int, pss: int) -> None:
        with self._lock:
            state = self._readers.get(session)
            if state is not None:
                state.held = set(held)
                state.uss, state.pss = uss, pss
                state.last_seen = self._clock()

    def held_versions(self, slot: int) -> set[int]:
        """Versions of ``slot`` that some connected reader holds (retention keeps them)."""
        with self._lock:
            return {v for r in self._readers.values() for s, v in r.held if s == slot}

    def snapshot(self) -> list[ReaderState]:
        with self._lock:
            return [replace(r, held=set(r.held)) for r in self._readers.values()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._readers)
