"""Scale-out with real processes: a writer daemon uploading to SeaweedFS (S3) and NATS
(JetStream), follower daemons pulling from them, readers on the followers."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import dies_with_pytest
from test_daemon import DaemonProcess, start_daemon, wait_for_socket

from ctxstore import Context, RemoteError
from ctxstore.client import publish
from ctxstore.errors import IntegrityError
from ctxstore.origin.follower import state_summary
from ctxstore.origin.layout import Head, Manifest, Origin
from ctxstore.origin.s3 import OriginClient
from ctxstore.readers import Reader
from ctxstore.store import PersistentStore
from ctxstore.versiontable import segment_name

pytest.importorskip("boto3")
pytest.importorskip("nats")
from cluster_servers import NatsServer, SeaweedServer, s3_env  # noqa: E402

WAIT = 60.0  # a bound for the loops below, not a speed goal (bench/ measures speed)


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
    server.start(wrap=dies_with_pytest([]))
    try:
        yield server
    finally:
        server.stop()


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


def wait_until(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened within {timeout:g}s: {what}")


@contextlib.contextmanager
def daemon_at(tmp: Path, name: str, *extra: str) -> Iterator[DaemonProcess]:
    root = tmp / name
    root.mkdir(exist_ok=True)
    (root / "run").mkdir(exist_ok=True)
    proc = start_daemon(root, root / "store", root / "run" / "ctx.sock", None, *extra)
    try:
        wait_for_socket(proc.socket, proc.proc)
        yield proc
    finally:
        if proc.proc.poll() is None:
            proc.proc.terminate()
            try:
                proc.proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.proc.kill()
                proc.proc.wait(10)
        shm = Path("/dev/shm" + segment_name(proc.store))
        if shm.exists():
            shm.unlink()


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
    with (
        daemon_at(tmp_path, "writer", "--origin", origin, *feed) as writer,
        daemon_at(tmp_path, "f1", "--follow", origin, *feed) as f1,
        daemon_at(tmp_path, "f2", "--follow", origin, *feed) as f2,
    ):
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
            before = [stats(f)["bytes_downloaded"] for f in (f1, f2)]
            assert all(b >= 10 * (64 << 10) for b in before)

            v2 = publish(7, context(2, changed=3), socket=writer.socket)
            assert v2 == v1 + 1
            for f, reader in zip((f1, f2), readers, strict=True):
                wait_until(f"{f.store} serves v{v2}", follower_serves(f, 7, v2))
                wait_until("reader adopts v2", lambda r=reader: r.get(7).version == v2)
                got = reader.get(7)
                assert stamp_of(got, 3) == 2 and int(got.weights["t0"][0]) == -1
            moved = [stats(f)["bytes_downloaded"] - b for f, b in zip((f1, f2), before, strict=True)]
            one_tensor = (64 << 10) + 128  # the data and its .npy header
            assert all(0 < m <= 1.1 * one_tensor for m in moved), moved

            with pytest.raises(RemoteError, match=f"follows {origin}"):
                publish(7, context(9), socket=f1.socket)
        finally:
            for reader in readers:
                reader.close()
