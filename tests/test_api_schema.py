"""schemathesis against the live OpenAPI schema of a real daemon: no 5xx, no off-schema answers.

The daemon runs in a background thread with its own event loop and serves
its API with uvicorn on an ephemeral port; schemathesis reads
``/openapi.json`` from it and sends generated requests (valid and invalid)
to every operation except the endless ``/events`` stream, which
test_api.py covers. The default run is bounded (``MAX_EXAMPLES`` per
operation); ``pytest --long`` runs many more.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from support.inprocess import TOKEN, BackgroundDaemon, FakeQueue

from ctxstore import Context
from ctxstore.daemon.config import DaemonConfig
from ctxstore.daemon.server import Daemon

MAX_EXAMPLES = 20
LONG_EXAMPLES = 300


async def _seed(daemon: Daemon) -> None:
    """Slots 0-3 with versions, an alias, a small tree and a group: something to find."""
    assert daemon.committer is not None and daemon.store is not None
    for slot in range(4):
        for version in range(1, 3):
            weights = {"w": np.full(8, slot + version, dtype=np.float32)}
            context = Context(weights, {"layers": slot}, {"loss": 1.0 / version})
            await daemon.committer.commit(slot, context, model_type="llm")
    daemon.store.set_alias(1, "best", 1)
    daemon.store.hierarchy.set_parent(1, 0)
    daemon.store.hierarchy.set_parent(2, 1)
    daemon.store.hierarchy.add_to_group(3, "vision")


@pytest.fixture(scope="module")
def live_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundDaemon]:
    tmp = tmp_path_factory.mktemp("schema")
    token_file = tmp / "token"
    token_file.write_text(TOKEN)
    os.chmod(token_file, 0o600)
    config = DaemonConfig(
        store=tmp / "store",
        socket=tmp / "ctx.sock",
        http="127.0.0.1:0",
        token_file=token_file,
        ready_min_free_bytes=0,
    )
    background = BackgroundDaemon(config)
    background.start()
    try:
        if getattr(background.daemon, "jobs", None) is None:  # until the daemon runs its queue
            background.daemon.jobs = FakeQueue()  # type: ignore[attr-defined]
        background.call(_seed(background.daemon))
        yield background
    finally:
        background.stop()


@pytest.fixture(scope="module")
def http_session() -> Iterator[requests.Session]:
    session = requests.Session()
    session.trust_env = False  # no proxy between us and 127.0.0.1
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    yield session
    session.close()


@pytest.fixture(scope="module")
def api_schema(live_daemon: BackgroundDaemon) -> Any:
    api = live_daemon.daemon.api
    assert api is not None
    url = f"http://127.0.0.1:{api.port}/openapi.json"
    return schemathesis.openapi.from_url(url)


def _fuzz_every_operation(
    api_schema: Any, session: requests.Session, subtests: Any, max_examples: int
) -> None:
    """Send generated requests to each operation (its own subtest) and validate each answer.

    The operations are walked by hand rather than through schemathesis's
    pytest plugin, whose lazy-fixture integration breaks on new pytest releases.
    """
    fuzzed = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if operation.path == "/events":
            continue

        @settings(
            max_examples=max_examples,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        @given(case=operation.as_strategy())
        def call_and_validate(case: Any) -> None:
            case.call_and_validate(session=session)

        with subtests.test(operation=operation.label):
            call_and_validate()
        fuzzed += 1
    assert fuzzed >= 30


def test_api_conforms_to_its_schema(
    api_schema: Any, http_session: requests.Session, subtests: Any
) -> None:
    _fuzz_every_operation(api_schema, http_session, subtests, MAX_EXAMPLES)


@pytest.mark.slow
def test_api_conforms_to_its_schema_long(
    api_schema: Any, http_session: requests.Session, subtests: Any
) -> None:
    _fuzz_every_operation(api_schema, http_session, subtests, LONG_EXAMPLES)


def test_schema_covers_every_operation(live_daemon: BackgroundDaemon) -> None:
    api = live_daemon.daemon.api
    assert api is not None
    session = requests.Session()
    session.trust_env = False
    try:
        paths = session.get(f"http://127.0.0.1:{api.port}/openapi.json", timeout=10).json()["paths"]
    finally:
        session.close()
    operations = sum(len(methods) for methods in paths.values())
    assert operations >= 30  # and every one of them but /events is fuzzed above
