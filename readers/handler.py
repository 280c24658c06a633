"""The session handler: what a Reader does with each message from its daemon.

The reader's socket thread (:mod:`ctxstore.readers.connection`) moves bytes;
this handler gives the messages their meaning. A new session re-attaches the
version table, restates subscriptions, adopted versions and damage reports,
and catches up from the daemon's snapshot; an announcement is adopted (for a
followed slot) and delivered to the subscriptions it concerns; a ``subscribed``
answer reports the versions a subscription had not seen; a heartbeat tells the
daemon every version held and the process's memory. When a session ends the
store is the truth until the next one (the table may freeze).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

from ctxstore.wire import Announce, Error, Heartbeat, Message, Subscribed, Welcome

from .adoption import Adoption
from .book import SubscriptionBook
from .memory import MemorySampler

log = logging.getLogger("ctxstore.readers")


class ReaderSessionHandler:
    """Implements the connection's ``SessionHandler`` for one Reader (in one process)."""

    def __init__(
        self,
        name: str,
        adoption: Adoption,
        book: SubscriptionBook,
        *,
        attach_table: Callable[[], None],
        detach_table: Callable[[], None],
        heartbeat_interval: float,
        send_now: Callable[[], None] = lambda: None,
    ) -> None:
        """``attach_table()``: use the daemon's version table (attached again if recreated);
        ``detach_table()``: stop trusting it (the session is gone, the table may freeze);
        ``send_now()``: write the messages posted so far (called on the socket thread)."""
        self._name = name
        self._adoption = adoption
        self._book = book
        self._attach_table = attach_table
        self._detach_table = detach_table
        self._send_now = send_now
        self._memory = MemorySampler(max(5 * heartbeat_interval, 1.0))
        self.announcements = 0

    def session_started(self, welcome: Welcome) -> list[Message]:
        """Restate what this reader wants and holds; catch up on the daemon's versions."""
        adoption = self._adoption
        with adoption.adopted_cond:  # the reader's lock
            if adoption.closed:
                return []
            self._attach_table()
            messages = self._book.restate()
            messages.extend(adoption.acks())
            messages.extend(adoption.damage.session_started(welcome.daemon_pid))
        self._catch_up(welcome.versions)
        return messages

    def session_ended(self, reason: str) -> None:
        self._adoption.damage.session_ended(reason)
        with self._adoption.adopted_cond:
            # The table may freeze now: the store is the truth until we are back.
            self._detach_table()
            self._book.forget_requests()
            self._adoption.adopted_cond.notify_all()

    def message_received(self, message: Message) -> None:
        match message:
            case Announce():
                self.announcements += 1
                if self._book.follows(message.slot):
                    self._adoption.adopt_announced(message.slot, message.version, message.record)
                    self._send_now()  # the ack leaves before the callbacks are handed over
                self._book.deliver(message)
            case Subscribed():
                self._catch_up(message.versions)
                self._book.answered(message.request_id, message.versions)
            case Error(request_id=request_id):
                if request_id is not None:
                    self._book.refused(request_id)  # a refused subscribe gets no answer
                log.warning("ctxstore daemon reported %s: %s", message.kind, message.message)
            case _:
                log.debug("reader ignores a %r message", message.TYPE)

    def heartbeat(self) -> Heartbeat:
        uss, pss = self._memory.sample()
        held = tuple(self._adoption.held())
        return Heartbeat(pid=os.getpid(), name=self._name, held=held, uss=uss, pss=pss)

    def _catch_up(self, versions: Mapping[int, int]) -> None:
        """Adopt the daemon's current version of each followed slot this reader is behind on."""
        for slot, number in versions.items():
            if self._book.follows(slot) and self._adoption.adopted.get(slot) != number:
                self._adoption.adopt_announced(slot, number)
