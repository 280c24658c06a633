"""Build jobs and hooks inside a running daemon, end to end over HTTP and the socket."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.daemon import DaemonProcess, start_daemon, wait_for_socket
from support.peers import RawPeer

from ctxstore import Context, PersistentStore, RemoteError
from ctxstore.client import publish
from ctxstore.messages import Announce
from ctxstore.versiontable import segment_name


def http_port(daemon: DaemonProcess, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"http listening on 127\.0\.0\.1:(\d+)", daemon.log_text())
        if found:
            return int(found[1])
        time.sleep(0.05)
    raise AssertionError(daemon.log_text()[-2000:])


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[tuple[DaemonProcess, httpx.Client]]:
    config = tmp_path / "ctxstore.toml"
    config.write_text(
        '[hooks]\ncheck_finite = true\nbest_metric = "eval.loss"\nbest_mode = "min"\n'
    )
    daemon = start_daemon(tmp_path, tmp_path / "store", tmp_path / "ctx.sock", None,
                          "--config", str(config), "--http", "127.0.0.1:0")  # fmt: skip
    try:
        wait_for_socket(daemon.socket, daemon.proc)
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port(daemon)}", timeout=30) as http:
            yield daemon, http
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()
        shm = Path("/dev/shm" + segment_name(daemon.store))
        if shm.exists():
            shm.unlink()


def test_a_job_posted_over_http_builds_commits_and_is_announced(
    worker: tuple[DaemonProcess, httpx.Client],
) -> None:
    daemon, http = worker
    peer = RawPeer(daemon.socket)
    peer.subscribe(slots=(9,))
    created = http.post("/jobs", json={"slot": 9, "node_type": "cnn", "config": {"seed": 4}})
    assert created.status_code == 201, created.text
    job_id = created.json()["job"]["id"]
    deadline = time.monotonic() + 60
    while (job := http.get(f"/jobs/{job_id}").json()["job"])["state"] != "done":
        assert job["state"] in {"pending", "processing"}, job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["version"] == 1
    assert job["progress"] == 1.0
    announce = peer.next()
    assert isinstance(announce, Announce)
    assert (announce.slot, announce.version) == (9, 1)
    with PersistentStore(daemon.store, readonly=True) as store:
        assert store.get_metadata(9).model_type == "cnn"


def test_a_file_job_for_a_missing_file_is_refused_when_posted_naming_it(
    worker: tuple[DaemonProcess, httpx.Client], tmp_path: Path
) -> None:
    """Not accepted and then retried until it fails: POST /jobs answers 404 with the path."""
    _, http = worker
    missing = tmp_path / "not-there.safetensors"
    body = {"slot": 3, "node_type": "file", "config": {"path": str(missing)}}
    refused = http.post("/jobs", json=body)
    assert refused.status_code == 404, refused.text
    assert refused.json()["error"]["type"] == "not_found"
    assert f"weights file '{missing}' does not exist" in refused.json()["error"]["message"]
    assert http.get("/jobs").json()["jobs"] == []


def test_hooks_refuse_nan_and_track_the_best_version(
    worker: tuple[DaemonProcess, httpx.Client],
) -> None:
    daemon, http = worker
    sock = daemon.socket
    with pytest.raises(RemoteError, match="NaN"):
        publish(1, Context({"w": np.array([1.0, np.nan])}), socket=sock)
    peer = RawPeer(daemon.socket)
    peer.subscribe(slots=(1,))
    for loss in (0.9, 0.5, 0.7):
        publish(1, Context({"w": np.full(3, loss)}, None, {"eval": {"loss": loss}}), socket=sock)
    deadline = time.monotonic() + 20  # post-commit hooks run after the announcement
    while http.get("/slots/1/versions/best").status_code != 200 or (
        http.get("/slots/1/versions/best").json().get("version") != 2
    ):
        assert time.monotonic() < deadline, http.get("/slots/1/versions/best").text
        time.sleep(0.05)
    moved = [m for m in (peer.next() for _ in range(5)) if isinstance(m, Announce) and m.aliases]
    assert moved
    assert moved[-1].aliases == {"best": 2}


def test_sighup_swaps_the_hooks(worker: tuple[DaemonProcess, httpx.Client], tmp_path: Path) -> None:
    daemon, _ = worker
    (tmp_path / "ctxstore.toml").write_text("[hooks]\ncheck_finite = false\n")
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while "SIGHUP: hooks now" not in daemon.log_text():
        assert time.monotonic() < deadline, daemon.log_text()[-2000:]
        time.sleep(0.05)
    assert publish(2, Context({"w": np.array([np.inf])}), socket=daemon.socket) == 1
