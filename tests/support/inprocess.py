"""A real Daemon run in the test's own event loop (its HTTP app called in-process
through httpx), and the stand-ins the HTTP tests swap into it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from ctxstore import Context
from ctxstore.daemon.config import DaemonConfig
from ctxstore.daemon.notify import Notifier
from ctxstore.daemon.server import Daemon
from ctxstore.errors import ConflictError, NotFoundError

TOKEN = "s3cret-token-0123456789abcdef"
T = TypeVar("T")


Scenario = Callable[[Daemon, httpx.AsyncClient], Awaitable[None]]


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, *, notifier: Notifier | None = None, **settings: Any
) -> AsyncIterator[Daemon]:
    """A Daemon with ``settings`` (HTTP on an ephemeral port unless told) on a store in
    ``tmp_path``, started in this loop and stopped when the block ends."""
    settings.setdefault("http", "127.0.0.1:0")
    config = DaemonConfig(store=tmp_path / "store", socket=tmp_path / "ctx.sock", **settings)
    daemon = Daemon(config, notifier=notifier)
    try:
        await daemon.start()
        yield daemon
    finally:
        await daemon.stop("test over")


class BackgroundDaemon:
    """A Daemon on its own loop in a thread, as the real process runs it: for tests that
    reach it from outside (a real HTTP client, schemathesis) while they block."""

    def __init__(self, config: DaemonConfig) -> None:
        self.daemon = Daemon(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="daemon", daemon=True)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def start(self) -> None:
        self.thread.start()
        self.call(self.daemon.start())

    def stop(self) -> None:
        try:
            self.call(self.daemon.stop("test over"))
            self.call(self.loop.shutdown_default_executor())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.close()


def client(daemon: Daemon, **headers: str) -> httpx.AsyncClient:
    """In-process client of the daemon's app (the Host is a loopback name, as the guard wants)."""
    assert daemon.api is not None
    transport = httpx.ASGITransport(app=daemon.api.app)
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", headers=headers)


def run(tmp_path: Path, scenario: Scenario, **settings: Any) -> None:
    async def main() -> None:
        async with running(tmp_path, **settings) as daemon, client(daemon) as http:
            await asyncio.wait_for(scenario(daemon, http), 60)

    asyncio.run(main())


def ctx(value: float = 1.0, extra: int = 0) -> Context:
    weights = {"w": np.full(4, value, dtype=np.float32)}
    if extra:
        weights["x"] = np.arange(extra, dtype=np.int64)
    return Context(weights, {"layers": 2}, {"loss": value})


async def commit(daemon: Daemon, slot: int, value: float = 1.0, model_type: str = "llm") -> int:
    assert daemon.committer is not None
    return await daemon.committer.commit(slot, ctx(value), model_type=model_type)


def error_of(response: httpx.Response, status: int, kind: str | None = None) -> str:
    """Assert the JSON error shape; return the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    if kind is not None:
        assert body["error"]["type"] == kind
    message: str = body["error"]["message"]
    assert "Traceback" not in message
    return message


@dataclass
class FakeJob:
    id: int
    slot: int
    node_type: str
    config: dict[str, Any]
    priority: int
    state: str = "pending"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "slot": self.slot,
            "node_type": self.node_type,
            "config": self.config,
            "priority": self.priority,
            "state": self.state,
        }


async def replace_jobs(daemon: Daemon, stand_in: FakeQueue) -> None:
    """Swap the daemon's real job queue (stopped first) for the stand-in."""
    if daemon.jobs is not None:
        await daemon.jobs.stop()
    daemon.jobs = stand_in  # type: ignore[assignment]


@dataclass
class FakeQueue:
    """The JobQueue surface the API uses (submit, get, list, cancel, depth, counts)."""

    jobs: dict[int, FakeJob] = field(default_factory=dict)

    async def stop(self, timeout: float | None = None) -> None:
        """The daemon stops its queue at shutdown; the stand-in has nothing running."""

    def submit(self, slot: int, node_type: str, config: Any, priority: int) -> FakeJob:
        if node_type != "llm":
            raise NotFoundError(f"unknown node type {node_type!r}")
        job = FakeJob(len(self.jobs) + 1, slot, node_type, dict(config), priority)
        self.jobs[job.id] = job
        return job

    def get(self, job_id: int) -> FakeJob:
        if job_id not in self.jobs:
            raise NotFoundError(f"job {job_id} does not exist")
        return self.jobs[job_id]

    def list(self, state: str | None = None, limit: int = 100) -> list[FakeJob]:
        chosen = [j for j in self.jobs.values() if state is None or j.state == state]
        return sorted(chosen, key=lambda j: -j.id)[:limit]

    def cancel(self, job_id: int) -> FakeJob:
        job = self.get(job_id)
        if job.state != "pending":
            raise ConflictError(f"job {job_id} is {job.state}, not pending")
        job.state = "cancelled"
        return job

    def depth(self) -> int:
        return sum(1 for j in self.jobs.values() if j.state == "pending")

    def counts(self) -> dict[str, int]:
        states = ("pending", "processing", "done", "failed", "cancelled")
        return {s: sum(1 for j in self.jobs.values() if j.state == s) for s in states}


async def job_finished(http: httpx.AsyncClient, job_id: int) -> dict[str, object]:
    for _ in range(500):
        job: dict[str, object] = (await http.get(f"/jobs/{job_id}")).json()["job"]
        if job["state"] in ("done", "failed"):
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")
