"""The asyncio face of the reader: awaitable wait_for, announcement streams, loop never blocked.

Runs against the fake daemon of test_reader.py; every coroutine is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from support.fake_daemon import WAIT, Env, make_env

from ctxstore.errors import WaitTimeoutError
from ctxstore.messages import Subscribe, Unsubscribe
from ctxstore.readers import AsyncReader, VersionEvent

T = TypeVar("T")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with make_env(tmp_path) as environment:
        yield environment


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(WAIT):
            return await coro

    return asyncio.run(bounded())


def test_get_answers_hits_on_the_loop_and_misses_from_a_thread(env: Env) -> None:
    reader = env.reader(connect=False)

    async def main() -> None:
        areader = AsyncReader(reader=reader)
        first = await areader.get(1)
        assert first.version == 1
        assert await areader.get(1) is first is reader.get(1)
        assert (await areader.get(1, 1)) is first
        version = env.publish(1, 2.0)
        assert (await areader.get(1)).version == version
        await areader.close()  # a wrapped reader stays open
        assert reader.get(1).version == version

    run(main())


def test_wait_for_a_version_already_adopted(env: Env) -> None:
    daemon = env.daemon()
    reader = env.reader()
    reader.get(1)
    daemon.wait(lambda s, m: isinstance(m, Subscribe) and 1 in m.slots, "follow of slot 1")
    version = env.publish(1, 2.0)
    daemon.announce(1, version)
    daemon.wait_ack(1, version)

    async def main() -> None:
        ctx = await AsyncReader(reader=reader).wait_for(1, version, timeout=WAIT)
        assert ctx.version == version

    run(main())


def test_wait_for_a_later_announcement_without_blocking_the_loop(env: Env) -> None:
    daemon = env.daemon()
    reader = env.reader()

    async def main() -> None:
        areader = AsyncReader(reader=reader)
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        tick_task = asyncio.create_task(ticker())
        wait_task = asyncio.create_task(areader.wait_for(5, 1, timeout=WAIT))
        # Once the reader follows slot 5, publish and announce it (from a worker thread,
        # as the daemon would from its own process).
        await asyncio.to_thread(
            daemon.wait, lambda s, m: isinstance(m, Subscribe) and 5 in m.slots, "follow of 5"
        )
        version = env.publish(5, 5.0)
        daemon.announce(5, version)
        ctx = await wait_task
        stop.set()
        await tick_task
        assert (ctx.slot, ctx.version) == (5, version)
        assert ticks > 0  # the loop kept running while we waited

    run(main())


def test_wait_for_times_out_with_the_readers_error(env: Env) -> None:
    reader = env.reader(connect=False)

    async def main() -> None:
        with pytest.raises(WaitTimeoutError):
            await AsyncReader(reader=reader).wait_for(1, 9, timeout=0.05)
        with pytest.raises(TimeoutError):  # also a builtin TimeoutError
            await AsyncReader(reader=reader).wait_for(1, 9, timeout=0)

    run(main())


def test_announcement_stream_yields_snapshot_then_announcements(env: Env) -> None:
    daemon = env.daemon()

    async def main() -> list[VersionEvent]:
        async with AsyncReader(
            env.store_dir, env.sock, "aio-reader", heartbeat_interval=0.05
        ) as ar:
            env.readers.append(ar.reader)
            seen: list[VersionEvent] = []
            async with ar.announcements(slots=[1]) as stream:
                async for event in stream:
                    seen.append(event)
                    if event.version == 1:
                        version = env.publish(1, 2.0)
                        await asyncio.to_thread(daemon.announce, 1, version)
                    else:
                        break
            await asyncio.to_thread(
                daemon.wait, lambda s, m: isinstance(m, Unsubscribe), "the unsubscribe"
            )
            return seen

    events = run(main())
    assert [(e.slot, e.version, e.source) for e in events] == [
        (1, 1, "snapshot"),
        (1, 2, "announce"),
    ]


def test_a_slow_consumer_sees_the_newest_version_of_each_slot(env: Env) -> None:
    reader = env.reader(connect=False)

    async def main() -> list[tuple[int, int]]:
        stream = AsyncReader(reader=reader).announcements(all=True)
        async with stream:
            for slot, version in [(1, 2), (2, 1), (1, 3), (1, 4)]:
                stream.push(VersionEvent(slot, version, None, "announce"))
            await asyncio.sleep(0)  # let the thread-safe callbacks run
            return [(e.slot, e.version) async for e in _take(stream, 2)]

    assert run(main()) == [(2, 1), (1, 4)]


async def _take(stream: Any, n: int) -> Any:
    async for event in stream:
        yield event
        n -= 1
        if n == 0:
            return


def test_closing_the_reader_ends_the_stream(env: Env) -> None:
    reader = env.reader(connect=False)

    async def main() -> list[VersionEvent]:
        stream = AsyncReader(reader=reader).announcements(slots=[1])
        got: list[VersionEvent] = []

        async def consume() -> None:
            async for event in stream:
                got.append(event)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0)
        closer = threading.Thread(target=reader.close)
        closer.start()
        await task  # ends instead of waiting forever
        await asyncio.to_thread(closer.join, WAIT)
        return got

    assert run(main()) == []
