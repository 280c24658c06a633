"""What one peer may cost the daemon: frames per second, frames per loop turn, unfinished bytes.

Every socket peer is served by the one event loop. A peer that sends frames as
fast as it can must not starve the others, and a peer that starts frames it
never finishes must not fill the daemon's memory. So:

* :class:`RateBudget`: a token bucket per peer, ``rate`` units a second, up to
  one second's worth saved. A frame costs 1 unit; one the daemon must answer at
  once (ping, status request, a subscription to groups or to everything) costs
  :data:`ANSWERED_COST`. A peer out
  of units is simply not read until it has some again: its bytes wait in the
  kernel and its own sends block, which costs the daemon nothing.
* :class:`UidBudgets`: one more bucket per uid, shared by all its peers, that only
  answered frames draw from (``uid_rate`` units a second). Fifty peers of one uid
  pinging at their own rate would make the loop encode and write 2,500 replies a
  second; together they get the rate of two peers, and the acks and heartbeats of
  that uid's readers never wait for it.
* :class:`PartialPool`: the bytes of unfinished frames held for all peers
  together. A peer in the middle of a frame reads more only while the pool has
  room; otherwise it waits (its frame's deadline still runs).

Both only read the loop's clock and sleep; neither does I/O.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable

from ctxstore.wire import DamageReport, Message, Ping, StatusRequest, Subscribe

#: units a frame the daemon answers at once costs (an ack or a heartbeat costs 1): it costs
#: the daemon an encode and a write besides the decode, and no client sends them routinely;
#: a damage report (a query on the loop, and maybe a hash) is priced the same
ANSWERED_COST = 20
#: the shortest wait of a peer out of units (fewer, larger turns for a flooder)
MIN_WAIT = 0.05
_ANSWERED = (Ping, StatusRequest, DamageReport)


def cost_of(message: Message) -> int:
    """A subscription to slots costs 1 (a reader sends one per slot it reads); one to
    groups or to everything costs what an answered frame does (it runs queries)."""
    if isinstance(message, Subscribe):
        return ANSWERED_COST if message.groups or message.all else 1
    return ANSWERED_COST if isinstance(message, _ANSWERED) else 1


class RateBudget:
    """One peer's token bucket: ``rate`` units per second, at most ``rate`` saved.

    Units taken past empty are owed (the bucket goes below zero), so peers sharing
    a bucket queue up: each waits for what it and those before it took."""

    __slots__ = ("__weakref__", "_clock", "_rate", "_stamp", "_tokens", "waited")

    def __init__(self, rate: int, clock: Callable[[], float]) -> None:
        self._rate = float(rate)
        self._clock = clock
        self._tokens = float(rate)
        self._stamp = clock()
        #: how many times this peer had to wait for units (for the close log line)
        self.waited = 0

    def take(self, cost: int) -> float:
        """Spend ``cost`` units; the seconds to wait first (0.0 when they were there)."""
        now = self._clock()
        self._tokens = min(self._rate, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        self._tokens -= cost
        if self._tokens >= 0:
            return 0.0
        self.waited += 1
        # at least MIN_WAIT: a flooder then sends a few frames per wake-up, not one
        return max(-self._tokens / self._rate, MIN_WAIT)

    async def spend(self, cost: int) -> None:
        delay = self.take(cost)
        if delay > 0:
            await asyncio.sleep(delay)


class UidBudgets:
    """The answered frames' buckets, one per uid with a peer connected (a bucket goes with
    its uid's last peer)."""

    def __init__(self, rate: int, clock: Callable[[], float]) -> None:
        #: units a second for each uid's bucket made from now on
        self.rate = rate
        self._clock = clock
        self._buckets: weakref.WeakValueDictionary[int, RateBudget] = weakref.WeakValueDictionary()

    def bucket(self, uid: int) -> RateBudget:
        """The bucket ``uid``'s peers share; hold it as long as the peer is connected."""
        bucket = self._buckets.get(uid)
        if bucket is None:
            bucket = self._buckets[uid] = RateBudget(self.rate, self._clock)
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)


def answered(cost: int) -> bool:
    """Whether a frame of this cost draws from its uid's bucket too."""
    return cost >= ANSWERED_COST


class PartialPool:
    """Bytes of unfinished frames, by peer, against one limit for the whole daemon."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[int, int] = {}
        self.total = 0
        self._freed = asyncio.Event()

    def hold(self, session: int, size: int) -> None:
        """``session`` now holds ``size`` bytes of an unfinished frame (0: none)."""
        before = self._held.pop(session, 0)
        if size:
            self._held[session] = size
        self.total += size - before
        if size < before:
            self._freed.set()

    def release(self, session: int) -> None:
        self.hold(session, 0)

    def room(self) -> int:
        return max(0, self.limit - self.total)

    async def wait_for_room(self) -> None:
        """Until some peer finished or dropped a frame (the caller checks the room again)."""
        self._freed.clear()
        await self._freed.wait()

    def __len__(self) -> int:
        return len(self._held)
