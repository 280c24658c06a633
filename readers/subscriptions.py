"""Subscriptions: which slots' versions a caller wants, and how the events reach it.

The reader's socket thread decides which :class:`Subscription` an announcement
(or a resynchronisation snapshot) concerns and builds a :class:`VersionEvent`;
callbacks run on the :class:`Dispatcher`'s own thread, in order, so a slow
callback never holds up the socket; asyncio streams receive events through an
:class:`EventSink` that hands them to their loop.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol, Self

from ctxstore.errors import InvalidInputError
from ctxstore.validation import check_label, check_slot
from ctxstore.wire import Subscribe

if TYPE_CHECKING:
    from .reader import Reader

log = logging.getLogger("ctxstore.readers")


@dataclass(frozen=True, slots=True)
class VersionEvent:
    """A subscribed slot's current version, as the daemon told us.

    ``source`` is ``"announce"`` for a new commit or rollback, ``"snapshot"`` for
    the state reported when a subscription starts or after a reconnect (only
    versions this subscription had not seen yet). ``previous`` is the version
    this subscription saw before, if any.
    """

    slot: int
    version: int
    previous: int | None
    source: str
    committed_at: float | None = None
    model_type: str | None = None
    aliases: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


class EventSink(Protocol):
    """Where a subscription's events go besides its callback (the asyncio streams)."""

    def push(self, event: VersionEvent) -> None:
        """Called on the socket thread: must not block."""

    def close(self) -> None:
        """The subscription ended (unsubscribed or reader closed)."""


Callback = Callable[[VersionEvent], object]


class Subscription:
    """A standing interest in some slots' versions; cancel() it (or leave its ``with``)."""

    def __init__(
        self,
        reader: Reader,
        *,
        slots: frozenset[int],
        groups: frozenset[str],
        all_slots: bool,
        callback: Callback | None,
        sink: EventSink | None,
    ) -> None:
        self.slots = slots
        self.groups = groups
        self.all = all_slots
        self.callback = callback
        self._reader = reader
        self._sink = sink
        self._seen: dict[int, int] = {}  # socket thread only
        self._covered: set[int] = set()  # slots the daemon told us this subscription covers
        self.active = True

    def matches(self, slot: int, groups_of: Callable[[int], Collection[str]]) -> bool:
        if self.all or slot in self.slots or slot in self._covered:
            return True
        if self.groups and not self.groups.isdisjoint(groups_of(slot)):
            self._covered.add(slot)
            return True
        return False

    def cover(self, slots: Iterable[int]) -> None:
        """The daemon said this subscription covers ``slots`` (group members it resolved)."""
        self._covered.update(slots)

    def offer(self, slot: int, version: int) -> tuple[bool, int | None]:
        """Record ``version`` as seen for ``slot``: whether it is new to this subscription,
        and the version it saw before (None: none). Called on the socket thread only."""
        previous = self._seen.get(slot)
        if previous == version:
            return False, previous
        self._seen[slot] = version
        return True, previous

    def emit(self, event: VersionEvent, callbacks: Callable[[], Dispatcher]) -> None:
        """Hand ``event`` to the callback (on the dispatcher's thread) and to the sink."""
        if self.callback is not None:
            callbacks().submit(self.callback, event)
        if self._sink is not None:
            self._sink.push(event)

    def end(self) -> None:
        """Mark the subscription ended and tell its sink (the reader dropped it)."""
        self.active = False
        if self._sink is not None:
            self._sink.close()

    def request(self, request_id: int) -> Subscribe:
        return Subscribe(
            request_id=request_id,
            slots=tuple(sorted(self.slots)),
            groups=tuple(sorted(self.groups)),
            all=self.all,
        )

    def cancel(self) -> None:
        """Stop receiving events (idempotent)."""
        self._reader.unsubscribe(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __repr__(self) -> str:
        what = "all" if self.all else f"slots={sorted(self.slots)} groups={sorted(self.groups)}"
        return f"<Subscription {what}{'' if self.active else ' cancelled'}>"


class Dispatcher:
    """Runs subscription callbacks, in order, on a thread of their own.

    A slow callback delays the next callbacks, never the socket thread.
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Callback, VersionEvent] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, name=f"ctxstore-callbacks-{name}", daemon=True
        )
        self._thread.start()

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def submit(self, callback: Callback, event: VersionEvent) -> None:
        self._queue.put((callback, event))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            callback, event = item
            try:
                callback(event)
            except Exception:
                log.exception("subscription callback %r failed on %r", callback, event)

    def close(self, timeout: float) -> None:
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("a subscription callback is still running after %.1f s", timeout)


def slot_set(slots: int | Iterable[int] | None) -> frozenset[int]:
    """One slot or several, validated."""
    if slots is None:
        return frozenset()
    if isinstance(slots, Iterable) and not isinstance(slots, str | bytes):
        return frozenset(check_slot(s) for s in slots)
    return frozenset({check_slot(slots)})


def group_set(groups: str | Iterable[str] | None) -> frozenset[str]:
    """One group name or several, validated."""
    if groups is None:
        return frozenset()
    if isinstance(groups, str):
        return frozenset({check_label(groups, "group")})
    if not isinstance(groups, Iterable):
        raise InvalidInputError(f"groups must be a name or names, got {type(groups).__name__}")
    return frozenset(check_label(g, "group") for g in groups)


def checked_subscription(
    reader: Reader,
    slots: int | Iterable[int] | None,
    groups: str | Iterable[str] | None,
    all_slots: bool,
    *,
    callback: Callback | None,
    sink: EventSink | None,
) -> Subscription:
    """A Subscription of ``reader`` to what :meth:`Reader.subscribe` was given, validated."""
    wanted_slots = slot_set(slots)
    wanted_groups = group_set(groups)
    if not isinstance(all_slots, bool):
        raise InvalidInputError(f"all must be True or False, got {all_slots!r:.40}")
    if not (wanted_slots or wanted_groups or all_slots):
        raise InvalidInputError("subscribe needs slots, groups or all=True")
    if callback is not None and not callable(callback):
        raise InvalidInputError(f"callback must be callable, got {type(callback).__name__}")
    return Subscription(
        reader,
        slots=wanted_slots,
        groups=wanted_groups,
        all_slots=all_slots,
        callback=callback,
        sink=sink,
    )
