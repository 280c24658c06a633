"""Publish keys: a retried publish commits once and answers with the version of the first try.

A client gives each publish a key (random unless it chose one). The daemon
remembers the newest ``capacity`` keys it committed, key -> (slot, version),
and the keys of publishes still in flight: a retry that arrives while the
first try commits waits for it and answers with its version; a retry after a
failed first try commits. Beyond memory, the index records each key with its
version in the same COMMIT (``PersistentStore.publish_key_version``), so a
retry after a daemon restart, even one that crashed mid-commit, still commits
once, for as long as retention keeps that version.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from ctxstore.errors import ConflictError

#: (slot, version) a key committed
Committed = tuple[int, int]


class PublishKeys:
    """Recent keys -> (slot, version), bounded; keys in flight -> a future of their outcome."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._done: OrderedDict[str, Committed] = OrderedDict()
        #: the outcome of a key's publish in flight: (slot, version), or None if it failed
        self._flight: dict[str, asyncio.Future[Committed | None]] = {}

    def __len__(self) -> int:
        return len(self._done)

    async def run(
        self,
        key: str,
        slot: int,
        lookup: Callable[[], Awaitable[Committed | None]],
        publish: Callable[[], Awaitable[int]],
        waiting: Callable[[], None] = lambda: None,
    ) -> int:
        """The version ``key`` committed: remembered, in flight (awaited), recorded in the
        index (``lookup``), or else committed now by ``publish``. ``waiting`` is called
        when this call waits for the same key's publish in flight."""
        while True:
            done = self._done.get(key)
            if done is not None:
                self._done.move_to_end(key)
                return _for_slot(key, slot, done)
            flight = self._flight.get(key)
            if flight is None:
                break
            waiting()
            outcome = await asyncio.shield(flight)
            if outcome is not None:
                return _for_slot(key, slot, outcome)
            # the first try failed: this one tries again (or waits for another retry)
        future: asyncio.Future[Committed | None] = asyncio.get_running_loop().create_future()
        self._flight[key] = future
        outcome = None
        try:
            outcome = await lookup()
            if outcome is None:
                outcome = (slot, await publish())
        finally:
            del self._flight[key]
            future.set_result(outcome)
            if outcome is not None:
                self._remember(key, outcome)
        return _for_slot(key, slot, outcome)

    def _remember(self, key: str, committed: Committed) -> None:
        if self.capacity <= 0:
            return
        self._done[key] = committed
        self._done.move_to_end(key)
        while len(self._done) > self.capacity:
            self._done.popitem(last=False)


def _for_slot(key: str, slot: int, committed: Committed) -> int:
    if committed[0] != slot:
        raise ConflictError(
            f"publish key {key!r} already committed version {committed[1]} of slot "
            f"{committed[0]}; a publish to slot {slot} needs a key of its own"
        )
    return committed[1]
