"""``ctxstore cluster demo``: a writer and followers over a real S3 origin and NATS feed.

Starts SeaweedFS and NATS on loopback (from the test extra's wheels), one writer
daemon with ``--origin`` and ``--feed``, and N follower daemons with ``--follow``
(each its own store and socket, standing for a host) with a reader on each;
publishes a few versions (one tensor of ten changes each time) and prints when
each host's reader served each version; then stops everything, removes every
file and exits 0 when every host served every version.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ctxstore import Context
from ctxstore.client import publish, wait_until_listening
from ctxstore.errors import CtxStoreError, InvalidInputError
from ctxstore.origin.servers import NatsServer, SeaweedServer, s3_env
from ctxstore.origin.state import state_summary

from .table import print_table

if TYPE_CHECKING:
    from ctxstore.readers import Reader

SLOT = 1
TIMEOUT_S = 60.0
N_TENSORS = 10
TENSOR_BYTES = 1 << 20


def _daemon(root: Path, env: dict[str, str], *role: str) -> subprocess.Popen[bytes]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "daemon.log", "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ctxstore.cli", "daemon", "--store", str(root / "store"),
             "--socket", str(root / "ctx.sock"), "--http", "off", *role],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip


def _context(step: int) -> Context:
    weights = {
        f"layer{i}": np.full(TENSOR_BYTES // 4, 1000 + step if i == 0 else i,
                             dtype=np.float32)
        for i in range(N_TENSORS)
    }  # fmt: skip
    return Context(weights, {"step": step}, {"demo": "cluster"})


def run_cluster_demo(versions: int = 3, followers: int = 3) -> int:
    from ctxstore.readers import Reader

    if versions < 1 or not 1 <= followers <= 16:
        raise InvalidInputError("the cluster demo takes 1 or more versions and 1 to 16 followers")
    with tempfile.TemporaryDirectory(prefix="ctxstore-cluster-demo-") as tmp:
        root = Path(tmp)
        seaweed, nats = SeaweedServer(root / "seaweedfs"), NatsServer(root / "nats")
        procs: list[subprocess.Popen[bytes]] = []
        readers: list[Reader] = []
        ok = False
        try:
            print("cluster demo: starting SeaweedFS (S3) and NATS (JetStream) on loopback")
            seaweed.start()
            nats.start()
            env = {**os.environ, **s3_env(seaweed)}
            origin, feed = "s3://ctxstore-demo/models", ("--feed", nats.url)
            hosts = [root / "writer", *(root / f"host-{i + 1}" for i in range(followers))]
            procs.append(_daemon(hosts[0], env, "--origin", origin, *feed))
            procs += [_daemon(h, env, "--follow", origin, *feed) for h in hosts[1:]]
            for host, proc in zip(hosts, procs, strict=True):
                wait_until_listening(host / "ctx.sock", TIMEOUT_S, alive=_alive(proc))
            print(f"writer {hosts[0].name} -> {origin} (S3 {seaweed.endpoint}), feed {nats.url}; "
                  f"followers: {', '.join(h.name for h in hosts[1:])}")  # fmt: skip
            readers = [Reader(h / "store", h / "ctx.sock") for h in hosts[1:]]
            rows = []
            ok = True
            for step in range(1, versions + 1):
                started = time.perf_counter()
                version = publish(SLOT, _context(step), socket=hosts[0] / "ctx.sock")
                committed = time.perf_counter() - started
                served = _wait_served(readers, version, started)
                ok = ok and all(s is not None for s in served)
                shown = ("-" if s is None else f"{s * 1e3:.0f}" for s in served)
                rows.append((version, f"{committed * 1e3:.0f}", *shown))
            print_table(("version", "writer commit ms",
                         *(f"{h.name} serves ms" for h in hosts[1:])), rows)  # fmt: skip
            moved = [_downloaded(h / "store" / "origin", versions) for h in hosts[1:]]
            print(
                f"each version after the first changes 1 of {N_TENSORS} tensors of "
                f"{TENSOR_BYTES >> 20} MiB; MiB each follower downloaded in all: "
                + ", ".join(f"{m / (1 << 20):.1f}" for m in moved)
            )
        finally:
            for reader in readers:
                reader.close()
            codes = [_stop(p) for p in procs]
            nats.stop()
            seaweed.stop()
        print(f"stopped {len(procs)} daemons (exit {codes}), SeaweedFS and NATS; files removed")
        return 0 if ok and all(c == 0 for c in codes) else 1


def _wait_served(readers: list[Reader], version: int, started: float) -> list[float | None]:
    """Seconds from ``started`` until each reader's get() returned ``version`` (None: never)."""
    served: list[float | None] = [None] * len(readers)
    deadline = time.monotonic() + TIMEOUT_S
    while None in served and time.monotonic() < deadline:
        for i, reader in enumerate(readers):
            if served[i] is None:
                current = None
                with contextlib.suppress(CtxStoreError):  # the slot is not on the host yet
                    current = reader.get(SLOT).version
                if current == version:
                    served[i] = time.perf_counter() - started
        time.sleep(0.005)
    return served


def _alive(proc: subprocess.Popen[bytes]) -> Callable[[], bool]:
    return lambda: proc.poll() is None


def _downloaded(state_dir: Path, versions: int) -> int:
    """Bytes a follower downloaded, once its saved counters show every pull (the reader
    may serve a version a moment before the follower saves them)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        stats = state_summary(state_dir)["stats"]
        if stats["versions_pulled"] >= versions or time.monotonic() > deadline:
            return int(stats["bytes_downloaded"])
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return -9
