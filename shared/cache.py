"""ContextCache: a thread-safe LRU of Contexts, bounded by count and by tensor bytes.

Readers keep the contexts they serve here, keyed by whatever identifies them
(a slot, a ``(slot, version)`` pair, a name). The cache is a cachetools
``LRUCache`` (or ``TTLCache`` when an idle expiry is set) under one lock; the
counters live beside it. The lock is a plain Lock, not an RLock: no method
re-enters it, and on this hot path an RLock costs about half as much again.
Contexts are immutable, so a hit hands out the cached object itself.

Bounds: at most ``max_items`` entries and at most ``max_bytes`` of tensor data
(``Context.nbytes``); the least recently used entries go first. A context
larger than ``max_bytes`` on its own is not cached (and replaces nothing: an
older entry under the same id is dropped, so the cache never serves a context
the caller has superseded); ``stats().rejected`` counts those.

Idle expiry: with ``ttl`` set, an entry not read or written for ``ttl``
seconds (by ``timer``, injectable so tests never sleep) is dropped. A hit
renews the entry's lease, which re-inserts it into the TTLCache: with a ttl a
hit costs a few microseconds, without one it is the lock and the LRU lookup.
``stats().evictions`` counts entries dropped by the bounds and by expiry;
``stats().expired`` counts the expiries alone.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from cachetools import LRUCache, TTLCache

from .context import Context
from .errors import InvalidInputError


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A consistent snapshot of a ContextCache's counters and size."""

    hits: int
    misses: int
    evictions: int  # dropped by the bounds or by expiry
    expired: int  # of which by idle expiry
    rejected: int  # contexts too large to cache at all
    items: int
    bytes: int
    max_items: int
    max_bytes: int | None


class _Entry:
    """A cached context with its size, computed once (a context may hold hundreds of arrays)."""

    __slots__ = ("context", "nbytes")

    def __init__(self, context: Context) -> None:
        self.context = context
        self.nbytes = context.nbytes


def _entry_size(entry: _Entry) -> int:
    return entry.nbytes


class _LRU(LRUCache[Hashable, _Entry]):
    """LRUCache that counts what its bounds push out."""

    evictions = 0

    def popitem(self) -> tuple[Hashable, _Entry]:
        item = super().popitem()
        self.evictions += 1
        return item


class _IdleLRU(TTLCache[Hashable, _Entry, float]):
    """TTLCache (LRU order plus per-entry expiry) that counts evictions and expiries."""

    evictions = 0
    expired = 0

    def popitem(self) -> tuple[Hashable, _Entry]:
        item = super().popitem()
        self.evictions += 1
        return item

    def expire(self, time: float | None = None) -> list[tuple[Hashable, _Entry]]:
        gone = super().expire(time)
        if gone:
            self.evictions += len(gone)
            self.expired += len(gone)
        return gone


class ContextCache:
    """Thread-safe LRU of contexts, bounded by count and tensor bytes, with optional idle expiry."""

    def __init__(
        self,
        max_items: int = 128,
        max_bytes: int | None = None,
        ttl: float | None = None,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise InvalidInputError(f"max_items must be an integer >= 1, got {max_items!r:.40}")
        if max_bytes is not None and (
            isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0
        ):
            raise InvalidInputError(
                f"max_bytes must be None or an integer >= 0, got {max_bytes!r:.40}"
            )
        if ttl is not None and (
            isinstance(ttl, bool)
            or not isinstance(ttl, int | float)
            or not math.isfinite(ttl)
            or ttl <= 0
        ):
            raise InvalidInputError(f"ttl must be None or a number of seconds > 0, got {ttl!r:.40}")
        if not callable(timer):
            raise InvalidInputError("timer must be a callable returning seconds")
        self._max_items = max_items
        self._max_bytes = max_bytes
        limit = math.inf if max_bytes is None else max_bytes
        self._cache: _LRU | _IdleLRU
        if ttl is None:
            self._cache = _LRU(limit, getsizeof=_entry_size)
        else:
            self._cache = _IdleLRU(limit, ttl, timer=timer, getsizeof=_entry_size)
        self._idle = ttl is not None
        #: the cache again when it expires entries (an isinstance test on these ABCs is
        #: Python work on every operation)
        self._expiring: _IdleLRU | None = self._cache if isinstance(self._cache, _IdleLRU) else None
        self._lock = threading.Lock()  # never re-entered; cheaper than an RLock on the hit path
        self._hits = 0
        self._misses = 0
        self._rejected = 0

    def get_cached_context(self, key: Hashable) -> Context | None:
        """The context cached under ``key`` (now the most recently used), or None."""
        with self._lock:
            try:
                entry = self._cache[key]  # one lookup on the hit path: a miss is rarer
            except KeyError:
                self._misses += 1
                return None
            except TypeError:
                raise InvalidInputError(f"cache key {key!r:.60} is not hashable") from None
            self._hits += 1
            if self._idle:
                self._cache[key] = entry  # renew the idle lease
            return entry.context

    def cache_context(self, key: Hashable, context: Context) -> None:
        """Cache ``context`` under ``key``, replacing any entry there, evicting LRU ones to fit."""
        if not isinstance(context, Context):
            raise InvalidInputError(f"only a Context can be cached, got {type(context).__name__}")
        try:
            hash(key)
        except TypeError:
            raise InvalidInputError(f"cache key {key!r:.60} is not hashable") from None
        entry = _Entry(context)
        with self._lock:
            cache = self._cache
            self._expire()
            if self._max_bytes is not None and entry.nbytes > self._max_bytes:
                self._rejected += 1
                cache.pop(key, None)
                return
            if key not in cache:
                while len(cache) >= self._max_items:
                    cache.popitem()
            cache[key] = entry

    def pop(self, key: Hashable) -> Context | None:
        """Remove and return the context cached under ``key`` (None if there is none)."""
        with self._lock:
            self._expire()
            try:
                entry = self._cache.pop(key, None)
            except TypeError:
                raise InvalidInputError(f"cache key {key!r:.60} is not hashable") from None
            return None if entry is None else entry.context

    def clear(self) -> None:
        """Drop every entry (not counted as evictions); the counters are kept."""
        with self._lock:
            self._cache.clear()

    def stats(self) -> CacheStats:
        with self._lock:
            self._expire()
            cache = self._cache
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=cache.evictions,
                expired=cache.expired if isinstance(cache, _IdleLRU) else 0,
                rejected=self._rejected,
                items=len(cache),
                bytes=int(cache.currsize),
                max_items=self._max_items,
                max_bytes=self._max_bytes,
            )

    @property
    def total_bytes(self) -> int:
        """Tensor bytes of the cached contexts."""
        with self._lock:
            self._expire()
            return int(self._cache.currsize)

    @property
    def max_items(self) -> int:
        return self._max_items

    @property
    def max_bytes(self) -> int | None:
        return self._max_bytes

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._cache)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is cached and live; does not count as a use."""
        with self._lock:
            try:
                return key in self._cache
            except TypeError:
                raise InvalidInputError(f"cache key {key!r:.60} is not hashable") from None

    def __repr__(self) -> str:
        s = self.stats()
        return f"<ContextCache items={s.items}/{s.max_items} bytes={s.bytes} hits={s.hits}>"

    def _expire(self) -> None:
        if self._expiring is not None:
            self._expiring.expire()
