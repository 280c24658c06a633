"""A live daemon under hostile input and connection churn: it stays up, serves, stays bounded."""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from test_daemon import DaemonProcess, RawPeer, start_daemon, wait_for_socket

from ctxstore import Context
from ctxstore.client import publish
from ctxstore.messages import Announce, Heartbeat, Hello, Subscribe
from ctxstore.protocol import Connection, Role
from ctxstore.versiontable import segment_name

FRAMES_DEFAULT, FRAMES_LONG = 10_000, 100_000
CHURN_CYCLES = 1_000
MiB = 1 << 20


@pytest.fixture
def live(tmp_path: Path) -> Iterator[DaemonProcess]:
    daemon = start_daemon(tmp_path, tmp_path / "store", tmp_path / "ctx.sock", None,
                          "--log-level", "ERROR")  # fmt: skip
    try:
        wait_for_socket(daemon.socket, daemon.proc)
        yield daemon
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)
        shm = Path("/dev/shm" + segment_name(daemon.store))
        if shm.exists():
            shm.unlink()


def _valid_stream(rng: random.Random) -> bytes:
    """A well-formed client conversation, to mutate."""
    client = Connection(Role.CLIENT)
    parts = [client.send(Hello(role="reader", name=f"fuzz{rng.randrange(99)}", pid=os.getpid()))]
    client.receive_data(_welcome_bytes())
    client.next_event()
    parts.append(client.send(Subscribe(request_id=1, slots=(rng.randrange(10),))))
    parts.append(client.send(Heartbeat(pid=1, name="x", held=((1, 2),), uss=3, pss=4)))
    return b"".join(parts)


def _welcome_bytes() -> bytes:
    from ctxstore.messages import Welcome

    server = Connection(Role.SERVER)
    server.receive_data(Connection(Role.CLIENT).send(Hello(role="reader", name="w", pid=1)))
    server.next_event()
    return server.send(Welcome(session=1, daemon_pid=1, versions={}))


def hostile_input(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:  # random bytes
        return rng.randbytes(rng.randrange(1, 64))
    if kind == 1:  # a plausible length and a random body
        body = rng.randbytes(rng.randrange(0, 40))
        return struct.pack(">I", len(body)) + body
    if kind == 2:  # an absurd declared length
        return struct.pack(">I", rng.choice([2**31, 2**32 - 1, 1 << 21])) + rng.randbytes(8)
    if kind == 3:  # huge declared containers inside a small frame
        body = rng.choice(
            [b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff"]
        )
        return struct.pack(">I", len(body)) + body
    stream = bytearray(_valid_stream(rng))
    if kind == 4:  # flip bytes of a valid conversation
        for _ in range(rng.randrange(1, 6)):
            stream[rng.randrange(len(stream))] = rng.randrange(256)
        return bytes(stream)
    return bytes(stream[: rng.randrange(1, len(stream))])  # truncated mid-frame


def _send_and_drain(path: Path, data: bytes) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    try:
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass  # the daemon closed first: fine
    finally:
        sock.close()


def _daemon_rss(daemon: DaemonProcess) -> int:
    return int(psutil.Process(daemon.proc.pid).memory_info().rss)


@pytest.mark.parametrize(
    "count", [FRAMES_DEFAULT, pytest.param(FRAMES_LONG, marks=pytest.mark.slow)]
)
def test_hostile_frames_never_take_the_daemon_down(live: DaemonProcess, count: int) -> None:
    rng = random.Random(20261123)
    good = RawPeer(live.socket, "well-behaved")
    good.subscribe(all=True)
    for _ in range(200):  # warm up allocator and caches before measuring
        _send_and_drain(live.socket, hostile_input(rng))
    rss_before = _daemon_rss(live)
    for i in range(count):
        _send_and_drain(live.socket, hostile_input(rng))
        if i % 2_000 == 0:  # the well-behaved peer is served all along
            good.send(Heartbeat(pid=os.getpid(), name="well-behaved", held=(), uss=0, pss=0))
            version = publish(1, Context({"w": np.full(4, float(i))}), socket=live.socket)
            announce = good.next()
            assert isinstance(announce, Announce)
            assert announce.version == version
    assert live.proc.poll() is None, live.log_text()[-2000:]
    growth = _daemon_rss(live) - rss_before
    assert growth < 32 * MiB, f"daemon RSS grew {growth / MiB:.1f} MiB over {count} hostile inputs"


def test_connection_churn_returns_fds_and_memory(live: DaemonProcess) -> None:
    process = psutil.Process(live.proc.pid)

    def cycle() -> None:
        peer = RawPeer(live.socket, "churn")
        peer.subscribe(slots=(1,))
        peer.close()

    for _ in range(50):
        cycle()
    fds_before, rss_before = process.num_fds(), process.memory_info().rss
    for _ in range(CHURN_CYCLES):
        cycle()
    publish(1, Context({"w": np.zeros(2)}), socket=live.socket)
    deadline = time.monotonic() + 10  # the daemon closes each peer when it reads its EOF
    while (fds_after := process.num_fds()) > fds_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fds_after <= fds_before, f"fds {fds_before} -> {fds_after}"
    growth = process.memory_info().rss - rss_before
    assert growth < 16 * MiB, f"daemon RSS grew {growth / MiB:.1f} MiB over {CHURN_CYCLES} cycles"
