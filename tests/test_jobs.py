"""The build-job queue: order, retries with backoff, cancel, stop, restart, crash, validation.

Time is injected: ``FakeTime.sleep`` records each delay and moves the fake clock
at once, ``ManualTime.sleep`` blocks until the test moves the clock. Nothing
here sleeps for real or asserts on elapsed time; every asyncio scenario runs
under a generous bound that only a hung test reaches.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.jobs import BOUND, FakeTime, make_queue, run_async

from ctxstore.daemon.jobs import (
    JOB_STATES,
    PROGRESS_INTERVAL,
    Job,
    JobQueue,
    backoff_delay,
)
from ctxstore.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    ReadOnlyError,
    WaitTimeoutError,
)
from ctxstore.nodes import create_node
from ctxstore.store import PersistentStore
from ctxstore.store.schema import LATEST

LLM = {"vocab_size": 16, "d_model": 8, "n_heads": 2, "n_layers": 1}


class ManualTime(FakeTime):
    """A clock the test moves; a sleep returns once the clock has reached its end."""

    def __init__(self, now: float = 1000.0) -> None:
        super().__init__(now)
        self.sleeping = asyncio.Event()
        self._due: list[tuple[float, asyncio.Future[None]]] = []

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        future = asyncio.get_running_loop().create_future()
        self._due.append((self.now + delay, future))
        self.sleeping.set()
        await future

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for due, future in self._due:
            if due <= self.now and not future.done():
                future.set_result(None)


class Script:
    """A run(): per call, raise the next scripted exception or return the next version.

    Records the jobs it ran (in order) and how many ran at once at most.
    """

    def __init__(self, *outcomes: int | BaseException, default: int | BaseException = 1) -> None:
        self.outcomes = list(outcomes)
        self.default = default
        self.calls: list[Job] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.started = asyncio.Event()
        self.gate: asyncio.Event | None = None

    async def __call__(self, job: Job) -> int:
        self.calls.append(job)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.started.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            outcome = self.outcomes.pop(0) if self.outcomes else self.default
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        finally:
            self.in_flight -= 1

    @property
    def ran(self) -> list[int]:
        return [job.id for job in self.calls]


def raw_jobs(store: PersistentStore) -> dict[int, tuple[str, int, float]]:
    """id -> (state, attempts, progress) straight from the index."""
    rows = store.read_query("SELECT id, state, attempts, progress FROM jobs ORDER BY id")
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


@pytest.fixture
def time() -> FakeTime:
    return FakeTime()


# -- backoff ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [(1, 1.0, 1.0), (2, 1.0, 2.0), (3, 1.0, 4.0), (3, 0.0, 2.0), (7, 1.0, 60.0), (7, 0.5, 45.0)],
)
def test_backoff_doubles_up_to_the_maximum_scaled_by_jitter(
    attempt: int, jitter: float, expected: float
) -> None:
    assert backoff_delay(attempt, 1.0, 60.0, jitter) == pytest.approx(expected)


def test_backoff_of_a_huge_attempt_count_stays_at_the_maximum() -> None:
    assert backoff_delay(10_000, 1.0, 60.0, 1.0) == 60.0
    assert backoff_delay(1, 1.0, 60.0, 7.0) == 1.0  # a jitter source out of [0, 1] is clamped


# -- retries ----------------------------------------------------------------------------------


def test_a_build_that_fails_twice_then_succeeds_ends_done_after_two_backoffs(
    store: PersistentStore, time: FakeTime
) -> None:
    run = Script(RuntimeError("flaky"), OSError("flakier"), 7)

    async def scenario() -> Job:
        queue = make_queue(store, run, time, jitter=lambda: 0.5, backoff_initial=2.0)
        job = queue.submit(1, "llm", LLM)
        await queue.start()
        done = await queue.wait(job.id)
        await queue.stop()
        return done

    job = run_async(scenario())
    assert (job.state, job.version, job.attempts, job.error) == ("done", 7, 3, None)
    assert job.progress == 1.0 and job.next_attempt_at is None
    # min(max, 2 * 2**(n-1)) * (0.5 + 0.5 / 2)
    assert time.sleeps == pytest.approx([1.5, 3.0])
    assert [call.attempts for call in run.calls] == [1, 2, 3]


def test_a_build_that_always_fails_ends_failed_after_max_attempts_with_its_error(
    store: PersistentStore, time: FakeTime
) -> None:
    run = Script(default=RuntimeError("the GPU caught fire"))

    async def scenario() -> Job:
        queue = make_queue(store, run, time, max_attempts=5, backoff_max=3.0)
        job = queue.submit(1, "llm", LLM)
        await queue.start()
        failed = await queue.wait(job.id)
        await queue.stop()
        return failed

    job = run_async(scenario())
    assert (job.state, job.attempts, job.version) == ("failed", 5, None)
    assert job.error == "RuntimeError: the GPU caught fire"
    assert len(run.calls) == 5
    assert time.sleeps == pytest.approx([1.0, 2.0, 3.0, 3.0])  # capped by backoff_max


@pytest.mark.parametrize(
    "error",
    [
        InvalidInputError("bad config found late"),
        ConflictError("model type clash"),
        NotFoundError("weights file '/srv/gone.npy' does not exist"),
    ],
)
def test_a_permanent_error_fails_the_job_at_once(
    store: PersistentStore, time: FakeTime, error: Exception
) -> None:
    run = Script(error, default=1)

    async def scenario() -> Job:
        queue = make_queue(store, run, time)
        job = queue.submit(1, "llm", LLM)
        await queue.start()
        failed = await queue.wait(job.id)
        await queue.stop()
        return failed

    job = run_async(scenario())
    assert (job.state, job.attempts) == ("failed", 1)
    assert job.error is not None and str(error) in job.error
    assert time.sleeps == []


def test_a_run_that_returns_no_version_fails_the_job(
    store: PersistentStore, time: FakeTime
) -> None:
    async def run(job: Job) -> int:
        return "seven"  # type: ignore[return-value]

    async def scenario() -> Job:
        queue = make_queue(store, run, time)
        job = queue.submit(1, "llm", LLM)
        await queue.start()
        failed = await queue.wait(job.id)
        await queue.stop()
        return failed

    job = run_async(scenario())
    assert job.state == "failed" and job.error is not None and "not a version" in job.error


def test_a_retry_waits_for_its_time_and_a_submit_wakes_the_worker_meanwhile(
    store: PersistentStore,
) -> None:
    async def scenario() -> None:
        time = ManualTime()
        run = Script(RuntimeError("once"), default=3)
        queue = make_queue(store, run, time, backoff_initial=10.0)
        first = queue.submit(1, "llm", LLM)
        await queue.start()
        await time.sleeping.wait()  # first failed; the worker sleeps until its retry
        assert time.sleeps == [10.0]
        backing_off = queue.get(first.id)
        assert backing_off.state == "pending"
        assert backing_off.next_attempt_at == 1010.0
        assert backing_off.error == "RuntimeError: once"
        second = queue.submit(2, "llm", LLM)
        assert (await queue.wait(second.id)).state == "done"  # woken early, retry not due
        assert queue.get(first.id).state == "pending" and run.ran == [first.id, second.id]
        time.advance(10.0)
        assert (await queue.wait(first.id)).state == "done"
        assert run.ran == [first.id, second.id, first.id]
        await queue.stop()

    run_async(scenario())


def test_a_retry_time_beyond_any_backoff_is_taken_now_after_the_clock_went_back(
    store: PersistentStore, time: FakeTime
) -> None:
    run = Script()

    async def scenario() -> Job:
        queue = make_queue(store, run, time, backoff_max=60.0)
        job = queue.submit(1, "llm", LLM)
        with store.write_transaction() as conn:
            conn.execute(
                "UPDATE jobs SET next_attempt_at = ? WHERE id = ?", (time.now + 3600, job.id)
            )
        await queue.start()
        done = await queue.wait(job.id)
        await queue.stop()
        return done

    assert run_async(scenario()).state == "done"
    assert time.sleeps == []


# -- order and concurrency --------------------------------------------------------------------


def test_higher_priority_runs_first(store: PersistentStore, time: FakeTime) -> None:
    run = Script()

    async def scenario() -> list[int]:
        queue = make_queue(store, run, time)
        ids = [queue.submit(1, "llm", LLM, priority=p).id for p in (0, 5, 1, 10, -3)]
        await queue.start()
        for job_id in ids:
            await queue.wait(job_id)
        await queue.stop()
        return ids

    low, five, one, ten, negative = run_async(scenario())
    assert run.ran == [ten, five, one, low, negative]


def test_jobs_of_one_priority_run_in_submission_order(
    store: PersistentStore, time: FakeTime
) -> None:
    run = Script()

    async def scenario() -> list[int]:
        queue = make_queue(store, run, time)
        ids = [queue.submit(slot, "llm", LLM, priority=2).id for slot in (9, 3, 7, 1, 5)]
        ids.insert(2, queue.submit(4, "llm", LLM, priority=3).id)
        await queue.start()
        for job_id in ids:
            await queue.wait(job_id)
        await queue.stop()
        return ids

    ids = run_async(scenario())
    assert run.ran == [ids[2], *ids[:2], *ids[3:]]
    assert [job.slot for job in run.calls] == [4, 9, 3, 7, 1, 5]


def test_no_more_than_concurrency_builds_run_at_once(
    store: PersistentStore, time: FakeTime
) -> None:
    run = Script()
    run.gate = asyncio.Event()

    async def open_gate_when_full() -> None:
        while run.in_flight < 3:
            await asyncio.sleep(0)
        assert run.gate is not None
        run.gate.set()

    async def scenario() -> None:
        queue = make_queue(store, run, time, concurrency=3)
        ids = [queue.submit(slot, "llm", LLM).id for slot in range(10)]
        await queue.start()
        await open_gate_when_full()
        for job_id in ids:
            assert (await queue.wait(job_id)).state == "done"
        await queue.stop()

    run_async(scenario())
    assert run.most_in_flight == 3
    assert len(run.calls) == 10


def test_a_submit_from_another_thread_wakes_an_idle_worker(
    store: PersistentStore, time: FakeTime
) -> None:
    run = Script()

    async def scenario() -> Job:
        queue = make_queue(store, run, time, concurrency=2)
        await queue.start()
        job = await asyncio.to_thread(queue.submit, 1, "llm", LLM)
        done = await queue.wait(job.id)
        await queue.stop()
        return done

    assert run_async(scenario()).state == "done"


# -- cancel -----------------------------------------------------------------------------------


def test_cancel_takes_a_pending_job_out_of_the_queue(
    store: PersistentStore, time: FakeTime
) -> None:
    run = Script()

    async def scenario() -> tuple[Job, Job]:
        queue = make_queue(store, run, time)
        doomed = queue.submit(1, "llm", LLM, priority=9)
        kept = queue.submit(2, "llm", LLM)
        cancelled = queue.cancel(doomed.id)
        assert cancelled.state == "cancelled" and queue.get(doomed.id).state == "cancelled"
        await queue.start()
        done = await queue.wait(kept.id)
        await queue.stop()
        return cancelled, done

    cancelled, done = run_async(scenario())
    assert run.ran == [done.id]
    assert cancelled.attempts == 0


def test_cancel_refuses_a_job_that_is_not_pending_and_says_its_state(
    store: PersistentStore, time: FakeTime
) -> None:
    run = Script()
    run.gate = asyncio.Event()

    async def scenario() -> None:
        queue = make_queue(store, run, time)
        job = queue.submit(1, "llm", LLM)
        await queue.start()
        await run.started.wait()
        with pytest.raises(ConflictError, match=f"job {job.id} is processing"):
            queue.cancel(job.id)
        assert run.gate is not None
        run.gate.set()
        await queue.wait(job.id)
        with pytest.raises(ConflictError, match=f"job {job.id} is done"):
            queue.cancel(job.id)
        other = queue.submit(2, "llm", LLM)
        await queue.wait(other.id)
        await queue.stop()
        third = queue.submit(3, "llm", LLM)
        queue.cancel(third.id)
        with pytest.raises(ConflictError, match="is cancelled"):
            queue.cancel(third.id)

    run_async(scenario())


def test_cancel_and_get_of_unknown_or_malformed_ids(store: PersistentStore, time: FakeTime) -> None:
    queue = make_queue(store, Script(), time)
    with pytest.raises(NotFoundError, match="no job 42"):
        queue.cancel(42)
    with pytest.raises(NotFoundError, match="no job 42"):
        queue.get(42)
    for bad in (0, -1, "1", True, 2**64, 1.0):
        with pytest.raises(InvalidInputError, match="job id"):
            queue.get(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="job id"):
            queue.cancel(bad)  # type: ignore[arg-type]


# -- stop, restart, crash ---------------------------------------------------------------------


def test_stop_waits_for_builds_in_flight_and_takes_no_new_job(
    store: PersistentStore, time: FakeTime
) -> None:
    run = Script()
    run.gate = asyncio.Event()

    async def scenario() -> None:
        queue = make_queue(store, run, time)
        first = queue.submit(1, "llm", LLM)
        second = queue.submit(2, "llm", LLM)
        await queue.start()
        await run.started.wait()
        stopper = asyncio.create_task(queue.stop(timeout=None))
        await asyncio.sleep(0)
        assert not stopper.done()
        assert run.gate is not None
        run.gate.set()
        await stopper
        assert queue.get(first.id).state == "done"
        assert queue.get(second.id).state == "pending"
        assert run.ran == [first.id]

    run_async(scenario())


def test_stop_after_its_timeout_puts_builds_in_flight_back_to_pending(
    store: PersistentStore, time: FakeTime
) -> None:
    run = Script()
    run.gate = asyncio.Event()

    async def scenario() -> None:
        queue = make_queue(store, run, time, concurrency=2)
        ids = [queue.submit(slot, "llm", LLM).id for slot in (1, 2, 3)]
        await queue.start()
        while run.in_flight < 2:
            await asyncio.sleep(0)
        await queue.stop(timeout=0)
        assert raw_jobs(store) == {ids[0]: ("pending", 0, 0.0), ids[1]: ("pending", 0, 0.0),
                                   ids[2]: ("pending", 0, 0.0)}  # fmt: skip
        assert run.gate is not None
        run.gate.set()
        await queue.start()  # the interrupted attempts did not count
        for job_id in ids:
            assert (await queue.wait(job_id)).attempts == 1
        await queue.stop()

    run_async(scenario())


def test_a_restart_after_a_crash_mid_build_re_queues_and_completes_the_jobs(
    store_dir: Path, time: FakeTime
) -> None:
    async def crashing_daemon() -> list[int]:
        store = PersistentStore(store_dir)
        run = Script()
        run.gate = asyncio.Event()  # never opened: the build is in flight when we die
        queue = make_queue(store, run, time)
        ids = [queue.submit(slot, "llm", LLM).id for slot in (1, 2, 3)]
        await queue.start()
        await run.started.wait()
        store.close()  # the daemon dies: no stop(), and its index goes with it
        return ids

    ids = run_async(crashing_daemon())
    with PersistentStore(store_dir) as store:
        assert raw_jobs(store) == {ids[0]: ("processing", 1, 0.0), ids[1]: ("pending", 0, 0.0),
                                   ids[2]: ("pending", 0, 0.0)}  # fmt: skip
        run = Script()

        async def restarted() -> list[Job]:
            queue = make_queue(store, run, time)
            await queue.start()
            finished = [await queue.wait(job_id) for job_id in ids]
            await queue.stop()
            return finished

        finished = run_async(restarted())
        assert [job.state for job in finished] == ["done"] * 3
        assert [job.attempts for job in finished] == [2, 1, 1]  # the interrupted attempt counts
        assert run.ran == ids
        assert store.verify() == []


def test_a_job_interrupted_during_its_last_attempt_fails_instead_of_crash_looping(
    store: PersistentStore, time: FakeTime
) -> None:
    run = Script()

    async def scenario() -> tuple[Job, Job]:
        queue = make_queue(store, run, time, max_attempts=2)
        poison = queue.submit(1, "llm", LLM)
        retried = queue.submit(2, "llm", LLM)
        with store.write_transaction() as conn:
            conn.execute("UPDATE jobs SET state = 'processing', attempts = 2 WHERE id = ?",
                         (poison.id,))  # fmt: skip
            conn.execute("UPDATE jobs SET state = 'processing', attempts = 1 WHERE id = ?",
                         (retried.id,))  # fmt: skip
        await queue.start()
        result = await queue.wait(poison.id), await queue.wait(retried.id)
        await queue.stop()
        return result

    poison, retried = run_async(scenario())
    assert poison.state == "failed" and poison.error is not None
    assert "daemon stopped during its last attempt" in poison.error
    assert (retried.state, retried.attempts) == ("done", 2)
    assert run.ran == [retried.id]


def test_queued_jobs_survive_closing_and_reopening_the_store(
    store_dir: Path, time: FakeTime
) -> None:
    with PersistentStore(store_dir) as store:
        queue = make_queue(store, Script(), time)
        submitted = [
            queue.submit(1, "llm", {**LLM, "seed": 5}, priority=2),
            queue.submit(2, "cnn", None),
        ]
        queue.cancel(queue.submit(3, "llm", LLM).id)
    with PersistentStore(store_dir) as store:
        run = Script(11, 12)
        queue = make_queue(store, run, time)
        assert [queue.get(job.id) for job in submitted] == submitted
        assert queue.counts()["cancelled"] == 1

        async def scenario() -> list[Job]:
            await queue.start()
            finished = [await queue.wait(job.id) for job in submitted]
            await queue.stop()
            return finished

        finished = run_async(scenario())
        assert [(job.state, job.version) for job in finished] == [("done", 11), ("done", 12)]
        assert dict(run.calls[0].config) == {**LLM, "seed": 5}


CHILD = r"""
import asyncio
import sys

from ctxstore.daemon.jobs import JobQueue
from ctxstore.store import PersistentStore


async def main(path: str) -> None:
    store = PersistentStore(path)
    never = asyncio.Event()

    async def run(job):
        await asyncio.to_thread(queue.set_progress, job.id, 0.5)
        print(f"processing {job.id}", flush=True)
        await asyncio.wait_for(never.wait(), 60)  # the parent kills us long before
        return 1

    queue = JobQueue(store, run, concurrency=1)
    queue.submit(3, "llm", {"vocab_size": 16, "d_model": 8, "n_heads": 2, "n_layers": 1})
    await queue.start()
    await asyncio.wait_for(never.wait(), 60)


asyncio.run(main(sys.argv[1]))
"""


@pytest.fixture
def child_processes() -> Iterator[list[subprocess.Popen[str]]]:
    children: list[subprocess.Popen[str]] = []
    yield children
    for child in children:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=BOUND)
        if child.stdout is not None:
            child.stdout.close()


def test_a_sigkilled_daemon_leaves_its_job_to_be_re_queued_and_built_at_the_next_start(
    store_dir: Path, child_processes: list[subprocess.Popen[str]]
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(store_dir)], stdout=subprocess.PIPE, text=True
    )
    child_processes.append(child)
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.startswith("processing "), f"child said {line!r} (exit code {child.poll()})"
    job_id = int(line.split()[1])
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=BOUND) == -signal.SIGKILL

    with PersistentStore(store_dir) as store:
        assert raw_jobs(store) == {job_id: ("processing", 1, 0.5)}

        async def build(job: Job) -> int:
            context = await create_node(job.node_type, job.slot, job.config).async_build_context()
            return await asyncio.to_thread(store.save_context, job.slot, context)

        async def restarted() -> Job:
            queue = JobQueue(store, build, concurrency=1)
            await queue.start()
            assert queue.get(job_id).state in ("pending", "processing")
            done = await queue.wait(job_id)
            await queue.stop()
            return done

        job = run_async(restarted())
        assert (job.state, job.version, job.attempts) == ("done", 1, 2)
        assert store.load_context(3).metadata["node_type"] == "llm"
        assert store.verify() == []


# -- submit validation, listing, counts -------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((-1, "llm", LLM), InvalidInputError, "slot must be between"),
        (("1", "llm", LLM), InvalidInputError, "slot must be an integer"),
        ((True, "llm", LLM), InvalidInputError, "slot must be an integer"),
        ((1, "gpt", LLM), NotFoundError, "unknown node type 'gpt'; known types: cnn, file, llm"),
        ((1, 7, LLM), InvalidInputError, "node type must be a string"),
        ((1, "llm", {"d_modle": 8}), InvalidInputError, "unknown config key 'd_modle'"),
        ((1, "llm", {"d_model": 10, "n_heads": 3}), InvalidInputError, "divisible by n_heads"),
        ((1, "llm", {"seed": float("nan")}), InvalidInputError, "not a finite number"),
        ((1, "llm", {"seed": {1, 2}}), InvalidInputError, "not plain JSON-like data"),
        ((1, "llm", [("seed", 1)]), InvalidInputError, "job config must be a dict"),
        ((1, "llm", LLM, True), InvalidInputError, "priority must be an integer"),
        ((1, "llm", LLM, "high"), InvalidInputError, "priority must be an integer"),
        ((1, "llm", LLM, 2**31), InvalidInputError, "priority must be between"),
    ],
)
def test_submit_refuses_bad_requests_before_queueing_anything(
    store: PersistentStore,
    time: FakeTime,
    args: tuple[Any, ...],
    error: type[Exception],
    match: str,
) -> None:
    queue = make_queue(store, Script(), time)
    with pytest.raises(error, match=match):
        queue.submit(*args)
    assert queue.counts() == dict.fromkeys(JOB_STATES, 0)
    assert queue.list() == []


def test_a_file_job_naming_a_missing_file_is_refused_at_submission_naming_it(
    store: PersistentStore, time: FakeTime, tmp_path: Path
) -> None:
    """Not queued to fail three times later: the caller hears at once, and which path."""
    queue = make_queue(store, Script(), time)
    missing = tmp_path / "missing.npy"
    with pytest.raises(NotFoundError, match=f"weights file '{missing}' does not exist"):
        queue.submit(1, "file", {"path": str(missing)})
    plain = tmp_path / "plain.npy"
    plain.write_bytes(b"")
    under_a_file = plain / "inner.npy"  # ENOTDIR: nothing can exist there either
    with pytest.raises(NotFoundError, match=f"weights file '{under_a_file}' does not exist"):
        queue.submit(1, "file", {"path": str(under_a_file)})
    (tmp_path / "dir.npy").mkdir()
    with pytest.raises(InvalidInputError, match=r"dir\.npy' is not a regular file"):
        queue.submit(1, "file", {"path": str(tmp_path / "dir.npy")})
    assert queue.counts() == dict.fromkeys(JOB_STATES, 0)
    assert queue.submit(1, "file", {"path": str(plain)}).state == "pending"  # it exists


def test_a_file_job_whose_file_is_gone_when_it_runs_fails_at_once_naming_it(
    store: PersistentStore, time: FakeTime, tmp_path: Path
) -> None:
    """The file existed at submission and was removed before the build: one attempt, no
    backoff, and the error names the path."""
    from ctxstore.daemon.pipeline import job_runner

    weights = tmp_path / "weights.npy"
    weights.write_bytes(b"")

    class NoCommits:
        async def commit(self, slot: int, context: Any, *, model_type: str | None = None) -> int:
            raise AssertionError("nothing was built, so nothing may be committed")

    async def scenario() -> Job:
        queue: JobQueue | None = None
        run = job_runner(NoCommits(), lambda: queue)  # type: ignore[arg-type]
        queue = make_queue(store, run, time)
        job = queue.submit(4, "file", {"path": str(weights)})
        weights.unlink()
        await queue.start()
        failed = await queue.wait(job.id)
        await queue.stop()
        return failed

    job = run_async(scenario())
    assert (job.state, job.attempts) == ("failed", 1)
    assert job.error is not None and f"weights file '{weights}' does not exist" in job.error
    assert time.sleeps == []


def test_a_full_queue_refuses_more_submissions(store: PersistentStore, time: FakeTime) -> None:
    queue = make_queue(store, Script(), time, max_pending=2)
    first = queue.submit(1, "llm", LLM)
    queue.submit(2, "llm", LLM)
    with pytest.raises(ConflictError, match="queue is full"):
        queue.submit(3, "llm", LLM)
    queue.cancel(first.id)
    queue.submit(3, "llm", LLM)
    assert queue.depth() == 2


def test_depth_counts_and_list(store: PersistentStore, time: FakeTime) -> None:
    run = Script(RuntimeError("no"), 4)

    async def scenario() -> None:
        queue = make_queue(store, run, time, max_attempts=1)
        ids = [queue.submit(slot, "llm", LLM).id for slot in range(2)]
        assert queue.depth() == 2
        await queue.start()
        await queue.wait(ids[0])
        await queue.wait(ids[1])
        await queue.stop()
        ids += [queue.submit(slot, "llm", LLM).id for slot in range(2, 5)]
        queue.cancel(ids[4])
        assert queue.depth() == 2
        assert queue.counts() == {
            "pending": 2, "processing": 0, "done": 1, "failed": 1, "cancelled": 1
        }  # fmt: skip
        assert [job.id for job in queue.list()] == ids[::-1]  # newest first
        assert [job.id for job in queue.list(limit=2)] == [ids[4], ids[3]]
        assert [job.id for job in queue.list("pending")] == [ids[3], ids[2]]
        assert [job.id for job in queue.list("failed")] == [ids[0]]
        assert [job.version for job in queue.list("done")] == [4]
        assert queue.list("processing") == []
        with pytest.raises(InvalidInputError, match="job state must be one of"):
            queue.list("running")
        for limit in (0, -1, 10**9, True):
            with pytest.raises(InvalidInputError, match="limit"):
                queue.list(limit=limit)

    run_async(scenario())


def test_finished_jobs_beyond_keep_finished_are_forgotten(
    store: PersistentStore, time: FakeTime
) -> None:
    async def scenario() -> list[int]:
        queue = make_queue(store, Script(), time, keep_finished=2)
        ids = [queue.submit(slot, "llm", LLM).id for slot in range(4)]
        await queue.start()
        for job_id in ids:
            await queue.wait(job_id)
        await queue.stop()
        assert [job.id for job in queue.list()] == ids[:1:-1]
        with pytest.raises(NotFoundError):
            queue.get(ids[0])
        later = queue.submit(9, "llm", LLM)
        assert later.id == ids[-1] + 1  # ids are never reused
        return ids

    run_async(scenario())


def test_a_job_as_a_dict_is_plain_json(store: PersistentStore, time: FakeTime) -> None:
    queue = make_queue(store, Script(), time)
    job = queue.submit(1, "cnn", {"channels": [4, 8]}, priority=-2)
    data = job.as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data == {
        "id": job.id,
        "slot": 1,
        "node_type": "cnn",
        "config": {"channels": [4, 8]},
        "priority": -2,
        "state": "pending",
        "attempts": 0,
        "max_attempts": 3,
        "progress": 0.0,
        "error": None,
        "version": None,
        "created_at": 1000.0,
        "updated_at": 1000.0,
        "next_attempt_at": None,
    }
    with pytest.raises(TypeError):
        job.config["channels"] = [1]  # type: ignore[index]


def test_a_wait_begun_before_start_sees_the_job_finish(
    store: PersistentStore, time: FakeTime
) -> None:
    queue = make_queue(store, Script(), time)
    job = queue.submit(1, "llm", LLM)

    async def scenario() -> Job:
        waiter = asyncio.create_task(queue.wait(job.id))
        await asyncio.sleep(0)
        await queue.start()
        done = await waiter
        await queue.stop()
        return done

    assert run_async(scenario()).state == "done"


def test_wait_gives_up_with_a_clear_error(store: PersistentStore, time: FakeTime) -> None:
    queue = make_queue(store, Script(), time)
    job = queue.submit(1, "llm", LLM)

    async def scenario() -> None:
        with pytest.raises(WaitTimeoutError, match=f"job {job.id} did not finish"):
            await queue.wait(job.id, timeout=0)

    run_async(scenario())


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("concurrency", 0),
        ("max_attempts", 0),
        ("backoff_initial", 0.0),
        ("backoff_max", 0.5),
        ("backoff_initial", float("nan")),
        ("backoff_initial", "1"),
        ("concurrency", 1.0),
        ("keep_finished", -1),
        ("max_pending", 0),
    ],
)
def test_bad_queue_settings_are_refused(
    store: PersistentStore, time: FakeTime, option: str, value: float
) -> None:
    with pytest.raises(InvalidInputError, match=option):
        make_queue(store, Script(), time, **{option: value})


# -- progress ---------------------------------------------------------------------------------


def test_progress_is_visible_at_once_and_written_coalesced(
    store: PersistentStore, time: FakeTime
) -> None:
    queue: JobQueue

    def stored(job_id: int) -> float:
        return raw_jobs(store)[job_id][2]

    async def run(job: Job) -> int:
        report = queue.set_progress
        await asyncio.to_thread(report, job.id, 0.01)  # from the build's thread
        assert queue.get(job.id).progress == 0.01 and stored(job.id) == 0.0  # not written
        await asyncio.to_thread(report, job.id, 0.3)
        assert stored(job.id) == 0.3  # moved enough: written
        await asyncio.to_thread(report, job.id, 0.31)
        assert stored(job.id) == 0.3
        time.now += PROGRESS_INTERVAL
        await asyncio.to_thread(report, job.id, 0.32)
        assert stored(job.id) == 0.32  # long enough since the last write
        await asyncio.to_thread(report, job.id, 1.0)
        assert stored(job.id) == 1.0  # the end is always written
        for bad in (-0.1, 1.5, float("nan"), "half", True):
            with pytest.raises(InvalidInputError, match="progress"):
                report(job.id, bad)  # type: ignore[arg-type]
        report(job.id, 0.5)  # from the event loop: written in the background
        assert [j.progress for j in queue.list("processing")] == [0.5]
        return 1

    async def scenario() -> Job:
        nonlocal queue
        queue = make_queue(store, run, time)
        job = queue.submit(1, "llm", LLM)
        await queue.start()
        done = await queue.wait(job.id)
        await queue.stop()
        with pytest.raises(NotFoundError, match="not being built"):
            queue.set_progress(job.id, 0.5)
        return done

    job = run_async(scenario())
    assert (job.state, job.progress) == ("done", 1.0)


# -- the index --------------------------------------------------------------------------------


def test_a_store_from_before_the_job_queue_gains_the_jobs_table(store_dir: Path) -> None:
    with PersistentStore(store_dir):
        pass
    conn = sqlite3.connect(store_dir / "index.db")
    conn.executescript(
        "DROP TABLE jobs; DROP INDEX versions_by_publish_key; DROP TABLE version_checks; "
        "DROP TABLE version_files; "
        "ALTER TABLE versions DROP COLUMN publish_key; PRAGMA user_version = 1;"
    )
    conn.close()
    with pytest.raises(IntegrityError, match="schema version 1"):
        PersistentStore(store_dir, readonly=True)
    with PersistentStore(store_dir) as store:
        assert store.read_query("PRAGMA user_version") == [(LATEST,)]
        assert make_queue(store, Script(), FakeTime()).counts()["pending"] == 0


def test_the_queue_order_reads_an_index(store: PersistentStore) -> None:
    plan = store.read_query(
        "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE state = 'pending' AND "
        "(next_attempt_at IS NULL OR next_attempt_at <= 0) ORDER BY priority DESC, id LIMIT 1"
    )
    assert any("jobs_by_state" in row[-1] for row in plan)
    assert not any("TEMP B-TREE" in row[-1] for row in plan)


def test_a_read_only_store_cannot_queue_jobs(store: PersistentStore, time: FakeTime) -> None:
    """The queue writes in the writer's transactions: a read-only view has none."""
    with (
        PersistentStore(store.root, readonly=True) as reader,
        pytest.raises(ReadOnlyError, match="read-only"),
    ):
        make_queue(reader, Script(), time)  # type: ignore[arg-type]


def test_a_build_job_reports_the_nodes_progress_then_built() -> None:
    """job_runner: the node's own progress fills [0, BUILT], then BUILT, then the commit."""
    from ctxstore.daemon.pipeline import BUILT, job_runner

    recorded: list[float] = []

    class RecordingQueue:
        def set_progress(self, job_id: int, progress: float) -> None:
            assert job_id == 7
            recorded.append(progress)

    class RecordingCommitter:
        async def commit(self, slot: int, context: Any, *, model_type: str | None = None) -> int:
            recorded.append(-1.0)  # the commit comes after every progress report
            return 1

    job = Job(id=7, slot=2, node_type="llm", config={"n_layers": 4}, priority=0,
              state="processing", attempts=1, max_attempts=3, progress=0.0, error=None,
              version=None, created_at=0.0, updated_at=0.0, next_attempt_at=0.0)  # fmt: skip
    run = job_runner(RecordingCommitter(), RecordingQueue)  # type: ignore[arg-type]
    assert asyncio.run(run(job)) == 1
    steps, (built, committed) = recorded[:-2], recorded[-2:]
    assert len(steps) >= 4 and steps == sorted(steps) and steps[-1] == BUILT, recorded
    assert 0.0 <= steps[0] < BUILT and built == BUILT and committed == -1.0, recorded
