"""The daemon's caps as arithmetic, and the limiter that keeps repeated log lines few."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from ctxstore.daemon.budgets import (
    ANSWERED_COST,
    MIN_WAIT,
    PartialPool,
    RateBudget,
    UidBudgets,
    answered,
    cost_of,
)
from ctxstore.daemon.config import DaemonConfig
from ctxstore.daemon.limits import RESERVED_FDS, derive_limits
from ctxstore.daemon.logs import LogLimiter, RepeatFilter, limited_exception_handler
from ctxstore.messages import Ack, Ping, Subscribe


def test_caps_are_derived_from_the_descriptor_limit_as_documented() -> None:
    limits = derive_limits(DaemonConfig(), nofile=400)
    usable = 400 - RESERVED_FDS
    assert limits.http_connections == usable // 4
    assert limits.event_streams == (usable // 4) // 2
    assert limits.connections == usable - usable // 4
    assert limits.per_uid == limits.connections // 2
    assert limits.partial_bytes == 4 * DaemonConfig().max_frame_size
    # every HTTP connection (streams among them), every socket peer and the reserve fit
    assert limits.http_connections + limits.connections + RESERVED_FDS == 400


def test_derived_caps_stop_at_their_ceilings_and_configured_ones_may_pass_them() -> None:
    big = derive_limits(DaemonConfig(), nofile=65536)
    assert (big.connections, big.http_connections) == (4096, 1024)
    assert derive_limits(DaemonConfig(max_connections=10_000), nofile=65536).connections == 10_000


def test_configured_caps_are_kept_or_lowered_to_what_the_descriptors_allow(
    caplog: pytest.LogCaptureFixture,
) -> None:
    small = DaemonConfig(max_connections=8, max_connections_per_uid=3, max_event_streams=2)
    limits = derive_limits(small, nofile=1024)
    assert (limits.connections, limits.per_uid, limits.event_streams) == (8, 3, 2)
    with caplog.at_level(logging.WARNING, logger="ctxstore.daemon"):
        greedy = derive_limits(DaemonConfig(max_connections=100_000), nofile=400)
    assert greedy.connections == derive_limits(DaemonConfig(), nofile=400).connections
    assert "max_connections = 100000 needs more file descriptors" in caplog.text


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_repeated_event_is_a_few_lines_and_then_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    logger = logging.getLogger("test.limiter")
    limiter = LogLimiter(logger, interval=10.0, burst=3, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.limiter"):
        written = [
            limiter.log("refused", logging.WARNING, "peer %d refused", i) for i in range(100)
        ]
        assert sum(written) == 3 and limiter.suppressed("refused") == 97
        limiter.log("other", logging.WARNING, "another kind")  # counted apart
        clock.now = 10.0
        limiter.log("refused", logging.WARNING, "peer %d refused", 100)
    lines = caplog.messages
    assert lines[:3] == ["peer 0 refused", "peer 1 refused", "peer 2 refused"]
    assert lines[3] == "another kind"
    assert lines[4] == "peer 100 refused (97 more like this in the last 10 s)"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="test.limiter"):
        for _ in range(5):
            limiter.log("refused", logging.WARNING, "again")
        clock.now = 25.0
        limiter.flush()  # events stopped: the count is still told
    assert caplog.messages[-1] == "refused: 3 more like this in the last 10 s"


def test_the_repeat_filter_keeps_a_foreign_loggers_flood_to_a_few_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    noisy = logging.getLogger("test.noisy")
    repeat = RepeatFilter(10.0, burst=2)
    noisy.addFilter(repeat)
    try:
        with caplog.at_level(logging.WARNING, logger="test.noisy"):
            for _ in range(10_000):
                noisy.warning("socket.send() raised exception.")
        assert caplog.messages == ["socket.send() raised exception."] * 2
    finally:
        noisy.removeFilter(repeat)


def test_rate_budget_makes_a_flooder_wait_and_answered_frames_cost_more() -> None:
    clock = Clock()
    budget = RateBudget(10 * ANSWERED_COST, clock)
    assert cost_of(Ping(nonce=1)) == ANSWERED_COST
    assert cost_of(Subscribe(request_id=1, all=True)) == ANSWERED_COST
    assert cost_of(Subscribe(request_id=1, slots=(1, 2))) == 1  # a reader's, one per slot
    assert cost_of(Ack(slot=1, version=1)) == 1
    assert [budget.take(ANSWERED_COST) for _ in range(10)] == [0.0] * 10  # a second's worth
    assert budget.take(ANSWERED_COST) == pytest.approx(max(0.1, MIN_WAIT))  # then 10 a second
    assert budget.waited == 1
    clock.now = 1.0
    assert budget.take(1) == 0.0


def test_partial_pool_counts_every_peers_unfinished_bytes() -> None:
    async def scenario() -> None:
        pool = PartialPool(100)
        pool.hold(1, 60)
        pool.hold(2, 50)
        assert pool.total == 110 and pool.room() == 0
        waiter = asyncio.ensure_future(pool.wait_for_room())
        await asyncio.sleep(0)
        assert not waiter.done()
        pool.release(1)
        await asyncio.wait_for(waiter, 5)
        assert pool.room() == 50 and len(pool) == 1

    asyncio.run(scenario())


def test_the_loops_error_reports_are_a_few_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    """asyncio reports EMFILE once per refused accept and, after the listening socket
    closed, each of its retries with its own traceback: a few lines per kind, not one each."""
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for i in range(2000):
                limited_exception_handler(loop, {
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(24, "Too many open files"),
                })  # fmt: skip
                limited_exception_handler(loop, {
                    "message": f"Exception in callback _start_serving(<when={i}>)",
                    "exception": ValueError("Invalid file descriptor: -1"),
                })  # fmt: skip
    finally:
        loop.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert sum("out of system resource" in m for m in messages) <= 5
    assert sum("_start_serving" in m for m in messages) <= 5


def test_answered_frames_of_one_uid_share_a_bucket_and_queue_for_it() -> None:
    """Each peer of a uid has its own bucket; the frames the daemon answers also draw from
    one bucket per uid, and past it each waits for what those before it took."""
    clock = Clock()
    uids = UidBudgets(2 * ANSWERED_COST, clock)
    first, second, other = uids.bucket(1000), uids.bucket(1000), uids.bucket(1001)
    assert first is second and other is not first and len(uids) == 2
    assert answered(cost_of(Ping(nonce=1))) and not answered(cost_of(Ack(slot=1, version=1)))
    assert [first.take(ANSWERED_COST) for _ in range(2)] == [0.0, 0.0]  # a second's worth
    assert first.take(ANSWERED_COST) == pytest.approx(0.5)  # owed: half a second
    assert second.take(ANSWERED_COST) == pytest.approx(1.0)  # queued behind it
    assert other.take(ANSWERED_COST) == 0.0  # another uid is not held up
    del first, second
    gc.collect()
    assert len(uids) == 1  # the bucket went with its uid's last peer
