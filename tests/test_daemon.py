"""The writer daemon as a real process: lifecycle, publishing, announcing, refusing bad peers."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import signal
import socket
import stat
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support.daemon import (
    DaemonProcess,
    assert_the_error_comes_first,
    failed_start,
    running_daemon,
    start_daemon,
    wait_for_socket,
)
from support.inprocess import running
from support.notify import NotifySink
from support.peers import RawPeer
from support.procs import free_port

from ctxstore import Context, CtxStoreError, RemoteError
from ctxstore.client import DaemonClient, build, publish
from ctxstore.daemon.config import DaemonConfig
from ctxstore.daemon.notify import Notifier
from ctxstore.daemon.server import Daemon
from ctxstore.messages import Announce, Error, Hello, Welcome
from ctxstore.protocol import NEED_DATA, Connection, Role
from ctxstore.store import PersistentStore
from ctxstore.versiontable import VersionTable, segment_name


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    with running_daemon(tmp_path, "--silent-timeout", "2", "--stuck-timeout", "2") as proc:
        yield proc


def test_ready_only_when_socket_listens_and_clean_stop(tmp_path: Path) -> None:
    sink = NotifySink()
    try:
        proc = start_daemon(tmp_path, tmp_path / "store", tmp_path / "ctx.sock", sink)
        ready = sink.wait_for("READY", timeout=30)
        assert ready is not None
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(str(tmp_path / "ctx.sock"))  # READY implies accepting
        probe.close()
        mode = stat.S_IMODE(os.stat(tmp_path / "ctx.sock").st_mode)
        assert mode == 0o660
        assert Path("/dev/shm" + segment_name(tmp_path / "store")).exists()
        assert proc.stop() == 0
        sink.wait_for("STOPPING", timeout=10)
        assert not (tmp_path / "ctx.sock").exists()
        assert not Path("/dev/shm" + segment_name(tmp_path / "store")).exists()
    finally:
        sink.close()


def test_publish_build_and_file_then_read_from_store(daemon: DaemonProcess) -> None:
    ctx = Context({"w": np.arange(100.0), "b": np.ones(3, "f4")}, {"lr": 0.1}, {"loss": 2.0})
    assert publish(1, ctx, socket=daemon.socket, model_type="mlp", alias="best") == 1
    assert build(2, "llm", {"seed": 1, "n_layers": 1}, socket=daemon.socket) == 1
    path = daemon.store.parent / "weights.npy"
    np.save(path, np.full(5, 7.0))
    assert publish(3, path, socket=daemon.socket) == 1
    with PersistentStore(daemon.store, readonly=True) as store:
        back = store.load_context(1, "best")
        assert back.equals(ctx)
        assert store.get_metadata(1).model_type == "mlp"
        assert store.get_metadata(2).model_type == "llm"
        assert np.array_equal(store.load_context(3)["weights"], np.full(5, 7.0))
        assert store.verify() == []
    with VersionTable.attach(segment_name(daemon.store)) as table:
        assert (table.get(1), table.get(2), table.get(3)) == (1, 1, 1)


def test_publish_errors_are_clear_and_the_daemon_carries_on(daemon: DaemonProcess) -> None:
    with pytest.raises(RemoteError, match="does not exist"):
        publish(1, daemon.store.parent / "missing.npy", socket=daemon.socket)
    with pytest.raises(RemoteError, match="unknown"):
        build(1, "nope", {}, socket=daemon.socket)
    with pytest.raises(RemoteError, match="top_p"):
        build(1, "llm", {"top_p": 2.0}, socket=daemon.socket)
    bad = daemon.store.parent / "evil.npy"
    bad.write_bytes(b"\x93NUMPY\x01\x00" + b"garbage" * 10)
    with pytest.raises(RemoteError, match=r"evil\.npy"):
        publish(1, bad, socket=daemon.socket)
    assert build(1, "cnn", {"seed": 3}, socket=daemon.socket) == 1


def test_subscribers_get_announcements_in_order(daemon: DaemonProcess) -> None:
    everything, one_slot, other = (
        RawPeer(daemon.socket),
        RawPeer(daemon.socket),
        RawPeer(daemon.socket),
    )
    everything.subscribe(all=True)
    one_slot.subscribe(slots=(2,))
    other.subscribe(slots=(99,))
    for i in range(3):
        publish(2, Context({"w": np.full(4, i)}), socket=daemon.socket)
    publish(5, Context({"w": np.zeros(1)}), socket=daemon.socket)
    seen = [everything.next() for _ in range(4)]
    assert [(a.slot, a.version) for a in seen] == [(2, 1), (2, 2), (2, 3), (5, 1)]  # type: ignore[attr-defined]
    seqs = [a.seq for a in seen]  # type: ignore[attr-defined]
    assert seqs == sorted(seqs)
    got = [one_slot.next() for _ in range(3)]
    assert all(isinstance(a, Announce) and a.slot == 2 for a in got)
    snapshot = RawPeer(daemon.socket).subscribe(slots=(2, 5, 99))
    assert dict(snapshot.versions) == {2: 3, 5: 1}
    other.sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        other.next()


def test_group_subscribers_get_the_slots_of_their_groups(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with PersistentStore(store) as writer:
        for slot in (5, 6, 7):
            writer.save_context(slot, Context({"w": np.zeros(1)}))
        writer.hierarchy.add_to_group(5, "vision")
        writer.hierarchy.add_to_group(7, "vision")
    running = start_daemon(tmp_path, store, tmp_path / "run" / "ctx.sock")
    try:
        wait_for_socket(running.socket, running.proc)
        vision, mixed = RawPeer(running.socket), RawPeer(running.socket)
        assert dict(vision.subscribe(groups=("vision",)).versions) == {5: 1, 7: 1}
        mixed.subscribe(slots=(6,), groups=("vision",))
        for slot in (6, 5, 7):
            publish(slot, Context({"w": np.ones(1)}), socket=running.socket)
        got = [vision.next() for _ in range(2)]
        assert [(a.slot, a.version) for a in got] == [(5, 2), (7, 2)]  # type: ignore[attr-defined]
        got = [mixed.next() for _ in range(3)]
        assert [(a.slot, a.version) for a in got] == [(6, 2), (5, 2), (7, 2)]  # type: ignore[attr-defined]
        vision.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            vision.next()  # slot 6 is in no group of theirs
        assert running.stop() == 0
    finally:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait(10)


def test_malformed_frames_get_an_error_and_others_are_served(daemon: DaemonProcess) -> None:
    good = RawPeer(daemon.socket)
    good.subscribe(all=True)
    for junk in (
        b"\xff\xff\xff\xff",  # absurd length
        b"\x00\x00\x00\x05\xdd\xff\xff\xff\xff",  # array32 of 4 billion elements
        b"\x00\x00\x00\x02\x81\xa0",  # truncated map
        b"\x00\x00\x00\x01\xc1",  # never-used msgpack byte
    ):
        bad = socket.socket(socket.AF_UNIX)
        bad.settimeout(10)
        bad.connect(str(daemon.socket))
        bad.sendall(junk)
        conn = Connection(Role.CLIENT)
        reply = b""
        while chunk := bad.recv(65536):
            reply += chunk
        bad.close()
        assert reply, "no error frame before close"
        assert reply[4:].find(b"error") != -1
        del conn
    publish(1, Context({"w": np.zeros(2)}), socket=daemon.socket)
    announce = good.next()
    assert isinstance(announce, Announce)
    assert announce.version == 1


def test_a_socket_group_the_user_cannot_use_is_refused_with_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a member of the group: refused before the store is opened, naming the group;
    and a chown the kernel refuses anyway is a StorageError naming it, not a bare OSError."""
    from ctxstore import InvalidInputError, StorageError
    from ctxstore.daemon import listener

    sock = tmp_path / "run" / "ctx.sock"
    with monkeypatch.context() as patch:
        patch.setattr(listener.os, "geteuid", lambda: 4321)
        patch.setattr(listener.os, "getegid", lambda: 4321)
        patch.setattr(listener.os, "getgroups", lambda: [4321])
        with pytest.raises(InvalidInputError, match=r"socket group '0': .* not a member"):
            listener.check_socket_path(sock, group="0")
        listener.check_socket_path(sock, group="4321")  # its own group is fine

    def refused(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(listener.os, "chown", refused)
    with pytest.raises(StorageError, match=r"group '0'\): Operation not permitted"):
        listener.bind_socket(sock, group="0")
    assert not sock.exists()


def _taken_port() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


@pytest.mark.parametrize(
    ("setup", "why"),
    [
        ("hook", "cannot start: hook 'ctxstore_no_such_module:hook': cannot import"),
        ("group", "cannot start: socket group 'ctxstore-no-such-group' does not exist"),
        ("not-a-socket", "exists and is not a socket; refusing to replace it"),
        ("socket-directory", "cannot create the socket's directory"),
        ("http", "is already in use (choose another with --http HOST:PORT, or --http off)"),
    ],
)
def test_a_start_refused_before_the_store_says_why_first_and_leaves_no_store(
    tmp_path: Path, setup: str, why: str
) -> None:
    """Checked before the store is opened: no store directory, no segment, one ERROR line."""
    store, sock = tmp_path / "store", tmp_path / "run" / "ctx.sock"
    extra: list[str] = []
    taken: socket.socket | None = None
    if setup == "hook":
        config = tmp_path / "ctxstore.toml"
        config.write_text('[[hooks.pre_commit]]\ntarget = "ctxstore_no_such_module:hook"\n')
        extra = ["--config", str(config)]
    elif setup == "group":
        extra = ["--socket-group", "ctxstore-no-such-group"]
    elif setup == "not-a-socket":
        sock.mkdir(parents=True)
    elif setup == "socket-directory":
        (tmp_path / "a-file").write_text("")
        sock = tmp_path / "a-file" / "ctx.sock"
    else:
        taken = _taken_port()
        extra = ["--http", f"127.0.0.1:{taken.getsockname()[1]}"]
    try:
        lines = failed_start(tmp_path, store, sock, *extra)
    finally:
        if taken is not None:
            taken.close()
    assert_the_error_comes_first(lines, why)
    assert not store.exists()
    assert not Path("/dev/shm" + segment_name(store)).exists()


def test_a_start_refused_by_a_live_daemon_or_its_lock_says_why_first(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """The live daemon's socket is found before the store is opened, and its pid named; a
    second daemon on the same store hears who holds the lock, first."""
    other_store = tmp_path / "store2"
    lines = failed_start(tmp_path, other_store, daemon.socket)
    assert_the_error_comes_first(
        lines, f"another daemon is listening on {daemon.socket} (pid {daemon.proc.pid})"
    )
    assert not other_store.exists()
    lines = failed_start(tmp_path, daemon.store, tmp_path / "other.sock")
    assert_the_error_comes_first(lines, f"locked by pid {daemon.proc.pid}")
    assert RawPeer(daemon.socket).subscribe(all=True) is not None  # the live daemon serves on


def test_a_failed_start_in_process_undoes_what_it_did(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A port taken after the store opened: the store is closed again (its lock released), the
    segment and the socket are gone, the error reaches the caller, and no stop is logged."""
    taken = _taken_port()
    config = DaemonConfig(
        store=tmp_path / "store", socket=tmp_path / "ctx.sock", http="127.0.0.1:0"
    )

    class PortTakenMeanwhile(Daemon):
        def _check_before_store(self) -> None:
            super()._check_before_store()
            self.config = self.config.replace(http=f"127.0.0.1:{taken.getsockname()[1]}")

    async def main() -> None:
        with pytest.raises(CtxStoreError, match="already in use"):
            await PortTakenMeanwhile(config, notifier=Notifier(environ={})).start()

    try:
        with caplog.at_level(logging.INFO, logger="ctxstore.daemon"):
            asyncio.run(main())
    finally:
        taken.close()
    assert not [r for r in caplog.records if "stopped" in r.getMessage()], caplog.text
    assert not (tmp_path / "ctx.sock").exists()
    assert not Path("/dev/shm" + segment_name(tmp_path / "store")).exists()
    with PersistentStore(tmp_path / "store") as store:  # the writer lock was released
        assert store.current_versions() == {}


def test_an_orderly_stop_spares_the_interpreter_exit_its_garbage_collection(
    tmp_path: Path,
) -> None:
    """Once the daemon has stopped, the interpreter's teardown need not run the collector over
    every object still alive (most of an idle daemon's stop, with the HTTP stack loaded): the
    objects are frozen before it starts. Seen from an exit hook, which runs just before it."""
    sock = tmp_path / "ctx.sock"
    script = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count(), flush=True))\n"
        "from ctxstore.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    daemon = start_daemon(tmp_path, tmp_path / "store", sock, None, "--http", "127.0.0.1:0",
                          launcher=("-c", script))  # fmt: skip
    try:
        wait_for_socket(sock, daemon.proc)
        code = daemon.stop(timeout=30)
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)
    output = daemon.log_text()
    assert code == 0, output[-2000:]
    assert "ctxstore daemon stopped: daemon shutting down" in output
    frozen = [line for line in output.splitlines() if line.startswith("frozen at exit:")]
    assert frozen and int(frozen[0].split(":")[1]) > 1000, output[-2000:]


def test_stale_socket_and_segment_are_reclaimed_after_sigkill(tmp_path: Path) -> None:
    store, sock = tmp_path / "store", tmp_path / "ctx.sock"
    first = start_daemon(tmp_path, store, sock)
    wait_for_socket(sock, first.proc)
    publish(1, Context({"w": np.ones(3)}), socket=sock)
    first.stop(signal.SIGKILL)
    assert sock.exists()
    assert Path("/dev/shm" + segment_name(store)).exists()
    second = start_daemon(tmp_path, store, sock)
    try:
        wait_for_socket(sock, second.proc)
        assert publish(1, Context({"w": np.zeros(3)}), socket=sock) == 2
        with VersionTable.attach(segment_name(store)) as table:
            assert table.get(1) == 2
            assert table.daemon_pid == second.proc.pid
        assert "replacing stale socket" in second.log_text()
    finally:
        assert second.stop() == 0
    assert not Path("/dev/shm" + segment_name(store)).exists()


def test_a_stopped_reader_does_not_slow_commits_and_is_dropped(daemon: DaemonProcess) -> None:
    """A peer that stops reading is disconnected; others keep getting every version."""
    stuck = RawPeer(daemon.socket, "stuck")
    stuck.subscribe(all=True)
    healthy = RawPeer(daemon.socket, "healthy")
    healthy.subscribe(all=True)
    for i in range(20):
        publish(1, Context({"w": np.full(8, i)}), socket=daemon.socket)
        assert healthy.next().version == i + 1  # type: ignore[attr-defined]
    deadline = time.monotonic() + 20
    while "stuck (pid" not in daemon.log_text() or "silent for" not in daemon.log_text():
        assert time.monotonic() < deadline, daemon.log_text()[-2000:]
        time.sleep(0.1)
    leftover = b""
    stuck.sock.settimeout(5)
    while chunk := stuck.sock.recv(65536):
        leftover += chunk
    assert leftover  # the queued announcements, then EOF: the daemon closed it


def test_refused_peer_gets_forbidden(tmp_path: Path) -> None:
    store, sock = tmp_path / "store", tmp_path / "ctx.sock"
    proc = start_daemon(tmp_path, store, sock, None, "--allow-uid", "4242")
    try:
        wait_for_socket(sock, proc.proc)
        if os.getuid() != 0:
            peer = socket.socket(socket.AF_UNIX)
            peer.connect(str(sock))
            assert peer.recv(65536)
        # the daemon's own uid is always allowed
        assert publish(1, Context({"w": np.zeros(1)}), socket=sock) == 1
    finally:
        assert proc.stop() == 0
    assert isinstance(Error(kind="forbidden", message="x"), Error)


def test_coalesced_announcements_keep_seq_order() -> None:
    """A replaced announcement moves to the back, so a batch never goes out of seq order."""
    import asyncio

    from ctxstore.daemon.listener import PeerCredentials
    from ctxstore.daemon.subscriber import Subscriber

    class Transport:
        def __init__(self) -> None:
            self.buffered = 1  # pretend the socket is busy: everything is queued

        def get_write_buffer_size(self) -> int:
            return self.buffered

        def is_closing(self) -> bool:
            return False

    class Writer:
        def __init__(self) -> None:
            self.transport = Transport()
            self.frames: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.frames.append(data)

        async def drain(self) -> None:
            return None

        def close(self) -> None:
            return None

    async def scenario() -> list[tuple[int, int]]:
        writer = Writer()
        sub = Subscriber(1, asyncio.StreamReader(), writer, PeerCredentials(1, 0, 0, frozenset()),  # type: ignore[arg-type]
                         max_frame_size=1 << 20, stuck_timeout=5, silent_timeout=5)  # fmt: skip
        sub._conn.receive_data(Connection(Role.CLIENT).send(Hello(role="reader", name="t", pid=1)))
        sub._conn.next_event()
        sub._write(Welcome(session=1, daemon_pid=1, versions={}))
        for seq, (slot, version) in enumerate([(1, 1), (2, 1), (1, 2)], start=1):
            sub.offer(Announce(slot=slot, version=version, seq=seq, committed_at=0.0))
        flusher = asyncio.ensure_future(sub.flush_loop())
        await asyncio.sleep(0.05)
        sub.close("done")
        await flusher
        client = Connection(Role.CLIENT)
        client.send(Hello(role="reader", name="t", pid=1))
        client.receive_data(b"".join(writer.frames))
        events = []
        while (event := client.next_event()) is not NEED_DATA:
            events.append(event)
        return [(e.slot, e.version) for e in events if isinstance(e, Announce)]

    assert asyncio.run(scenario()) == [(2, 1), (1, 2)]


def test_systemd_directories_are_used_and_sighup_keeps_peers(tmp_path: Path) -> None:
    """With $STATE_DIRECTORY and $RUNTIME_DIRECTORY set (and no flags), nothing else is used."""
    state, runtime = tmp_path / "state", tmp_path / "runtime"
    # everywhere else a daemon might put things; each must stay empty
    elsewhere = {name: tmp_path / name for name in ("cwd", "tmp", "xdg-state", "xdg-runtime")}
    for path in (state, runtime, *elsewhere.values()):
        path.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTXSTORE_", "XDG_"))}
    env |= {
        "STATE_DIRECTORY": str(state),
        "RUNTIME_DIRECTORY": str(runtime),
        "HOME": str(tmp_path / "home"),
        "TMPDIR": str(elsewhere["tmp"]),
        "XDG_STATE_HOME": str(elsewhere["xdg-state"]),
        "XDG_RUNTIME_DIR": str(elsewhere["xdg-runtime"]),
    }
    sink = NotifySink()
    proc = start_daemon(tmp_path, state, runtime / "ctxstore.sock", sink, env=env,
                        cwd=elsewhere["cwd"], locate=False).proc  # fmt: skip
    try:
        sink.wait_for("READY", timeout=30)
        sock = runtime / "ctxstore.sock"
        peer = RawPeer(sock)
        peer.subscribe(all=True)
        assert publish(1, Context({"w": np.zeros(2)}), socket=sock) == 1
        assert (state / "index.db").exists()
        assert (state / "slots" / "1" / "1" / "0.npy").exists()
        assert not (tmp_path / "home").exists()
        proc.send_signal(signal.SIGHUP)
        sink.wait_for("RELOADING", timeout=10)
        sink.wait_for("READY", timeout=10)
        assert publish(1, Context({"w": np.ones(2)}), socket=sock) == 2
        announce = peer.next()
        assert isinstance(announce, Announce)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        sink.close()
    assert not (runtime / "ctxstore.sock").exists()
    assert not (tmp_path / "home").exists()
    assert {name: os.listdir(path) for name, path in elsewhere.items()} == {
        name: [] for name in elsewhere
    }


def test_daemon_pings_the_watchdog_when_systemd_asks(tmp_path: Path) -> None:
    """WATCHDOG_USEC set: the daemon keeps pinging. Its cadence (half the period) is proven
    without a clock in test_notify.py; here only that pings keep coming from the real one."""
    sink = NotifySink()
    proc = start_daemon(tmp_path, tmp_path / "store", tmp_path / "ctx.sock", sink,
                        env=dict(os.environ, WATCHDOG_USEC="1000000")).proc  # fmt: skip
    try:
        sink.wait_for("READY", timeout=30)
        for _ in range(6):
            sink.wait_for("WATCHDOG", timeout=10)  # fails the test when none comes
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        sink.close()


def test_ready_is_sent_only_once_the_socket_accepts(tmp_path: Path) -> None:
    """The notifier itself connects when READY goes out: the socket must already accept."""
    sock = tmp_path / "ctx.sock"
    seen: list[str] = []

    class ProbingNotifier(Notifier):
        def ready(self, status: str | None = None) -> bool:
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(sock))
                seen.append("accepting")
            except OSError as exc:
                seen.append(f"refused: {exc}")
            finally:
                probe.close()
            return super().ready(status)

    async def main() -> None:
        async with running(tmp_path, http="off", notifier=ProbingNotifier(environ={})):
            assert seen == ["accepting"]

    asyncio.run(main())


def test_status_lines_follow_the_daemon(tmp_path: Path) -> None:
    """STATUS= says what start-up is doing, then peers, commits and the last commit."""
    sink = NotifySink()
    try:
        proc = start_daemon(tmp_path, tmp_path / "store", tmp_path / "ctx.sock", sink)
        sink.wait_for("READY", timeout=30)
        assert publish(3, Context({"w": np.zeros(2)}), socket=tmp_path / "ctx.sock") == 1
        line = sink.wait_until(lambda m: "last: slot 3 version 1" in m.fields.get("STATUS", ""))
        assert "1 commits since start" in line.fields["STATUS"]
        assert proc.stop() == 0
    finally:
        sink.close()
    statuses = [m.fields["STATUS"] for m in sink.received if "STATUS" in m.fields]
    assert statuses[0].startswith("opening store"), statuses
    extended = [m for m in sink.received if "EXTEND_TIMEOUT_USEC" in m.fields]
    assert extended and int(extended[0].fields["EXTEND_TIMEOUT_USEC"]) > 0


def test_status_and_metrics_work_with_only_our_own_proc_entries(tmp_path: Path) -> None:
    """Under ProcSubset=pid (the unit's setting) /proc/stat and friends are hidden."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("needs root and unshare(1) to mount a pid-only /proc, as CI has")
    sock, port = tmp_path / "ctx.sock", free_port()
    script = (
        "mount --make-rprivate / && mount -t proc -o subset=pid proc /proc && "
        'test ! -e /proc/stat && exec "$@"'
    )
    log = tmp_path / "daemon.log"
    unshared = ("unshare", "--mount", "sh", "-c", script, "sh")
    proc = start_daemon(tmp_path, tmp_path / "store", sock, None, "--http", f"127.0.0.1:{port}",
                        log=log, wrapper=unshared).proc  # fmt: skip
    try:
        wait_for_socket(sock, proc)
        assert publish(1, Context({"w": np.zeros(2)}), socket=sock) == 1
        with DaemonClient(sock, timeout=10) as client:
            status = client.status()
        assert status.daemon["uptime_s"] >= 0 and status.daemon["commits"] == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert "ctxstore_daemon_cpu_seconds_total" in metrics
        assert "ctxstore_commits_total 1.0" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
        table = "/dev/shm" + segment_name(tmp_path / "store")
        if os.path.exists(table):
            os.unlink(table)
    assert code == 0, log.read_text(errors="replace")[-3000:]
    assert "Traceback" not in log.read_text(errors="replace")


@pytest.mark.parametrize("reply", [b"", b"\x00\x00\x00\x05junk!"])
def test_client_against_a_peer_that_hangs_up_says_so_and_leaks_nothing(
    tmp_path: Path, reply: bytes
) -> None:
    """A daemon that dies during the handshake: a clear error, and the socket is closed."""
    path = tmp_path / "dying.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def hang_up() -> None:
        peer, _ = server.accept()
        with peer:
            peer.recv(1 << 16)
            if reply:
                peer.sendall(reply)

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    try:
        with pytest.raises(CtxStoreError) as caught:
            DaemonClient(path, timeout=5)
        assert "daemon" in str(caught.value) or "frame" in str(caught.value)
        thread.join(5)
        gc.collect()  # an unclosed socket would raise ResourceWarning here (warnings are errors)
    finally:
        server.close()


def test_publishes_in_a_row_share_one_connection_and_replace_a_closed_one(
    daemon: DaemonProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 21: a publisher keeps its connection a moment for its next publish (no connect,
    hello and goodbye per version); one that was closed meanwhile is replaced."""
    import ctxstore.client as client_module

    opened: list[DaemonClient] = []
    real_init = client_module.DaemonClient.__init__

    def counting_init(self: DaemonClient, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        opened.append(self)

    monkeypatch.setattr(client_module.DaemonClient, "__init__", counting_init)
    monkeypatch.setattr(client_module._kept, "idle_s", 600.0)
    weights = Context({"w": np.arange(4.0)})
    try:
        assert [publish(1, weights, socket=daemon.socket) for _ in range(3)] == [1, 2, 3]
        assert len(opened) == 1
        opened[0]._sock.shutdown(socket.SHUT_RDWR)  # as if the daemon had hung up
        assert publish(1, weights, socket=daemon.socket) == 4
        assert len(opened) == 2
    finally:
        client_module._kept.close_all()
