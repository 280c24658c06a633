"""A live daemon under hostile input and connection churn: it stays up, serves, stays bounded."""

from __future__ import annotations

import contextlib
import os
import random
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import psutil
import pytest
from support.daemon import CLI, DaemonProcess, start_daemon, stop_and_clean, wait_for_socket
from support.peers import RawPeer
from support.procs import as_uid, free_port

from ctxstore import Context
from ctxstore.client import DaemonClient, publish
from ctxstore.messages import Announce, Error, Heartbeat, Hello, Ping, Pong, Subscribe, Welcome
from ctxstore.protocol import NEED_DATA, Connection, Role
from ctxstore.versiontable import segment_name

FRAMES_DEFAULT, FRAMES_LONG = 5_000, 100_000
CHURN_CYCLES = 1_000
MiB = 1 << 20


@pytest.fixture
def live(tmp_path: Path) -> Iterator[DaemonProcess]:
    # The well-behaved peers here speak only between bursts of hostile input, which take
    # as long as the machine makes them: silence is not what these tests are about, so
    # the daemon never drops a peer for it (the default 10 s did, under load).
    daemon = start_daemon(tmp_path, tmp_path / "store", tmp_path / "ctx.sock", None,
                          "--log-level", "ERROR", "--silent-timeout", "3600")  # fmt: skip
    try:
        wait_for_socket(daemon.socket, daemon.proc)
        yield daemon
    finally:
        stop_and_clean(daemon, kill=True)


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
    sock.settimeout(60)  # a bound for a hung daemon, never reached by a slow one
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
    # the commit's worker thread opens its own index connection (2 fds) on the first
    # publish: made here, so the count compares peers' descriptors only
    publish(1, Context({"w": np.zeros(2)}), socket=live.socket)
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


# -- resource limits (issue 18: connections, unfinished frames, floods, nesting) ------------------


@contextlib.contextmanager
def limited_daemon(tmp_path: Path, **limits: object) -> Iterator[DaemonProcess]:
    """A daemon with small ``[limits]`` (docs/configuration.md), its socket where a child
    that dropped to another uid can reach it."""
    config = tmp_path / "ctxstore.toml"
    lines = ["[limits]", *(f"{key} = {value!r}" for key, value in limits.items())]
    config.write_text("\n".join(lines if limits else []) + "\n")
    run = Path(tempfile.mkdtemp(prefix="ctxstore-limits-"))
    run.chmod(0o755)
    daemon = start_daemon(tmp_path, tmp_path / "store", run / "ctx.sock", None,
                          "--config", str(config), "--silent-timeout", "30")  # fmt: skip
    try:
        wait_for_socket(daemon.socket, daemon.proc)
        yield daemon
    finally:
        stop_and_clean(daemon)
        shutil.rmtree(run, ignore_errors=True)


def _hello_frame(name: str = "hostile") -> bytes:
    return Connection(Role.CLIENT).send(Hello(role="reader", name=name, pid=os.getpid()))


def _answer(sock: socket.socket) -> object:
    """The first frame the daemon sends on ``sock`` (or CLOSED when it sends none)."""
    conn = Connection(Role.CLIENT)
    conn.send(Hello(role="reader", name="x", pid=1))  # so a Welcome is expected
    while (event := conn.next_event()) is NEED_DATA:
        conn.receive_data(sock.recv(65536))
    return event


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def _greeted(path: Path) -> socket.socket:
    """A connection that said hello and got its welcome (served, counted by the daemon)."""
    sock = _connect(path)
    sock.sendall(_hello_frame())
    assert isinstance(_answer(sock), Welcome)
    return sock


def test_connections_past_the_caps_get_an_error_frame_that_says_why(tmp_path: Path) -> None:
    with limited_daemon(tmp_path, connections=8, connections_per_uid=8) as live:
        served = [_greeted(live.socket) for _ in range(8)]
        refusals = []
        for _ in range(30):
            extra = _connect(live.socket)
            refusals.append(_answer(extra))
            extra.close()
        for refusal in refusals:
            assert isinstance(refusal, Error) and refusal.fatal, refusal
            assert refusal.kind == "daemon_unavailable"
            assert "limits.connections = 8" in refusal.message, refusal.message
        served.pop().close()  # a place frees up: the next peer is served again
        deadline = time.monotonic() + 20
        while True:
            sock = _connect(live.socket)
            sock.sendall(_hello_frame())
            answer = _answer(sock)
            served.append(sock)
            if isinstance(answer, Welcome) or time.monotonic() > deadline:
                break
        assert isinstance(answer, Welcome), answer
        refused_lines = [line for line in live.log_text().splitlines() if "refused:" in line]
        assert 1 <= len(refused_lines) <= 20, "refusals are logged a few times, then counted"
        for sock in served:
            sock.close()


def test_connections_per_uid_leave_room_for_other_uids(tmp_path: Path) -> None:
    with limited_daemon(tmp_path, connections=8, connections_per_uid=3) as live:
        served = [_greeted(live.socket) for _ in range(3)]
        extra = _connect(live.socket)
        refusal = _answer(extra)
        assert isinstance(refusal, Error) and refusal.kind == "daemon_unavailable"
        assert f"uid {os.getuid()}" in refusal.message
        assert "limits.connections_per_uid = 3" in refusal.message
        if os.getuid() == 0:  # another uid still gets in while this one is at its cap

            def hello_as_other_uid() -> bytes:
                sock = _connect(live.socket)
                sock.sendall(_hello_frame("nobody"))
                return type(_answer(sock)).__name__.encode()

            assert as_uid(65534, hello_as_other_uid) == b"Welcome"
        for sock in (*served, extra):
            sock.close()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to drop to uid 65534 in a child")
def test_an_unprivileged_slowloris_is_dropped_at_the_frame_deadline(tmp_path: Path) -> None:
    """uid 65534 starts a 1 MiB frame and stops: after limits.frame_timeout it gets the
    protocol's error frame and is closed; the daemon serves others all along."""
    with limited_daemon(tmp_path, frame_timeout=1.0) as live:

        def slowloris() -> bytes:
            sock = _connect(live.socket)
            sock.sendall(_hello_frame("slowloris"))
            _answer(sock)
            sock.sendall(struct.pack(">I", MiB - 64) + b"\x81" + bytes(1000))
            received = b""
            while chunk := sock.recv(65536):  # the error frame, then EOF
                received += chunk
            return received

        received = as_uid(65534, slowloris)
        assert b"frame not finished within frame_timeout 1s" in received, received
        assert publish(1, Context({"w": np.zeros(2)}), socket=live.socket) == 1


def test_a_slowloris_gets_an_error_frame_at_the_frame_deadline(tmp_path: Path) -> None:
    with limited_daemon(tmp_path, frame_timeout=1.0) as live:
        sock = _greeted(live.socket)
        sock.sendall(struct.pack(">I", 4096) + b"\x81")  # a frame begun, never finished
        conn = Connection(Role.CLIENT)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        conn.receive_data(received)
        error = conn.next_event()
        assert isinstance(error, Error) and error.kind == "remote_protocol", error
        assert "frame not finished within frame_timeout 1s" in error.message
        sock.close()


def _start_big_frames(path: Path, count: int, publish_to: Path) -> list[socket.socket]:
    """``count`` greeted peers that each send the daemon all it will take of a 1 MiB frame
    (never the whole of it); the caller closes them."""
    peers = [_greeted(path) for _ in range(count)]
    unsent = {sock: struct.pack(">I", MiB - 64) + b"\x81" + bytes(MiB - 1024) for sock in peers}
    for sock in peers:
        sock.setblocking(False)
    for _ in range(200):  # until the daemon takes nothing more
        moved = 0
        for sock, rest in unsent.items():
            with contextlib.suppress(BlockingIOError):
                sent = sock.send(rest)
                unsent[sock], moved = rest[sent:], moved + sent
        publish(1, Context({"w": np.ones(2)}), socket=publish_to)  # a turn of its loop
        if not moved:
            break
    return peers


def test_unfinished_frames_are_bounded_and_freed_when_their_peers_go(tmp_path: Path) -> None:
    """16 peers each start a 1 MiB frame and stop: the daemon holds at most its partial pool
    (2 MiB here) of them, not 16 MiB, and gives the memory back when they go."""
    count = 16
    limits = {"connections": 32, "connections_per_uid": 32, "partial_bytes": 2 * MiB}
    with limited_daemon(tmp_path, frame_timeout=60.0, **limits) as live:
        process = psutil.Process(live.proc.pid)

        def grown() -> float:
            return (process.memory_info().rss - rss_before) / MiB

        rss_before = process.memory_info().rss
        for sock in _start_big_frames(live.socket, count, live.socket):  # warm-up: first-time
            sock.close()  # allocations (code paths, arenas) are not what is measured
        deadline = time.monotonic() + 20
        while _open_sessions(live) and time.monotonic() < deadline:
            time.sleep(0.05)
        rss_before = process.memory_info().rss
        peers = _start_big_frames(live.socket, count, live.socket)
        held = grown()
        assert held < 8, f"daemon RSS grew {held:.1f} MiB for {count} unfinished 1 MiB frames"
        for sock in peers:
            sock.close()
        deadline = time.monotonic() + 20
        while (left := grown()) > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left <= 2, f"{left:.1f} MiB still held after the peers left"


def _open_sessions(live: DaemonProcess) -> int:
    """Peers the daemon serves besides the asker (from its status)."""
    with DaemonClient(live.socket, name="counter", role="admin") as client:
        return int(client.status().daemon["subscribers"])


def test_a_ping_flood_that_hangs_up_costs_a_few_log_lines(tmp_path: Path) -> None:
    """Thousands of pings then a hang-up: no "socket.send() raised exception" per answer,
    and others are served."""
    with limited_daemon(tmp_path) as live:
        hello = Connection(Role.CLIENT)
        stream = [hello.send(Hello(role="reader", name="flood", pid=os.getpid()))]
        hello.receive_data(_welcome_bytes())
        hello.next_event()
        stream += [hello.send(Ping(nonce=i)) for i in range(20_000)]
        for _ in range(5):
            sock = _connect(live.socket)
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.send(b"".join(stream))  # what the kernel takes; then hang up at once
            sock.close()
        good = RawPeer(live.socket, "well-behaved")
        good.send(Ping(nonce=7))
        pong = good.next()
        assert isinstance(pong, Pong) and pong.nonce == 7
        publish(1, Context({"w": np.zeros(2)}), socket=live.socket)
        text = live.log_text()
        assert text.count("socket.send() raised exception") <= 5, text[-3000:]
        assert len(text) < 64 << 10, f"{len(text)} bytes of log for 5 floods"


def test_msgpack_nested_a_thousand_deep_gets_the_protocol_error(tmp_path: Path) -> None:
    with limited_daemon(tmp_path) as live:
        sock = _greeted(live.socket)
        nested: object = 1
        for _ in range(1000):
            nested = [nested]
        body = msgpack.packb(
            {"type": "subscribe", "request_id": 1, "slots": nested, "groups": [], "all": False}
        )
        sock.sendall(struct.pack(">I", len(body)) + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        conn = Connection(Role.CLIENT)
        conn.receive_data(received)
        error = conn.next_event()
        assert isinstance(error, Error) and error.kind == "remote_protocol", error
        assert "nested too deep" in error.message
        sock.close()
        assert publish(1, Context({"w": np.zeros(2)}), socket=live.socket) == 1
        text = live.log_text()
        assert "Unhandled exception" not in text and "RecursionError" not in text, text[-3000:]


def test_tcp_and_event_floods_leave_the_socket_its_descriptors(tmp_path: Path) -> None:
    """A daemon with RLIMIT_NOFILE 200: 260 idle TCP connections and 13 /events streams at
    its HTTP port; publishes on the Unix socket still work (the caps derived from the limit
    keep descriptors for it) and the log has no line per refused or failed accept."""
    nofile, port = 200, free_port()
    store, sock, log = tmp_path / "store", tmp_path / "ctx.sock", tmp_path / "daemon.log"
    limited = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile})); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    live = start_daemon(tmp_path, store, sock, None, "--http", f"127.0.0.1:{port}",
                        launcher=("-c", limited, *CLI), log=log)  # fmt: skip
    proc = live.proc
    flood: list[socket.socket] = []
    try:
        wait_for_socket(sock, proc)
        for _ in range(260):  # connecting at once: the handshakes overlap
            conn = socket.socket()
            conn.setblocking(False)
            conn.connect_ex(("127.0.0.1", port))
            flood.append(conn)
        waiting, deadline = set(flood), time.monotonic() + 30
        while waiting and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(waiting), [], 1.0)
            waiting.difference_update(writable)
        for conn in flood[::20]:
            with contextlib.suppress(OSError):  # refused and closed already: fine
                conn.send(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        for i in range(3):
            assert (
                publish(1, Context({"w": np.full(2, float(i))}), socket=sock, timeout=20) == i + 1
            )
        with DaemonClient(sock, name="status", role="admin") as client:
            assert client.status().daemon["pid"] == proc.pid
        text = live.log_text()
        assert text.count("out of system resource") <= 5, text[-3000:]
        assert text.count("refused a connection") <= 21, text[-3000:]
    finally:
        for conn in flood:
            conn.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shm = Path("/dev/shm" + segment_name(store))
        if shm.exists():
            shm.unlink()


def test_a_ping_flood_is_held_to_its_read_buffer_while_a_reader_is_served(
    tmp_path: Path,
) -> None:
    """Peers that sent ~200 KiB of pings each: the daemon holds at most ``limits.read_buffer``
    of each one's input (the rest waits in the kernel), by its own count in the status,
    and a reader of the same uid gets its announcement meanwhile."""
    count, read_buffer = 8, 4096
    with limited_daemon(tmp_path, read_buffer=read_buffer) as live:
        reader = RawPeer(live.socket, "reader")
        reader.subscribe(slots=(1,))
        client = Connection(Role.CLIENT)
        client.send(Hello(role="reader", name="flood", pid=os.getpid()))
        client.receive_data(_welcome_bytes())
        client.next_event()
        pings = b"".join(client.send(Ping(nonce=i)) for i in range(20_000))
        flooders = []
        for _ in range(count):
            sock = _greeted(live.socket)
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.send(pings)  # what the kernel takes
            sock.setblocking(True)
            flooders.append(sock)
        for sock in flooders:  # a pong: the daemon has read this flooder's pings
            assert sock.recv(65536)
        with DaemonClient(live.socket, name="counter", role="admin") as admin:
            held = admin.status().daemon["input_bytes"]
        assert held <= count * (read_buffer + 64), f"{held} bytes of {count} floods held"
        version = publish(1, Context({"w": np.zeros(2)}), socket=live.socket)
        announce = reader.next()
        assert isinstance(announce, Announce) and announce.version == version
        for sock in flooders:
            sock.close()
