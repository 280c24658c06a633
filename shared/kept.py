"""Connections a process keeps open for a moment after a request, to reuse for the next one.

A training loop that publishes every few milliseconds would otherwise pay a
connect, a handshake and a goodbye per version (and the daemon an accept, a
session and its log lines). :class:`KeptConnections` holds at most one idle
connection per key (the socket path) for this process: taken for a request,
given back after it, and closed by a background thread once it has been idle
for ``idle_s``, so an idle publisher never sits on the daemon as a silent peer.
A forked child never reuses its parent's connection (the key includes the pid).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


class KeptConnections(Generic[C]):
    """At most one idle connection per (pid, key); see the module docstring."""

    def __init__(self, idle_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_s = idle_s
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: dict[tuple[int, str], tuple[C, float]] = {}
        self._wake = threading.Condition(self._lock)
        self._closer_pid = 0
        atexit.register(self.close_all)
        os.register_at_fork(after_in_child=self._forget_after_fork)

    def _forget_after_fork(self) -> None:
        """In a forked child: the parent's connections are not ours to use or to close."""
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._idle = {}
        self._closer_pid = 0

    def take(self, key: str) -> C | None:
        """The idle connection kept for ``key``, if one is still fresh; the caller owns it."""
        with self._lock:
            entry = self._idle.pop((os.getpid(), key), None)
        if entry is None:
            return None
        connection, since = entry
        if self._clock() - since >= self.idle_s:
            with contextlib.suppress(Exception):
                connection.close()
            return None
        return connection

    def give_back(self, key: str, connection: C) -> None:
        """Keep ``connection`` for the next request (closing any other kept for ``key``)."""
        pid = os.getpid()
        with self._lock:
            old = self._idle.pop((pid, key), None)
            self._idle[(pid, key)] = (connection, self._clock())
            if self._closer_pid != pid:  # the first in this process (or a forked child)
                self._closer_pid = pid
                threading.Thread(target=self._close_idle, name="ctxstore-kept", daemon=True).start()
            self._wake.notify()
        if old is not None:
            with contextlib.suppress(Exception):
                old[0].close()

    def close_all(self) -> None:
        """Close every connection this process keeps (at exit: a goodbye, not a dropped peer)."""
        pid = os.getpid()
        with self._lock:
            mine = [key for key in self._idle if key[0] == pid]
            entries = [self._idle.pop(key)[0] for key in mine]
        for connection in entries:
            with contextlib.suppress(Exception):
                connection.close()

    def _close_idle(self) -> None:
        pid = os.getpid()
        while True:
            expired: list[C] = []
            with self._lock:
                if self._closer_pid != pid:
                    return
                now = self._clock()
                for key, (connection, since) in list(self._idle.items()):
                    if key[0] == pid and now - since >= self.idle_s:
                        del self._idle[key]
                        expired.append(connection)
                mine = [since for (owner, _), (_, since) in self._idle.items() if owner == pid]
                if not expired:
                    self._wake.wait(max(0.0, min(mine) + self.idle_s - now) if mine else None)
                    continue
            for connection in expired:
                with contextlib.suppress(Exception):
                    connection.close()
