"""ContextCache: LRU by count and bytes, idle expiry on an injected clock, counters, threads.

A hypothesis state machine drives the cache and a plain reference model side by
side (an OrderedDict with last-use times) and checks they agree on every get,
on the contents and on the counters. The clock is a variable; nothing sleeps.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ctxstore import Context, InvalidInputError
from ctxstore.cache import CacheStats, ContextCache


class Clock:
    """A timer the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ctx(nbytes: int, tag: int = 0) -> Context:
    return Context({"w": np.full(nbytes, tag % 256, np.uint8)}, metadata={"tag": tag})


def test_hit_miss_and_identity() -> None:
    cache = ContextCache()
    context = ctx(10)
    assert cache.get_cached_context("a") is None
    cache.cache_context("a", context)
    assert cache.get_cached_context("a") is context
    assert "a" in cache and "b" not in cache
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.items, stats.bytes) == (1, 1, 1, 10)


def test_any_hashable_key() -> None:
    cache = ContextCache()
    keys: list[Any] = [1, (1, 2), "x", frozenset({3}), None]
    for i, key in enumerate(keys):
        cache.cache_context(key, ctx(1, i))
    for i, key in enumerate(keys):
        hit = cache.get_cached_context(key)
        assert hit is not None and hit.metadata["tag"] == i


def test_unhashable_keys_and_non_contexts_are_refused() -> None:
    cache = ContextCache()
    for key in ([1], {"a": 1}, (1, [2])):
        with pytest.raises(InvalidInputError, match="not hashable"):
            cache.cache_context(key, ctx(1))
        with pytest.raises(InvalidInputError, match="not hashable"):
            cache.get_cached_context(key)
        with pytest.raises(InvalidInputError, match="not hashable"):
            cache.pop(key)
        with pytest.raises(InvalidInputError, match="not hashable"):
            _ = key in cache
    with pytest.raises(InvalidInputError, match="only a Context"):
        cache.cache_context("a", {"w": np.ones(1)})  # type: ignore[arg-type]
    assert cache.stats() == CacheStats(0, 0, 0, 0, 0, 0, 0, 128, None)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_items": 0},
        {"max_items": -1},
        {"max_items": 1.5},
        {"max_items": True},
        {"max_bytes": -1},
        {"max_bytes": 1.0},
        {"ttl": 0},
        {"ttl": -1.0},
        {"ttl": float("inf")},
        {"ttl": float("nan")},
        {"ttl": "60"},
        {"timer": 5},
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError, match=next(iter(kwargs))):
        ContextCache(**kwargs)


def test_count_bound_evicts_least_recently_used() -> None:
    cache = ContextCache(max_items=2)
    cache.cache_context("a", ctx(1))
    cache.cache_context("b", ctx(1))
    assert cache.get_cached_context("a") is not None  # b is now least recently used
    cache.cache_context("c", ctx(1))
    assert "b" not in cache
    assert "a" in cache and "c" in cache
    assert cache.stats().evictions == 1
    assert len(cache) == 2


def test_contains_does_not_count_as_a_use() -> None:
    cache = ContextCache(max_items=2)
    cache.cache_context("a", ctx(1))
    cache.cache_context("b", ctx(1))
    assert "a" in cache
    cache.cache_context("c", ctx(1))
    assert "a" not in cache
    assert cache.stats().hits == cache.stats().misses == 0


def test_byte_bound_evicts_until_it_fits() -> None:
    cache = ContextCache(max_items=100, max_bytes=100)
    for key in "abcd":
        cache.cache_context(key, ctx(30))
    assert cache.total_bytes == 90
    assert "a" not in cache
    cache.cache_context("e", ctx(70))  # needs room for 70: b and c go
    assert [k for k in "abcde" if k in cache] == ["d", "e"]
    stats = cache.stats()
    assert (stats.bytes, stats.items, stats.evictions) == (100, 2, 3)


def test_replacing_an_entry_updates_its_size() -> None:
    cache = ContextCache(max_bytes=100)
    cache.cache_context("a", ctx(10))
    cache.cache_context("b", ctx(10))
    cache.cache_context("a", ctx(80, 1))
    assert cache.total_bytes == 90
    hit = cache.get_cached_context("a")
    assert hit is not None and hit.metadata["tag"] == 1
    cache.cache_context("b", ctx(30))  # a is least recent: it must go for b to grow
    assert "a" not in cache and cache.total_bytes == 30


def test_too_large_context_is_not_cached_and_drops_the_stale_entry() -> None:
    cache = ContextCache(max_bytes=50)
    cache.cache_context("a", ctx(10))
    cache.cache_context("keep", ctx(10))
    cache.cache_context("a", ctx(51))  # no error, not cached, and the old "a" is gone
    assert "a" not in cache
    assert cache.get_cached_context("a") is None
    stats = cache.stats()
    assert (stats.rejected, stats.items, stats.bytes, stats.evictions) == (1, 1, 10, 0)


def test_empty_contexts_cost_no_bytes() -> None:
    cache = ContextCache(max_items=3, max_bytes=0)
    for key in range(5):
        cache.cache_context(key, Context())
    assert len(cache) == 3 and cache.total_bytes == 0


def test_pop_and_clear() -> None:
    cache = ContextCache()
    context = ctx(5)
    cache.cache_context("a", context)
    cache.cache_context("b", ctx(5))
    assert cache.pop("a") is context
    assert cache.pop("a") is None
    cache.get_cached_context("b")
    cache.clear()
    assert len(cache) == 0 and cache.total_bytes == 0
    stats = cache.stats()
    assert (stats.hits, stats.evictions) == (1, 0)  # counters survive clear()


def test_idle_entries_expire_and_hits_renew_the_lease() -> None:
    clock = Clock()
    cache = ContextCache(ttl=10, timer=clock)
    cache.cache_context("hot", ctx(1))
    cache.cache_context("cold", ctx(1))
    for _ in range(5):
        clock.now += 6
        assert cache.get_cached_context("hot") is not None  # used every 6 s: stays
    assert "cold" not in cache
    assert len(cache) == 1
    stats = cache.stats()
    assert (stats.expired, stats.evictions, stats.items, stats.bytes) == (1, 1, 1, 1)
    clock.now += 10
    assert cache.get_cached_context("hot") is None
    assert cache.stats().expired == 2


def test_expiry_is_exact_at_the_boundary() -> None:
    clock = Clock()
    cache = ContextCache(ttl=5, timer=clock)
    cache.cache_context("a", ctx(1))
    clock.now = 4.999
    assert "a" in cache
    clock.now = 5.0
    assert "a" not in cache


def test_ttl_with_bounds() -> None:
    clock = Clock()
    cache = ContextCache(max_items=2, max_bytes=10, ttl=3, timer=clock)
    cache.cache_context("a", ctx(4))
    clock.now = 2
    cache.cache_context("b", ctx(4))
    clock.now = 4  # a expired, b alive
    cache.cache_context("c", ctx(4))  # fits without evicting b
    assert "b" in cache and "c" in cache
    stats = cache.stats()
    assert (stats.evictions, stats.expired, stats.bytes) == (1, 1, 8)


def test_repr_summarises() -> None:
    cache = ContextCache(max_items=4)
    cache.cache_context(1, ctx(3))
    assert repr(cache) == "<ContextCache items=1/4 bytes=3 hits=0>"


def test_concurrent_use_keeps_the_invariants() -> None:
    cache = ContextCache(max_items=8, max_bytes=64)
    contexts = [ctx(n % 20, n) for n in range(40)]
    gets = [0] * 6
    errors: list[BaseException] = []
    start = threading.Barrier(6, timeout=30)

    def work(worker: int) -> None:
        try:
            start.wait()
            rng = np.random.default_rng(worker)
            for _ in range(3000):
                key = int(rng.integers(40))
                if rng.random() < 0.3:
                    cache.cache_context(key, contexts[key])
                else:
                    gets[worker] += 1
                    hit = cache.get_cached_context(key)
                    assert hit is None or hit is contexts[key]
                if rng.random() < 0.01:
                    cache.pop(key)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors
    stats = cache.stats()
    assert stats.hits + stats.misses == sum(gets)
    assert stats.items <= 8 and stats.bytes <= 64
    assert stats.bytes == sum(
        c.nbytes for k in range(40) if (c := cache.get_cached_context(k)) is not None
    )


# -- the cache against a reference model --------------------------------------------------------


class Model:
    """The specification, written the obvious way: an OrderedDict in use order."""

    def __init__(self, max_items: int, max_bytes: int | None, ttl: float | None) -> None:
        self.max_items, self.max_bytes, self.ttl = max_items, max_bytes, ttl
        self.entries: OrderedDict[int, tuple[int, float]] = OrderedDict()  # key -> (size, used)
        self.hits = self.misses = self.evictions = self.expired = self.rejected = 0

    def live(self, key: int, now: float) -> bool:
        return key in self.entries and (self.ttl is None or now < self.entries[key][1] + self.ttl)

    def sweep(self, now: float) -> None:
        for key in [k for k in self.entries if not self.live(k, now)]:
            del self.entries[key]
            self.evictions += 1
            self.expired += 1

    def evict_lru(self) -> None:
        self.entries.popitem(last=False)
        self.evictions += 1

    def get(self, key: int, now: float) -> bool:
        if not self.live(key, now):
            self.misses += 1
            return False
        self.hits += 1
        if self.ttl is not None:
            self.sweep(now)
        self.entries[key] = (self.entries[key][0], now)
        self.entries.move_to_end(key)
        return True

    def put(self, key: int, size: int, now: float) -> None:
        self.sweep(now)
        if self.max_bytes is not None and size > self.max_bytes:
            self.rejected += 1
            self.entries.pop(key, None)
            return
        if key not in self.entries:
            while len(self.entries) >= self.max_items:
                self.evict_lru()
        limit = self.max_bytes
        while limit is not None and self.total() - self.size_of(key) + size > limit:
            self.evict_lru()
        self.entries[key] = (size, now)
        self.entries.move_to_end(key)

    def pop(self, key: int, now: float) -> bool:
        self.sweep(now)
        return self.entries.pop(key, None) is not None

    def size_of(self, key: int) -> int:
        return self.entries[key][0] if key in self.entries else 0

    def total(self) -> int:
        return sum(size for size, _ in self.entries.values())


KEYS = st.integers(0, 7)


class CacheMachine(RuleBasedStateMachine):
    @initialize(
        max_items=st.integers(1, 5),
        max_bytes=st.none() | st.integers(0, 40),
        ttl=st.none() | st.sampled_from([1.0, 2.5, 4.0]),
    )
    def start(self, max_items: int, max_bytes: int | None, ttl: float | None) -> None:
        self.clock = Clock()
        self.cache = ContextCache(max_items, max_bytes, ttl, timer=self.clock)
        self.model = Model(max_items, max_bytes, ttl)
        self.stored: dict[int, Context] = {}

    @rule(key=KEYS, size=st.integers(0, 20))
    def put(self, key: int, size: int) -> None:
        context = ctx(size, key)
        self.stored[key] = context
        self.cache.cache_context(key, context)
        self.model.put(key, size, self.clock.now)

    @rule(key=KEYS)
    def get(self, key: int) -> None:
        got = self.cache.get_cached_context(key)
        assert (got is not None) == self.model.get(key, self.clock.now)
        assert got is None or got is self.stored[key]

    @rule(key=KEYS)
    def pop(self, key: int) -> None:
        got = self.cache.pop(key)
        assert (got is not None) == self.model.pop(key, self.clock.now)

    @rule(dt=st.sampled_from([0.5, 1.0, 2.0]))
    def tick(self, dt: float) -> None:
        self.clock.now += dt

    @precondition(lambda self: self.clock.now > 0)
    @rule()
    def clear(self) -> None:
        self.cache.clear()
        self.model.entries.clear()

    @invariant()
    def agree(self) -> None:
        self.model.sweep(self.clock.now)
        stats = self.cache.stats()
        model = self.model
        expected = (
            model.hits, model.misses, model.evictions, model.expired, model.rejected,
            len(model.entries), model.total(),
        )  # fmt: skip
        got = dataclasses.astuple(stats)[:7]
        assert got == expected
        assert all(k in self.cache for k in model.entries)
        assert stats.items <= stats.max_items
        assert stats.max_bytes is None or stats.bytes <= stats.max_bytes


CacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestCacheAgainstModel = CacheMachine.TestCase
