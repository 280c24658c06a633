"""The subscription book: which slots a Reader follows, who subscribed to what, and delivery.

Two kinds of interest reach the daemon as ``subscribe`` frames: the slots the
reader *follows* for itself (read with ``get(slot)``: their announcements are
adopted at once) and the caller's :class:`Subscription` objects. The book keeps
both, the request ids awaiting their ``subscribed`` answer, and turns an
announcement or a resynchronisation snapshot into :class:`VersionEvent` for the
subscriptions it concerns. It restates everything when a new session starts,
and unsubscribes only what nobody else still wants.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Collection, Mapping
from types import MappingProxyType
from typing import Protocol

from ctxstore.wire import Announce, Message, Subscribe, Unsubscribe

from .subscriptions import Dispatcher, Subscription, VersionEvent

CLOSE_TIMEOUT = 2.0


class Outbox(Protocol):
    """What the book needs of the reader's connection (its socket thread)."""

    @property
    def connected(self) -> bool: ...

    def post(self, message: Message) -> None: ...


class SubscriptionBook:
    """The reader's subscriptions and followed slots; thread-safe under the reader's lock."""

    def __init__(
        self,
        lock: threading.RLock,
        name: str,
        outbox: Callable[[], Outbox | None],
        groups_of: Callable[[int], Collection[str]],
    ) -> None:
        """``outbox()``: the connection now (None without one); ``groups_of(slot)``: its groups."""
        self._lock = lock
        self._name = name
        self._outbox = outbox
        self._groups_of = groups_of
        self._followed: set[int] = set()
        self._subscriptions: list[Subscription] = []
        self._requests: dict[int, Subscription | None] = {}  # None: the follow subscription
        self._request_ids = itertools.count(1)
        self._dispatcher: Dispatcher | None = None
        self._closed = False

    # -- what the reader wants ------------------------------------------------------------

    def follows(self, slot: int) -> bool:
        """Whether announcements of ``slot`` are adopted at once."""
        return slot in self._followed

    def follow(self, slot: int) -> None:
        """Follow ``slot``, subscribing to it now if a session is up (idempotent)."""
        if slot in self._followed:
            return
        with self._lock:
            if slot in self._followed or self._closed:
                return
            self._followed.add(slot)
            outbox = self._live_outbox()
            if outbox is not None:
                request_id = next(self._request_ids)
                self._requests[request_id] = None
                outbox.post(Subscribe(request_id=request_id, slots=(slot,)))

    def add(self, subscription: Subscription) -> None:
        """Keep ``subscription`` and ask the daemon for it now if a session is up."""
        with self._lock:
            self._subscriptions.append(subscription)
            outbox = self._live_outbox()
            if outbox is not None:
                request_id = next(self._request_ids)
                self._requests[request_id] = subscription
                outbox.post(subscription.request(request_id))

    def remove(self, subscription: Subscription) -> None:
        """Drop ``subscription`` (idempotent) and unsubscribe what nobody else still wants."""
        with self._lock:
            if subscription not in self._subscriptions:
                return
            self._subscriptions.remove(subscription)
            subscription.active = False
            outbox = self._live_outbox()
            if outbox is not None:
                for message in self._unsubscribe_messages(subscription):
                    outbox.post(message)
        subscription.end()

    def counts(self) -> tuple[int, int]:
        """(followed slots, subscriptions), for the reader's stats."""
        with self._lock:
            return len(self._followed), len(self._subscriptions)

    def close(self) -> None:
        """End every subscription and stop the callback thread."""
        with self._lock:
            self._closed = True
            subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            subscription.end()
        if self._dispatcher is not None:
            self._dispatcher.close(CLOSE_TIMEOUT)

    # -- the session -----------------------------------------------------------------------

    def restate(self) -> list[Message]:
        """Every subscribe frame a new session needs (requests of the last one are forgotten)."""
        with self._lock:
            self._requests = {}
            return self._subscribe_messages()

    def forget_requests(self) -> None:
        """The session ended: its requests will get no answer."""
        with self._lock:
            self._requests = {}

    def refused(self, request_id: int) -> None:
        """The daemon refused a subscribe: it gets no answer."""
        self._requests.pop(request_id, None)

    def answered(self, request_id: int, versions: Mapping[int, int]) -> None:
        """A ``subscribed`` answer: report the versions its subscription has not seen yet."""
        subscription = self._requests.pop(request_id, None)
        if subscription is not None and subscription.active:
            subscription.cover(versions)
            for slot, number in versions.items():
                self._deliver_to(subscription, slot, number, "snapshot", None)

    def deliver(self, announce: Announce) -> None:
        """Hand an announcement to every subscription it concerns."""
        slot = announce.slot
        groups: list[Collection[str]] = []

        def groups_of(s: int) -> Collection[str]:
            if not groups:
                groups.append(frozenset(self._groups_of(s)))
            return groups[0]

        for subscription in list(self._subscriptions):
            if subscription.matches(slot, groups_of):
                self._deliver_to(subscription, slot, announce.version, "announce", announce)

    def _deliver_to(
        self,
        subscription: Subscription,
        slot: int,
        version: int,
        source: str,
        announce: Announce | None,
    ) -> None:
        new, previous = subscription.offer(slot, version)
        if not new:
            return
        event = VersionEvent(
            slot=slot,
            version=version,
            previous=previous,
            source=source,
            committed_at=announce.committed_at if announce else None,
            model_type=announce.model_type if announce else None,
            aliases=announce.aliases if announce else MappingProxyType({}),
        )
        subscription.emit(event, self._callbacks)

    def _callbacks(self) -> Dispatcher:
        dispatcher = self._dispatcher
        if dispatcher is None:
            with self._lock:
                if self._dispatcher is None:
                    self._dispatcher = Dispatcher(self._name)
                dispatcher = self._dispatcher
        return dispatcher

    def _live_outbox(self) -> Outbox | None:
        outbox = self._outbox()
        return outbox if outbox is not None and outbox.connected else None

    def _unsubscribe_messages(self, gone: Subscription) -> list[Message]:
        rest = self._subscriptions
        slots = gone.slots - self._followed - {s for sub in rest for s in sub.slots}
        groups = gone.groups - {g for sub in rest for g in sub.groups}
        messages: list[Message] = []
        if slots or groups:
            messages.append(Unsubscribe(slots=tuple(sorted(slots)), groups=tuple(sorted(groups))))
        if gone.all and not any(sub.all for sub in rest):
            # Whether the daemon drops only the "all" flag or everything, restating the
            # rest leaves it subscribed to exactly what is still wanted.
            messages.append(Unsubscribe(all=True))
            messages.extend(self._subscribe_messages())
        return messages

    def _subscribe_messages(self) -> list[Message]:
        messages: list[Message] = []
        if self._followed:
            request_id = next(self._request_ids)
            self._requests[request_id] = None
            messages.append(Subscribe(request_id=request_id, slots=tuple(sorted(self._followed))))
        for subscription in self._subscriptions:
            request_id = next(self._request_ids)
            self._requests[request_id] = subscription
            messages.append(subscription.request(request_id))
        return messages
