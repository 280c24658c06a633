"""Scale-out with real processes: a writer daemon uploading to SeaweedFS (S3) and NATS
(JetStream), follower daemons pulling from them, readers on the followers."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.daemon import DaemonProcess, start_daemon, stop_and_clean, wait_for_socket
from support.procs import dies_with_pytest, free_port

from ctxstore import Context, RemoteError
from ctxstore.client import publish
from ctxstore.errors import StorageError
from ctxstore.origin.follower import Follower
from ctxstore.origin.layout import Head, Manifest, Origin
from ctxstore.origin.outbox import Outbox
from ctxstore.origin.polling import PollPolicy
from ctxstore.origin.s3 import OriginClient, Versioned
from ctxstore.origin.state import state_summary
from ctxstore.origin.uploader import Uploader
from ctxstore.readers import Reader
from ctxstore.sources import Imported
from ctxstore.store import PersistentStore
from ctxstore.store.npyfile import npy_header

pytest.importorskip("boto3")
pytest.importorskip("nats")
from support.cluster_servers import NatsServer, SeaweedServer, s3_env

WAIT = 120.0  # a bound for the loops below, not a speed goal (bench/ measures speed)
# The default suite runs the conditional writes, the two-follower convergence and the
# rollback (about 25 s on a quiet machine); the outage, crash, corruption and demo tests
# start more processes and servers and run with --long.


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
    server.start(wrap=dies_with_pytest([]))
    try:
        yield server
    finally:
        server.kill()  # its data is a temporary directory: no graceful stop needed


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start(wrap=dies_with_pytest([]))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> SeaweedServer:
    for name, value in s3_env(seaweed).items():
        monkeypatch.setenv(name, value)
    return seaweed


_BUCKETS = iter(range(1, 1_000_000))


def new_origin() -> str:
    return f"s3://ctx-test-{next(_BUCKETS)}-{time.monotonic_ns() % 10**9}/models"


def wait_until(what: str, check: Callable[[], bool], *, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened within {timeout:g}s: {what}")


def launch(root: Path, *extra: str, env: dict[str, str] | None = None) -> DaemonProcess:
    """A daemon on ``root``/store, started (not waited for), with extra variables."""
    (root / "run").mkdir(parents=True, exist_ok=True)
    return start_daemon(root, root / "store", root / "run" / "ctx.sock", None, *extra,
                        env={**os.environ, **(env or {})})  # fmt: skip


@contextlib.contextmanager
def daemons(*procs: DaemonProcess) -> Iterator[tuple[DaemonProcess, ...]]:
    """Daemons launched together (their starts overlap), each stopped when the block ends."""
    try:
        for proc in procs:
            wait_for_socket(proc.socket, proc.proc)
        yield procs
    finally:
        for proc in procs:
            stop_and_clean(proc)


def context(step: int, changed: int = 0, n: int = 10, size: int = 64 << 10) -> Context:
    """``n`` tensors of ``size`` bytes; tensor ``changed`` carries ``step``, the others 0."""
    weights = {
        f"t{i}": np.full(size // 4, step if i == changed else -1, dtype=np.float32)
        for i in range(n)
    }
    return Context(weights, {"step": step}, {"note": f"v{step}"})


def stamp_of(ctx: Context, changed: int = 0) -> int:
    return int(ctx.weights[f"t{changed}"][0])


def follower_serves(proc: DaemonProcess, slot: int, version: int) -> Callable[[], bool]:
    def check() -> bool:
        with contextlib.suppress(Exception), PersistentStore(proc.store, readonly=True) as store:
            return store.current_version(slot) == version
        return False

    return check


def stats(proc: DaemonProcess) -> dict[str, int]:
    return dict(state_summary(proc.store / "origin")["stats"])


def test_the_origin_honours_conditional_writes(s3: SeaweedServer) -> None:
    """Manifests are create-only and heads move by compare-and-swap: SeaweedFS must
    refuse a second create and a swap from a stale ETag (else the layout's promises fail)."""
    client = OriginClient(Origin.parse(new_origin()))
    client.ensure_bucket()
    assert client.put_if_absent("models/m", b"first")
    assert not client.put_if_absent("models/m", b"second")
    got = client.get("models/m")
    assert got is not None and got.data == b"first"
    assert client.put_if_match("models/m", b"third", got.etag)
    assert not client.put_if_match("models/m", b"fourth", got.etag)  # stale now
    assert not client.put_if_match("models/absent", b"x", got.etag)
    final = client.get("models/m")
    assert final is not None and final.data == b"third"


def test_a_writer_and_two_followers_converge_moving_only_changed_tensors(
    tmp_path: Path, s3: SeaweedServer, nats_server: NatsServer
) -> None:
    origin = new_origin()
    feed = ("--feed", nats_server.url)
    with daemons(
        launch(tmp_path / "writer", "--origin", origin, *feed),
        launch(tmp_path / "f1", "--follow", origin, *feed),
        launch(tmp_path / "f2", "--follow", origin, *feed),
    ) as (writer, f1, f2):
        readers = [Reader(f.store, f.socket) for f in (f1, f2)]
        try:
            v1 = publish(7, context(1), socket=writer.socket, model_type="mlp")
            for f in (f1, f2):
                wait_until(f"{f.store} serves v{v1}", follower_serves(f, 7, v1))
            for reader in readers:
                wait_until("reader adopts v1", lambda r=reader: r.get(7).version == v1)
                got = reader.get(7)
                assert stamp_of(got) == 1 and got.config["step"] == 1
                assert got.metadata["note"] == "v1"
            for f in (f1, f2):  # the counters are saved a moment after the commit
                wait_until("v1's pull is counted", lambda f=f: stats(f)["versions_pulled"] == 1)
            before = [stats(f)["bytes_downloaded"] for f in (f1, f2)]
            # two distinct objects: t0, and the one the nine others share (fetched once)
            assert all(stats(f)["objects_downloaded"] == 2 for f in (f1, f2))
            assert all(b >= 2 * (64 << 10) for b in before)

            v2 = publish(7, context(2, changed=3), socket=writer.socket)
            assert v2 == v1 + 1
            for f, reader in zip((f1, f2), readers, strict=True):
                wait_until(f"{f.store} serves v{v2}", follower_serves(f, 7, v2))
                wait_until("reader adopts v2", lambda r=reader: r.get(7).version == v2)
                got = reader.get(7)
                assert stamp_of(got, 3) == 2 and int(got.weights["t0"][0]) == -1
            for f in (f1, f2):
                wait_until("v2's pull is counted", lambda f=f: stats(f)["versions_pulled"] == 2)
            after = [stats(f)["bytes_downloaded"] for f in (f1, f2)]
            moved = [a - b for a, b in zip(after, before, strict=True)]
            one_tensor = (64 << 10) + 128  # the data and its .npy header
            assert all(0 < m <= 1.1 * one_tensor for m in moved), moved

            with pytest.raises(RemoteError, match=f"follows {origin}"):
                publish(7, context(9), socket=f1.socket)
        finally:
            for reader in readers:
                reader.close()


@pytest.mark.slow
def test_feed_down_the_head_poll_converges_and_the_feed_resumes_when_back(
    tmp_path: Path, s3: SeaweedServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """NATS killed: a polling follower still converges; NATS back: a follower that
    only listens to the feed (its poll is an hour) converges again, with no restart."""
    nats = NatsServer(tmp_path_factory.mktemp("nats-outage"))
    nats.start(wrap=dies_with_pytest([]))
    origin = new_origin()
    feed = ("--feed", nats.url)
    poll = {"CTXSTORE_FOLLOW_POLL_INTERVAL": "0.3"}
    deaf = {"CTXSTORE_FOLLOW_POLL_INTERVAL": "3600"}
    try:
        with daemons(
            launch(tmp_path / "writer", "--origin", origin, *feed),
            launch(tmp_path / "polling", "--follow", origin, *feed, env=poll),
            launch(tmp_path / "listening", "--follow", origin, *feed, env=deaf),
        ) as (writer, polling, listening):
            v1 = publish(3, context(1), socket=writer.socket)
            for f in (polling, listening):
                wait_until(f"{f.store} serves v{v1}", follower_serves(f, 3, v1))

            nats.kill()
            v2 = publish(3, context(2), socket=writer.socket)
            wait_until("the polling follower serves v2", follower_serves(polling, 3, v2))
            hints_before = stats(listening)["hints"]

            nats.start(wrap=dies_with_pytest([]))
            v3 = publish(3, context(3), socket=writer.socket)
            wait_until("the listening follower serves v3", follower_serves(listening, 3, v3))
            assert stats(listening)["hints"] > hints_before
            assert follower_serves(listening, 3, v3)()
    finally:
        nats.stop()


@pytest.mark.slow
def test_a_writer_killed_mid_upload_shows_nothing_then_completes_on_restart(
    tmp_path: Path, s3: SeaweedServer
) -> None:
    """SIGKILL after the first of ten objects: the origin's head and every follower stay
    on v1 (no manifest names a missing object); the restarted writer finishes from its
    outbox and the follower converges on v2."""
    origin = new_origin()
    poll = {"CTXSTORE_FOLLOW_POLL_INTERVAL": "0.2"}
    with daemons(
        launch(tmp_path / "writer", "--origin", origin),
        launch(tmp_path / "f1", "--follow", origin, env=poll),
    ) as (writer, f1):
        v1 = publish(5, context(1), socket=writer.socket)
        wait_until("follower serves v1", follower_serves(f1, 5, v1))
    crash = {"CTXSTORE_CRASH_AT": "origin_object_uploaded", "CTXSTORE_CRASH_AFTER": "1"}
    with daemons(launch(tmp_path / "writer", "--origin", origin, env=crash)) as (writer,):
        # every tensor changes: ten objects to upload, the writer dies after the second
        v2 = publish(5, _all_new(2), socket=writer.socket)
        assert writer.proc.wait(WAIT) == -signal.SIGKILL
    client = OriginClient(Origin.parse(origin))
    head = client.get(client.origin.head_key(5))
    assert head is not None and Head.from_bytes(head.data, "head").current == v1
    assert not client.exists(client.origin.manifest_key(5, v2))
    assert (tmp_path / "writer" / "store" / "origin" / "outbox" / "5").exists()

    with daemons(
        launch(tmp_path / "writer", "--origin", origin),
        launch(tmp_path / "f1", "--follow", origin, env=poll),
    ) as (writer, f1):
        wait_until("follower serves v2", follower_serves(f1, 5, v2))
        with Reader(f1.store, f1.socket) as reader:
            wait_until("reader adopts v2", lambda: reader.get(5).version == v2)
            got = reader.get(5)
            assert [int(got.weights[f"t{i}"][0]) for i in range(10)] == list(range(200, 210))
        wait_until(
            "the outbox is empty",
            lambda: not (tmp_path / "writer" / "store" / "origin" / "outbox" / "5").exists(),
        )


def _all_new(step: int) -> Context:
    """Ten tensors, all different (objects are content-addressed), all new for ``step``."""
    return Context({f"t{i}": np.full(16 << 10, step * 100 + i, dtype=np.float32)
                    for i in range(10)}, {"step": step}, {})  # fmt: skip


@pytest.mark.slow
def test_a_follower_killed_mid_download_leaves_no_partial_version(
    tmp_path: Path, s3: SeaweedServer
) -> None:
    origin = new_origin()
    crash = {
        "CTXSTORE_CRASH_AT": "origin_object_downloaded",
        "CTXSTORE_CRASH_AFTER": "3",
        "CTXSTORE_FOLLOW_POLL_INTERVAL": "0.2",
    }
    with daemons(launch(tmp_path / "writer", "--origin", origin)) as (writer,):
        v1 = publish(2, _all_new(1), socket=writer.socket)
        follower = launch(tmp_path / "f1", "--follow", origin, env=crash)
        try:
            assert follower.proc.wait(WAIT) == -signal.SIGKILL
        finally:
            stop_and_clean(follower)
        with PersistentStore(follower.store, readonly=True) as store:
            assert store.current_version(2) is None
            assert store.list_slots() == []
        with daemons(launch(tmp_path / "f1", "--follow", origin,
                            env={"CTXSTORE_FOLLOW_POLL_INTERVAL": "0.2"})) as (f1,):  # fmt: skip
            wait_until("follower serves v1", follower_serves(f1, 2, v1))
            incoming = f1.store / "origin" / "incoming"  # emptied once the commit returns
            wait_until("the downloads are removed", lambda: not any(incoming.iterdir()))
        verify = subprocess.run(
            [sys.executable, "-m", "ctxstore.cli", "verify", "--store", str(f1.store)],
            check=False, capture_output=True, text=True, timeout=WAIT,
        )  # fmt: skip
        assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.slow
def test_a_corrupt_origin_object_is_refused_and_the_previous_version_kept(
    tmp_path: Path, s3: SeaweedServer
) -> None:
    origin = new_origin()
    poll = {"CTXSTORE_FOLLOW_POLL_INTERVAL": "0.2"}
    client = OriginClient(Origin.parse(origin))
    with daemons(launch(tmp_path / "writer", "--origin", origin)) as (writer,):
        v1 = publish(4, context(1), socket=writer.socket)
        with daemons(launch(tmp_path / "f1", "--follow", origin, env=poll)) as (f1,):
            wait_until("follower serves v1", follower_serves(f1, 4, v1))
        v2 = publish(4, context(2, changed=5), socket=writer.socket)
        wait_until("the head names v2", lambda: _head(client, 4) == v2)
    manifest = Manifest.from_bytes(_get(client, client.origin.manifest_key(4, v2)), "m")
    changed = client.origin.object_key(manifest.tensors[5].checksum)
    good = _get_object(client, changed)
    bad = bytearray(good)
    bad[-1] ^= 0x01  # a flipped bit in the data, the header intact
    client.put_object(changed, bytes(bad))

    with daemons(launch(tmp_path / "f1", "--follow", origin, env=poll)) as (f1,):
        wait_until("the follower refused v2", lambda: stats(f1)["refused"] >= 2)
        with Reader(f1.store, f1.socket) as reader:
            got = reader.get(4)
            assert got.version == v1 and stamp_of(got) == 1
        assert not any((f1.store / "origin" / "incoming").iterdir())
        client.put_object(changed, good)  # mended at the origin: the retry takes it
        wait_until("follower serves v2", follower_serves(f1, 4, v2))
    verify = subprocess.run(
        [sys.executable, "-m", "ctxstore.cli", "verify", "--store", str(f1.store)],
        check=False, capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_rollback_alias_set_and_delete_reach_the_followers_and_a_stopped_one_catches_up(
    tmp_path: Path, s3: SeaweedServer
) -> None:
    """Rollback, alias set and alias delete over the writer's HTTP API reach a running
    follower; a follower stopped across 10 publishes catches up within 10 s of its
    restart (the issue's bound), holding every version whole."""
    origin = new_origin()
    poll = {"CTXSTORE_FOLLOW_POLL_INTERVAL": "0.2"}
    http, follower_http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    follower = tmp_path / "f1"
    with daemons(launch(tmp_path / "writer", "--origin", origin, "--http", http)) as (writer,):
        with daemons(launch(follower, "--follow", origin, "--http", follower_http,
                            env=poll)) as (f1,):  # fmt: skip
            v1 = publish(6, context(1), socket=writer.socket)
            v2 = publish(6, context(2), socket=writer.socket, alias="stable")
            wait_until("follower serves v2", follower_serves(f1, 6, v2))
            assert _post(http, "/slots/6/rollback", {"version": v1}) == 200
            wait_until("follower rolled back to v1", follower_serves(f1, 6, v1))
            assert _put(http, "/slots/6/aliases/canary", {"version": v1}) == 200
            wait_until("the alias reached the follower",
                       lambda: _aliases(f1, 6).get("canary") == v1)  # fmt: skip
            assert _aliases(f1, 6)["stable"] == v2
            assert _send("DELETE", http, "/slots/6/aliases/stable", None) == 204
            wait_until("the alias deletion reached the follower",
                       lambda: "stable" not in _aliases(f1, 6), timeout=30.0)  # fmt: skip
            assert _aliases(f1, 6).get("canary") == v1
            assert _post(follower_http, "/slots/6/rollback", {"version": v2}) == 403
            assert follower_serves(f1, 6, v1)()
            _check_cluster_state(http, writer, follower_http, f1, origin, slot=6, version=v1)

        steps = range(3, 13)  # ten publishes while the follower is down
        versions = [publish(6, context(step, changed=step % 10), socket=writer.socket)
                    for step in steps]  # fmt: skip
        with daemons(launch(follower, "--follow", origin, env=poll)) as (f1,):
            wait_until("the restarted follower caught up", follower_serves(f1, 6, versions[-1]),
                       timeout=10.0)  # fmt: skip
            with PersistentStore(writer.store, readonly=True) as store:
                kept = {info.version for info in store.list_versions(6)}
            assert versions[-1] in kept
            with PersistentStore(f1.store, readonly=True) as store:
                assert kept <= {info.version for info in store.list_versions(6)}
                for step, version in zip(steps, versions, strict=True):
                    if version not in kept:  # retention removed it on the writer
                        continue
                    got = store.load_context(6, version, verify=True)
                    assert int(got.weights[f"t{step % 10}"][0]) == step
                    assert got.config["step"] == step
            with Reader(f1.store, f1.socket) as reader:
                got = reader.get(6)
                assert got.version == versions[-1] and stamp_of(got, 12 % 10) == 12


def _check_cluster_state(
    http: str, writer: DaemonProcess, follower_http: str, follower: DaemonProcess,
    origin: str, *, slot: int, version: int,
) -> None:  # fmt: skip
    """Each role shows in /health, /metrics and ``ctxstore status``: origin, feed,
    the version applied or moved per slot, the outbox, the bytes moved."""
    from ctxstore.cli.status_text import format_status
    from ctxstore.client import DaemonClient

    wait_until("the writer's outbox is empty", lambda: _health(http)["outbox"] == 0)
    up, down = _health(http), _health(follower_http)
    assert (up["role"], up["origin"], up["feed"], up["feed_connected"]) == (
        "writer", origin, None, None
    )  # fmt: skip
    assert up["heads"] == {str(slot): version} and up["bytes_uploaded"] > 0
    assert (down["role"], down["origin"]) == ("follower", origin)
    assert down["applied"] == {str(slot): version} and down["bytes_downloaded"] > 0
    metrics = _fetch(follower_http, "/metrics")
    assert f'ctxstore_cluster_applied_version{{slot="{slot}"}} {float(version)}' in metrics
    assert 'ctxstore_cluster_info{feed="",origin="' + origin + '",role="follower"} 1.0' in metrics
    assert "ctxstore_cluster_downloaded_bytes_total" in metrics
    assert "ctxstore_cluster_outbox_depth 0.0" in _fetch(http, "/metrics")
    with DaemonClient(follower.socket) as client:
        text = format_status(client.status())
    assert f"follower from {origin}" in text and f"applied {slot}:v{version}" in text
    with DaemonClient(writer.socket) as client:
        assert "outbox 0 pending" in format_status(client.status())


def _health(address: str) -> dict[str, Any]:
    body = json.loads(_fetch(address, "/health"))
    assert body["status"] == "ok"
    return dict(body["cluster"])


def _fetch(address: str, path: str) -> str:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=WAIT) as answer:
        return str(answer.read().decode())


def _aliases(proc: DaemonProcess, slot: int) -> dict[str, int]:
    with PersistentStore(proc.store, readonly=True) as store:
        return store.get_aliases(slot)


def _post(address: str, path: str, body: object) -> int:
    return _send("POST", address, path, body)


def _put(address: str, path: str, body: object) -> int:
    return _send("PUT", address, path, body)


def _send(method: str, address: str, path: str, body: object) -> int:
    request = urllib.request.Request(
        f"http://{address}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _head(client: OriginClient, slot: int) -> int | None:
    found = client.get(client.origin.head_key(slot))
    return None if found is None else Head.from_bytes(found.data, "head").current


def _get(client: OriginClient, key: str) -> bytes:
    found = client.get(key)
    assert found is not None
    return found.data


def _get_object(client: OriginClient, key: str, tmp: Path | None = None) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "object")
        client.download_file(key, path)
        return Path(path).read_bytes()


@pytest.mark.slow
def test_the_cluster_demo_runs_and_stops_everything() -> None:
    """``ctxstore cluster demo``: every follower serves every version, exit 0."""
    run = subprocess.run(
        [sys.executable, "-m", "ctxstore.cli", "cluster", "demo", "--versions", "2",
         "--followers", "2"],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "host-2 serves ms" in run.stdout
    assert "downloaded in all: 11.0, 11.0" in run.stdout


@pytest.mark.slow
def test_origin_down_reads_go_on_and_publishes_reach_it_when_it_returns(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SeaweedFS killed: the follower keeps serving, the writer commits locally; the
    writer restarted while the origin is still down keeps its outbox; the origin back,
    the follower converges."""
    seaweed = SeaweedServer(tmp_path_factory.mktemp("seaweed-outage"))
    seaweed.start(wrap=dies_with_pytest([]))
    env = {**s3_env(seaweed), "CTXSTORE_FOLLOW_POLL_INTERVAL": "0.2"}
    origin = new_origin()
    try:
        with daemons(
            launch(tmp_path / "writer", "--origin", origin, env=env),
            launch(tmp_path / "f1", "--follow", origin, env=env),
        ) as (writer, f1):
            v1 = publish(8, context(1), socket=writer.socket)
            wait_until("follower serves v1", follower_serves(f1, 8, v1))
            seaweed.kill()
            v2 = publish(8, context(2), socket=writer.socket)
            with Reader(f1.store, f1.socket) as reader:
                assert reader.get(8).version == v1 and stamp_of(reader.get(8)) == 1
            assert (tmp_path / "writer" / "store" / "origin" / "outbox" / "8").exists()
            stop_and_clean(writer)
        with daemons(
            launch(tmp_path / "writer", "--origin", origin, env=env),
            launch(tmp_path / "f1", "--follow", origin, env=env),
        ) as (writer, f1):
            assert follower_serves(f1, 8, v1)()
            seaweed.start(wrap=dies_with_pytest([]))
            wait_until("follower serves v2", follower_serves(f1, 8, v2))
    finally:
        seaweed.stop()


def test_the_head_poll_is_spread_by_jitter_and_backs_off_bounded() -> None:
    """1,000 followers started together must not poll in lockstep, and an origin in
    trouble is polled less and less often, up to the configured bound."""
    rng = random.Random(20)
    policy = PollPolicy(2.0, jitter=0.2, backoff_max=30.0)
    waits = [policy.wait(0, rng) for _ in range(1000)]
    assert all(1.6 <= w <= 2.4 for w in waits)
    assert len({round(w, 3) for w in waits}) > 500  # spread, not one shared period
    steady = PollPolicy(2.0, jitter=0.0, backoff_max=30.0)
    assert [steady.wait(f, rng) for f in range(7)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert steady.wait(10**9, rng) == 30.0
    assert PollPolicy(5.0, jitter=0.0, backoff_max=1.0).wait(3, rng) == 5.0  # never below
    assert PollPolicy(pull_jitter=0.0).hint_delay(rng) == 0.0
    assert all(0.0 <= PollPolicy(pull_jitter=3.0).hint_delay(rng) <= 3.0 for _ in range(100))


def test_a_follower_backs_off_while_the_origin_fails_and_resumes_its_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The follower's poll loop itself: waits grow while listing the heads fails, and
    fall back to the interval once it works (the waits are recorded, not slept)."""
    import asyncio

    from ctxstore.errors import StorageError

    class Origin503:
        origin = Origin.parse("s3://bucket-x/p")

        def __init__(self) -> None:
            self.calls = 0

        def list_etags(self, prefix: str) -> dict[str, str]:
            self.calls += 1
            if self.calls <= 4:
                raise StorageError("origin s3://bucket-x/p: 503 Slow Down")
            return {}

    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay: float) -> None:
        waits.append(delay)
        if len(waits) >= 6:
            raise asyncio.CancelledError
        await real_sleep(0)

    client = Origin503()
    with PersistentStore(tmp_path / "store") as store:
        follower = Follower(store, None, client, tmp_path / "state",  # type: ignore[arg-type]
                            policy=PollPolicy(1.0, jitter=0.0, backoff_max=5.0))  # fmt: skip
        monkeypatch.setattr(asyncio, "sleep", record)
        with contextlib.suppress(asyncio.CancelledError):
            asyncio.run(follower._poll_loop())
    assert waits == [2.0, 4.0, 5.0, 5.0, 1.0, 1.0]
    assert follower.stats.polls == 2 and "503" in (follower.stats.last_error or "")


PART = 5 << 20  # the smallest part S3 allows: a tensor over it travels in parts


@pytest.mark.parametrize(
    "tensor_bytes",
    [
        pytest.param(3 * PART + (1 << 20), id="16MiB"),
        pytest.param(2 << 30, marks=pytest.mark.slow, id="2GiB"),
    ],
)
def test_sigkill_mid_multipart_upload_and_mid_download_leave_no_partial_version(
    tmp_path: Path, s3: SeaweedServer, tensor_bytes: int
) -> None:
    """The writer SIGKILLed with a multipart upload's parts in flight: the origin names
    nothing (no head, no manifest, no object); restarted, it completes from its outbox.
    A follower SIGKILLed in the middle of that object's ranged download: its store holds
    no version; restarted, it discards the partial file and adopts the whole version."""
    origin = new_origin()
    parts = {"CTXSTORE_ORIGIN_PART_SIZE": str(PART)}
    chunks = tensor_bytes // (256 << 10)  # progress callbacks come every few KiB at most
    weights = {"big": np.arange(tensor_bytes // 4, dtype=np.float32),
               "small": np.full(1024, 7, dtype=np.float32)}  # fmt: skip
    crash = {**parts, "CTXSTORE_CRASH_AT": "origin_upload_progress",
             "CTXSTORE_CRASH_AFTER": str(chunks // 2)}  # fmt: skip
    writer_root = tmp_path / "writer"
    with daemons(launch(writer_root, "--origin", origin, env=crash)) as (writer,):
        v1 = publish(9, Context(weights, {"step": 1}), socket=writer.socket, timeout=WAIT)
        del weights
        assert writer.proc.wait(WAIT) == -signal.SIGKILL
    client = OriginClient(Origin.parse(origin))
    assert client.get(client.origin.head_key(9)) is None
    assert not client.exists(client.origin.manifest_key(9, v1))
    with PersistentStore(writer_root / "store", readonly=True) as store:
        big = store.read_query("SELECT checksum FROM tensors WHERE name = 'big'")[0][0]
    assert not client.exists(client.origin.object_key(big))  # parts never completed
    assert (writer_root / "store" / "origin" / "outbox" / "9").exists()

    follower = tmp_path / "f1"
    crash_download = {**parts, "CTXSTORE_FOLLOW_POLL_INTERVAL": "0.2",
                      "CTXSTORE_CRASH_AT": "origin_download_progress",
                      "CTXSTORE_CRASH_AFTER": str(chunks // 2)}  # fmt: skip
    # the restarted writer and a follower that dies mid-download start together
    f1 = launch(follower, "--follow", origin, env=crash_download)
    with daemons(launch(writer_root, "--origin", origin, env=parts)) as (writer,):
        try:
            assert f1.proc.wait(WAIT) == -signal.SIGKILL
        finally:
            stop_and_clean(f1)
        assert _head(client, 9) == v1
        with PersistentStore(f1.store, readonly=True) as store:
            assert store.list_slots() == []
        assert any((follower / "store" / "origin" / "incoming").iterdir())  # the partial file
        env = {**parts, "CTXSTORE_FOLLOW_POLL_INTERVAL": "0.2"}
        with daemons(launch(follower, "--follow", origin, env=env)) as (f1,):
            wait_until("the restarted follower serves v1", follower_serves(f1, 9, v1))
            incoming = f1.store / "origin" / "incoming"
            wait_until("the downloads are removed", lambda: not any(incoming.iterdir()))
    with PersistentStore(follower / "store", readonly=True) as store:
        got = store.load_context(9, v1, verify=True)
        assert got.weights["big"].nbytes == tensor_bytes and got.weights["big"][-1] == (
            tensor_bytes // 4 - 1
        )


def test_status_shows_a_follower_whose_feed_is_down_and_its_last_origin_error() -> None:
    """``ctxstore status`` text for a follower: origin, feed state, versions applied,
    bytes moved, refusals and the last error (the daemon's row carries them)."""
    from ctxstore.cli.status_text import format_status
    from ctxstore.wire import Status

    cluster = {
        "role": "follower", "origin": "s3://models/prod", "feed": "nats://n:4222",
        "feed_connected": False, "applied": {"3": 12, "7": 2}, "bytes_downloaded": 3 << 20,
        "refused": 1, "last_error": "slot 7: origin object objects/ab is corrupt",
    }  # fmt: skip
    text = format_status(Status(request_id=1, daemon={"pid": 5, "cluster": cluster}))
    assert "follower from s3://models/prod" in text
    assert "nats://n:4222 (DISCONNECTED: polling meanwhile)" in text
    assert "applied 3:v12, 7:v2; downloaded 3.0 MiB, 1 refused" in text
    assert "last origin error: slot 7: origin object objects/ab is corrupt" in text
    plain = format_status(Status(request_id=1, daemon={"pid": 5}))
    assert "origin" not in plain and "feed" not in plain


def test_a_refused_slot_is_retried_with_backoff_and_at_once_when_its_head_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot whose head cannot be applied (here a corrupt head record) is not read again
    at every poll (each retry of a corrupt version may download it again): only once the
    backoff's wait is over, or at once when the head at the origin changes."""
    import asyncio

    class CorruptHead:
        origin = Origin.parse("s3://bucket-x/p")

        def __init__(self) -> None:
            self.etag, self.reads = '"e1"', 0

        def list_etags(self, prefix: str) -> dict[str, str]:
            return {self.origin.head_key(3): self.etag}

        def get(self, key: str) -> Versioned:
            self.reads += 1
            return Versioned(b"{not a head", self.etag)

    client, now, polls = CorruptHead(), [100.0], [0]
    real_sleep = asyncio.sleep

    async def one_poll(delay: float) -> None:
        polls[0] += 1
        if polls[0] == 20:
            assert client.reads == 1  # 20 polls, the clock still: read once
            now[0] += 5.0  # the first wait (2 x 2 s, +-20 %) is over
        elif polls[0] == 30:
            assert client.reads == 2  # read again once, now waiting 8 s
            client.etag = '"e2"'  # the head changed at the origin
        elif polls[0] == 40:
            assert client.reads == 3  # read at once, not after the 8 s
            raise asyncio.CancelledError
        for _ in range(5):  # let the apply loop run (its reads are in a thread)
            await real_sleep(0.001)

    with PersistentStore(tmp_path / "store") as store:
        follower = Follower(store, None, client, tmp_path / "state",  # type: ignore[arg-type]
                            policy=PollPolicy(2.0, jitter=0.2, backoff_max=60.0))  # fmt: skip
        follower._clock = lambda: now[0]
        monkeypatch.setattr(asyncio, "sleep", one_poll)

        async def both() -> None:
            await asyncio.gather(follower._poll_loop(), follower._apply_loop())

        with contextlib.suppress(asyncio.CancelledError):
            asyncio.run(both())
    assert follower.stats.refused == 3


def test_a_feed_hint_is_acted_on_after_the_pull_jitter(tmp_path: Path) -> None:
    """With ``cluster.pull_jitter`` a fleet told of a version at one instant does not
    download it at one instant: each follower checks the slot a random 0 to J s later
    (without it, at once)."""
    import asyncio

    from ctxstore.origin.feed import Hint

    class OneHint:
        async def hints(self) -> Any:
            yield Hint(5, 3, 1)
            yield Hint(5, 3, 0)  # not newer than what is applied (none): ignored below

    async def scenario(pull_jitter: float) -> tuple[list[float], list[int]]:
        later: list[float] = []
        loop = asyncio.get_running_loop()
        real_call_later = loop.call_later

        def record(delay: float, callback: Any, *args: Any) -> Any:
            later.append(delay)
            return real_call_later(0, callback, *args)

        loop.call_later = record  # type: ignore[method-assign]
        with PersistentStore(tmp_path / f"store-{pull_jitter}") as store:
            follower = Follower(store, None, None, tmp_path / f"state-{pull_jitter}",  # type: ignore[arg-type]
                                OneHint(), policy=PollPolicy(pull_jitter=pull_jitter))  # type: ignore[arg-type]  # fmt: skip
            await follower._feed_loop()
            loop.call_later = real_call_later  # type: ignore[method-assign]
            await asyncio.sleep(0.01)  # the deferred enqueue runs
            queued = [follower._queue.get_nowait() for _ in range(follower._queue.qsize())]
        return later, queued

    later, queued = asyncio.run(scenario(30.0))
    assert len(later) == 1 and 0.0 <= later[0] <= 30.0 and queued == [5]
    later, queued = asyncio.run(scenario(0.0))
    assert later == [] and queued == [5]


def test_a_version_s_objects_go_up_at_once_and_one_failing_shows_nothing(
    s3: SeaweedServer, tmp_path: Path
) -> None:
    """The objects a version lacks at the origin go up ``upload_concurrency`` at once (the
    first three uploads meet at a barrier: one at a time, they never would); one refused
    leaves no manifest and no head, and the retry sends only what did not arrive."""
    width = 3
    client = OriginClient(Origin.parse(new_origin()))
    client.ensure_bucket()
    real_upload = client.upload_file
    together = threading.Barrier(width, timeout=20)
    lock = threading.Lock()
    calls: list[str] = []
    ended: list[str] = []
    sent: list[str] = []
    refused: set[str] = set()

    def upload_file(path: str, key: str, size: int | None = None) -> None:
        with lock:
            calls.append(key)
            first = len(calls) <= width
        try:
            if first:
                together.wait()  # BrokenBarrierError unless `width` are in flight at once
            if key in refused:
                raise StorageError(f"origin refused {key}")
            real_upload(path, key, size)
            with lock:
                sent.append(key)
        finally:
            with lock:
                ended.append(key)

    client.upload_file = upload_file  # type: ignore[method-assign]
    weights = {f"t{i}": np.full(16 << 10, i, dtype=np.float32) for i in range(6)}
    with PersistentStore(tmp_path / "store") as store:
        version = store.save_context(1, Context(weights, {}, {}), files={"extra.txt": b"x"})
        uploader = Uploader(store, client, Outbox(tmp_path / "outbox"), upload_concurrency=width)
        manifest = uploader.manifest_of(1, version)
        objects = {client.origin.object_key(t.checksum) for t in manifest.tensors}
        refused.add(client.origin.object_key(manifest.tensors[1].checksum))
        manifest_key = client.origin.manifest_key(1, version)
        extra_key = client.origin.object_key(manifest.files[0].checksum)

        with pytest.raises(StorageError, match="origin refused"):
            uploader.sync_slot(1)
        assert uploader.stats.most_in_flight == width
        assert not client.exists(manifest_key)
        assert client.get(client.origin.head_key(1)) is None
        assert refused.isdisjoint(sent) and not any(client.exists(key) for key in refused)
        assert len(sent) == len(set(sent)) and all(client.exists(key) for key in sent)
        assert len(ended) == len(calls)  # no upload still in flight once it has failed
        assert uploader.stats.objects_uploaded == len(sent) + client.exists(extra_key)

        refused.clear()
        head = uploader.sync_slot(1)
        assert head is not None and head.current == version
        assert client.exists(manifest_key)
        assert sorted(sent) == sorted(objects)  # each tensor sent once over both passes
        assert uploader.stats.objects_uploaded == len(objects) + 1  # and the extra file
        assert uploader.stats.manifests_written == 1


class _MemoryOrigin:
    """An origin held in memory; each download noted with the inode of the file it wrote."""

    origin = Origin.parse("s3://bucket-x/p")

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.inodes: dict[str, int] = {}
        self.downloads: list[str] = []

    def get(self, key: str) -> Versioned | None:
        data = self.objects.get(key)
        return None if data is None else Versioned(data, '"e1"')

    def download_file(self, key: str, path: str, size: int | None = None) -> None:
        self.downloads.append(key)
        Path(path).write_bytes(self.objects[key])
        self.inodes[key] = os.stat(path).st_ino


class _StoreAdopter:
    """The committer's part a pull uses: the store's save_import, as the daemon calls it."""

    def __init__(self, store: PersistentStore) -> None:
        self.store = store

    async def commit(
        self, slot: int, context: Imported, *, model_type: str | None = None, as_version: int | None
    ) -> int:
        import asyncio

        try:
            return await asyncio.to_thread(self.store.save_import, slot, context,
                                           model_type=model_type, version=as_version,
                                           record_verified=True)  # fmt: skip
        finally:
            context.close()


def test_a_follower_moves_its_verified_downloads_into_the_store_without_copying(
    tmp_path: Path,
) -> None:
    """A downloaded, verified object becomes the store's file itself (the same inode:
    written once, hashed once), recorded with the checksum verified on download, read-only
    and intact; a tensor twice in a version is one file; an object whose .npy header is
    not the one this ctxstore writes is copied with the store's header instead."""
    import asyncio
    import dataclasses
    import io
    import stat

    from ctxstore.checksum import checksum_parts
    from ctxstore.origin.layout import TensorEntry
    from ctxstore.store import layout as store_layout

    client = _MemoryOrigin()
    key = client.origin.object_key
    a = np.arange(8192, dtype=np.float32)
    weights = {"a": a, "b": np.full((64, 32), 7, dtype=np.int16), "same_as_a": a.copy()}
    with PersistentStore(tmp_path / "writer") as writer:
        version = writer.save_context(2, Context(weights, {"k": 1}, {}), model_type="m")
        manifest = Uploader(writer, client, Outbox(tmp_path / "outbox")).manifest_of(2, version)  # type: ignore[arg-type]
        for position, tensor in enumerate(manifest.tensors):
            path = store_layout.tensor_path_str(str(writer.root), 2, version, position)
            client.objects[key(tensor.checksum)] = Path(path).read_bytes()
    odd = np.linspace(0, 1, 1000, dtype=np.float32)  # a valid .npy, in format 2.0
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": odd.shape}
    )
    odd_object = header.getvalue() + odd.tobytes()
    odd_entry = TensorEntry("odd", manifest.tensors[0].dtype, odd.shape, len(header.getvalue()),
                            odd.nbytes, checksum_parts((odd_object,)))  # fmt: skip
    client.objects[key(odd_entry.checksum)] = odd_object
    manifest = dataclasses.replace(manifest, tensors=(*manifest.tensors, odd_entry))
    client.objects[client.origin.manifest_key(2, version)] = manifest.to_bytes()

    with PersistentStore(tmp_path / "f1") as store:
        state = tmp_path / "f1" / "origin"
        follower = Follower(store, _StoreAdopter(store), client, state)  # type: ignore[arg-type]
        assert asyncio.run(follower.pull(2, version)) == version
        rows = store.read_query(
            "SELECT name, position, checksum FROM tensors WHERE slot = 2 AND version = ?",
            (version,),
        )
        files = {name: (store_layout.tensor_path_str(str(store.root), 2, version, position),
                        checksum) for name, position, checksum in rows}  # fmt: skip
        for tensor in manifest.tensors[:2]:
            path, checksum = files[tensor.name]
            assert os.stat(path).st_ino == client.inodes[key(tensor.checksum)]  # not a copy
            assert checksum == tensor.checksum
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o444
        assert os.stat(files["same_as_a"][0]).st_ino == os.stat(files["a"][0]).st_ino
        odd_path, odd_checksum = files["odd"]
        assert os.stat(odd_path).st_ino != client.inodes[key(odd_entry.checksum)]  # copied
        stored_odd = Path(odd_path).read_bytes()
        assert stored_odd.startswith(npy_header(odd.dtype, odd.shape))
        assert odd_checksum == checksum_parts((stored_odd,)) != odd_entry.checksum
        assert store.verified_by_commit(2, version)
        assert store.verify(2) == []  # every file hashed again: as recorded
        got = store.load_context(2, version)
        assert all(np.array_equal(got.weights[n], w) for n, w in weights.items())
        assert np.array_equal(got.weights["odd"], odd)
        assert not any((state / "incoming").iterdir())


def test_a_follower_links_what_it_holds_unread_and_never_reuses_a_damaged_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tensor a follower holds already is linked into the pulled version without a byte
    of it read, when its version was recorded verified this boot and the file is unchanged;
    a changed file is hashed first and linked only if intact; a damaged one is downloaded
    again, so the follower serves what its writer published (before, a held copy was read,
    hashed and byte-compared on every pull, and a damaged one was committed as it was)."""
    import asyncio

    from ctxstore.integrity import hash_file as real_hash
    from ctxstore.origin import reuse as reuse_module
    from ctxstore.store import layout as store_layout
    from ctxstore.store import staging

    client = _MemoryOrigin()
    rng = np.random.default_rng(5)
    b, c = rng.standard_normal(4096, dtype=np.float32), np.arange(512, dtype=np.int64)

    def publish_to_origin(writer: PersistentStore, step: int) -> Manifest:
        weights = {"a": np.full(2048, step, dtype=np.float32), "b": b, "c": c}
        version = writer.save_context(3, Context(weights, {"step": step}, {}))
        manifest = Uploader(writer, client, Outbox(tmp_path / "outbox")).manifest_of(3, version)  # type: ignore[arg-type]
        for position, tensor in enumerate(manifest.tensors):
            path = store_layout.tensor_path_str(str(writer.root), 3, version, position)
            client.objects[client.origin.object_key(tensor.checksum)] = Path(path).read_bytes()
        client.objects[client.origin.manifest_key(3, version)] = manifest.to_bytes()
        return manifest

    hashed: list[str] = []
    compared: list[str] = []
    real_same = staging.same_bytes
    monkeypatch.setattr(reuse_module, "hash_file", lambda p: hashed.append(p) or real_hash(p))
    ours = str(tmp_path / "f")  # the writer compares its own stored copies: not counted
    monkeypatch.setattr(staging, "same_bytes",
                        lambda p, *a: (p.startswith(ours) and compared.append(p)) or
                        real_same(p, *a))  # fmt: skip

    with PersistentStore(tmp_path / "writer") as writer, PersistentStore(tmp_path / "f") as store:
        follower = Follower(store, _StoreAdopter(store), client, tmp_path / "f" / "origin")  # type: ignore[arg-type]

        def pull(manifest: Manifest) -> dict[str, Path]:
            assert asyncio.run(follower.pull(3, manifest.version)) == manifest.version
            got = store.load_context(3, manifest.version)
            assert all(np.array_equal(got[n], w) for n, w in (("b", b), ("c", c)))
            assert int(got["a"][0]) == manifest.config["step"]
            rows = store.read_query(
                "SELECT name, position FROM tensors WHERE slot = 3 AND version = ?",
                (manifest.version,),
            )
            root = str(store.root)
            return {n: Path(store_layout.tensor_path_str(root, 3, manifest.version, p))
                    for n, p in rows}  # fmt: skip

        first = pull(publish_to_origin(writer, 1))
        downloaded = follower.stats.objects_downloaded
        second = pull(publish_to_origin(writer, 2))
        assert follower.stats.objects_downloaded == downloaded + 1  # "a" alone
        for name in ("b", "c"):  # linked: the same file, not one byte of it read
            assert second[name].stat().st_ino == first[name].stat().st_ino
        assert hashed == [] and compared == []

        os.utime(second["c"], ns=(1, 1))  # intact, but no longer the file the record names
        third = pull(publish_to_origin(writer, 3))
        assert len(hashed) == 1 and Path(hashed[0]).stat().st_ino == first["c"].stat().st_ino
        assert third["c"].stat().st_ino == first["c"].stat().st_ino  # hashed, then linked
        assert follower.stats.objects_downloaded == downloaded + 2

        damaged = third["b"]
        damaged.chmod(0o644)
        with open(damaged, "r+b") as f:  # one flipped byte in every version holding it
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))
        fourth = pull(publish_to_origin(writer, 4))  # checks b's bytes: the writer's
        assert fourth["b"].stat().st_ino != damaged.stat().st_ino  # downloaded again
        assert follower.stats.objects_downloaded == downloaded + 4  # "a" and "b"


def test_a_refused_pull_keeps_its_verified_downloads_and_the_retry_fetches_the_rest(
    tmp_path: Path,
) -> None:
    """A pull refused for one corrupt object leaves the objects it verified in incoming/;
    the retry, once the origin is mended, downloads the corrupt one alone (before, each
    retry downloaded the whole version again). A pull of another version drops what was
    kept, so incoming/ holds one version's objects at most."""
    import asyncio

    from ctxstore.errors import IntegrityError
    from ctxstore.store import layout as store_layout

    client = _MemoryOrigin()
    key = client.origin.object_key
    rng = np.random.default_rng(11)

    def to_origin(writer: PersistentStore) -> tuple[Manifest, dict[str, np.ndarray]]:
        weights = {f"t{i}": rng.standard_normal(2048, dtype=np.float32) for i in range(4)}
        version = writer.save_context(4, Context(weights, {}, {}))
        manifest = Uploader(writer, client, Outbox(tmp_path / "outbox")).manifest_of(4, version)  # type: ignore[arg-type]
        for position, tensor in enumerate(manifest.tensors):
            path = store_layout.tensor_path_str(str(writer.root), 4, version, position)
            client.objects[key(tensor.checksum)] = Path(path).read_bytes()
        client.objects[client.origin.manifest_key(4, version)] = manifest.to_bytes()
        return manifest, weights

    def corrupt(manifest: Manifest) -> tuple[str, bytes]:
        name = key(manifest.tensors[2].checksum)
        intact = client.objects[name]
        client.objects[name] = intact[:-1] + bytes([intact[-1] ^ 1])
        return name, intact

    incoming = tmp_path / "f" / "origin" / "incoming"
    with PersistentStore(tmp_path / "writer") as writer, PersistentStore(tmp_path / "f") as store:
        follower = Follower(store, _StoreAdopter(store), client, tmp_path / "f" / "origin")  # type: ignore[arg-type]
        first, weights = to_origin(writer)
        name, intact = corrupt(first)
        with pytest.raises(IntegrityError, match="corrupt"):
            asyncio.run(follower.pull(4, first.version))
        assert len(client.downloads) == 3  # t0, t1, then the corrupt t2
        assert store.current_version(4) is None  # nothing committed
        assert len(list(incoming.iterdir())) == 2  # the two verified ones, kept
        client.objects[name] = intact
        client.downloads.clear()
        assert asyncio.run(follower.pull(4, first.version)) == first.version
        assert client.downloads == [name, key(first.tensors[3].checksum)]
        got = store.load_context(4, first.version, verify=True)
        assert all(np.array_equal(got[n], w) for n, w in weights.items())
        assert not any(incoming.iterdir())  # each one moved into the version

        second, _ = to_origin(writer)
        corrupt(second)
        with pytest.raises(IntegrityError, match="corrupt"):
            asyncio.run(follower.pull(4, second.version))
        assert len(list(incoming.iterdir())) == 2
        third, weights = to_origin(writer)
        assert asyncio.run(follower.pull(4, third.version)) == third.version
        assert not any(incoming.iterdir())  # the second's kept objects went too
        got = store.load_context(4, third.version, verify=True)
        assert all(np.array_equal(got[n], w) for n, w in weights.items())
