"""The publish path against hostile and unlucky publishers: a real daemon, real client processes.

A publisher's segment is its own: truncating it or writing into it during the
publish must neither kill the daemon nor change what is committed; a
publisher killed mid-publish leaves no segment behind for good; a commit
longer than the silence timeout is answered, and a retried publish commits once.
The windows are held open deterministically: a pre-commit hook that pauses
while a marker file exists, or the daemon's ``publish_read`` pause point.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import posix_ipc
import pytest
from support.contexts import digest
from support.daemon import DaemonProcess, running_daemon, start_daemon, wait_for_socket
from support.hooks import BOUND, Pauser, hooked_daemon, pause_hook_config, seen_by_hook
from support.procs import dies_with_pytest

from ctxstore import Context, RemoteError
from ctxstore.cli import main
from ctxstore.client import (
    DaemonClient,
    new_publish_key,
    publish,
    publish_segment_name,
)
from ctxstore.daemon.idempotency import PublishKeys
from ctxstore.daemon.segments import open_segment, read_tensors, reclaim_orphans
from ctxstore.errors import ConflictError, IntegrityError, InvalidInputError, NotFoundError
from ctxstore.messages import Progress, Published, PublishShm, TensorSpec
from ctxstore.progress import ProgressLine
from ctxstore.store import PersistentStore
from ctxstore.versiontable import segment_name


class Segment:
    """A publish segment made the way the client makes one, kept open by the test."""

    def __init__(self, arrays: dict[str, np.ndarray[Any, Any]]) -> None:
        self.name = publish_segment_name(os.getpid())
        self.specs = []
        offset = 0
        for name, array in arrays.items():
            self.specs.append(TensorSpec(name, array.dtype.str, array.shape, offset, array.nbytes))
            offset += -(-array.nbytes // 64) * 64
        self.shm = posix_ipc.SharedMemory(self.name, posix_ipc.O_CREX, mode=0o600, size=offset)
        for spec, array in zip(self.specs, arrays.values(), strict=True):
            os.pwrite(self.shm.fd, np.ascontiguousarray(array).tobytes(), spec.offset)

    def request(self, slot: int, key: str | None = None) -> PublishShm:
        return PublishShm(request_id=1, slot=slot, shm_name=self.name, manifest=tuple(self.specs),
                          key=key, progress=True)  # fmt: skip

    def close(self) -> None:
        self.shm.close_fd()
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(self.name)


@pytest.fixture
def segments() -> Iterator[Callable[[dict[str, np.ndarray[Any, Any]]], Segment]]:
    made: list[Segment] = []

    def make(arrays: dict[str, np.ndarray[Any, Any]]) -> Segment:
        made.append(Segment(arrays))
        return made[-1]

    yield make
    for segment in made:
        segment.close()


class Answer(threading.Thread):
    """Sends one request on its own connection and keeps the answer (or the error)."""

    def __init__(self, sock: Path, request: PublishShm) -> None:
        super().__init__(daemon=True)
        self.sock, self.request = sock, request
        self.reply: object = None
        self.progress: list[Progress] = []

    def run(self) -> None:
        try:
            with DaemonClient(self.sock, timeout=BOUND) as client:
                self.reply = client.request(self.request, 1, self.progress.append)
        except Exception as exc:
            self.reply = exc

    def result(self) -> object:
        self.join(BOUND)
        assert not self.is_alive(), "no answer"
        return self.reply


ARRAYS = {
    "w": np.arange(256 * 1024, dtype="<f4").reshape(512, 512),
    "b": np.linspace(-1, 1, 4096).astype("<f8"),
}


def check_committed_as_read(daemon: DaemonProcess, tmp_path: Path, slot: int, version: int) -> None:
    """The version holds the bytes the hook vetted, the original ones; checksums pass."""
    with PersistentStore(daemon.store, readonly=True) as store:
        ctx = store.load_context(slot, version, verify=True)  # re-hashes every file
        assert {name: digest(array) for name, array in ctx.weights.items()} == {
            name: digest(array) for name, array in ARRAYS.items()
        }
        assert store.verify(slot) == []
    assert seen_by_hook(tmp_path, slot) == {name: digest(a) for name, a in ARRAYS.items()}


@pytest.mark.parametrize("attack", ["truncate", "overwrite"])
def test_a_segment_changed_by_its_owner_during_the_commit_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, segments: Any, attack: str
) -> None:
    """Truncated: the daemon used to die of SIGBUS. Overwritten: the version used to hold
    bytes other than those the hooks vetted. Now the commit is of the daemon's own copy."""
    with hooked_daemon(tmp_path, monkeypatch) as (daemon, pauser):
        segment = segments(ARRAYS)
        pauser.arm()
        answer = Answer(daemon.socket, segment.request(slot=3))
        answer.start()
        pauser.wait_paused(lambda: daemon.proc.poll() is None)
        if attack == "truncate":
            os.ftruncate(segment.shm.fd, 0)
        else:
            os.pwrite(segment.shm.fd, b"\xff" * (ARRAYS["w"].nbytes + 64), 0)
        pauser.release()
        reply = answer.result()
        assert daemon.proc.poll() is None, f"daemon died: exit {daemon.proc.returncode}"
        assert isinstance(reply, Published), reply
        check_committed_as_read(daemon, tmp_path, 3, reply.version)
        assert publish(3, Context(ARRAYS), socket=daemon.socket) == reply.version + 1


def test_a_segment_truncated_while_the_daemon_reads_it_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, segments: Any
) -> None:
    marker = tmp_path / "read-paused"
    monkeypatch.setenv("CTXSTORE_PAUSE_AT", "publish_read")
    monkeypatch.setenv("CTXSTORE_PAUSE_FILE", str(marker))
    with running_daemon(tmp_path) as daemon:
        pauser = Pauser(marker, None)
        segment = segments(ARRAYS)
        answer = Answer(daemon.socket, segment.request(slot=4))
        answer.start()
        pauser.wait_paused(lambda: daemon.proc.poll() is None)  # "w" copied, "b" not yet
        os.ftruncate(segment.shm.fd, 4096)
        pauser.release()
        reply = answer.result()
        assert isinstance(reply, RemoteError), reply
        assert reply.kind == "invalid_input"
        assert "truncated it during the publish; nothing was committed" in str(reply)
        assert daemon.proc.poll() is None
        with PersistentStore(daemon.store, readonly=True) as store:
            assert store.current_version(4) is None
        # the daemon carries on: the same publisher's next publish commits (and pauses once)
        again = Answer(daemon.socket, segments(ARRAYS).request(slot=4))
        again.start()
        pauser.wait_paused(lambda: daemon.proc.poll() is None)
        pauser.release()
        assert isinstance(again.result(), Published)


KILLED_PUBLISHER = """
import sys
import numpy as np
from ctxstore import Context
from ctxstore.client import publish
publish(5, Context({"w": np.ones(1 << 20, "f4")}), socket=sys.argv[1])
"""


def test_a_publisher_killed_mid_publish_has_its_segment_reclaimed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = "shm_reclaim_interval = 0.2"
    with hooked_daemon(tmp_path, monkeypatch, settings=settings) as (daemon, pauser):
        pauser.arm()
        child = subprocess.Popen(
            dies_with_pytest([sys.executable, "-c", KILLED_PUBLISHER, str(daemon.socket)])
        )
        try:
            pauser.wait_paused(lambda: daemon.proc.poll() is None)
            mine = list(Path("/dev/shm").glob(f"ctxstore-pub-{child.pid}-*"))
            assert len(mine) == 1
            child.send_signal(signal.SIGKILL)
            child.wait(BOUND)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(BOUND)
        # a live process's segment and a name of another form are never touched
        live = posix_ipc.SharedMemory(publish_segment_name(os.getpid()), posix_ipc.O_CREX, size=64)
        other = posix_ipc.SharedMemory(f"/ctxstore-pub-{child.pid}", posix_ipc.O_CREX, size=64)
        try:
            pauser.release()  # the commit goes on without its publisher, then the sweep
            deadline = time.monotonic() + BOUND
            while mine[0].exists():
                assert time.monotonic() < deadline, "the dead publisher's segment stayed"
                time.sleep(0.05)
            said = "reclaimed 1 shared-memory segment(s) of publishers that died"
            while said not in daemon.log_text():  # logged just after the unlink
                assert time.monotonic() < deadline, daemon.log_text()[-2000:]
                time.sleep(0.05)
            assert Path("/dev/shm" + live.name).exists()
            assert Path("/dev/shm" + other.name).exists()
        finally:
            for segment in (live, other):
                segment.close_fd()
                segment.unlink()


def test_a_commit_longer_than_the_silence_timeout_is_answered_with_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = "publish_progress_interval = 0.1"
    extra = ("--silent-timeout", "0.3")
    with hooked_daemon(tmp_path, monkeypatch, *extra, settings=settings) as (daemon, pauser):
        pauser.arm()
        updates: list[Progress] = []
        result: list[object] = []

        def run() -> None:
            try:
                result.append(publish(6, Context(ARRAYS), socket=daemon.socket,
                                      progress=updates.append))  # fmt: skip
            except Exception as exc:
                result.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        pauser.wait_paused(lambda: daemon.proc.poll() is None)
        deadline = time.monotonic() + BOUND
        while not any(update.elapsed > 1.0 for update in updates):  # > 3 silence timeouts
            assert time.monotonic() < deadline and thread.is_alive(), result
            time.sleep(0.02)
        pauser.release()
        thread.join(BOUND)
        assert result == [1]
        stages = {update.stage for update in updates}
        assert "committing" in stages and stages <= {"waiting", "reading", "committing"}
        assert "silent for" not in daemon.log_text()
        with PersistentStore(daemon.store, readonly=True) as store:
            assert [info.version for info in store.list_versions(6)] == [1]


def test_a_retried_publish_commits_once_even_across_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = new_publish_key()
    ctx = Context(ARRAYS)
    with hooked_daemon(tmp_path, monkeypatch) as (daemon, pauser):
        pauser.arm()
        versions: list[object] = []

        def attempt() -> None:
            try:
                versions.append(publish(7, ctx, socket=daemon.socket, key=key))
            except Exception as exc:
                versions.append(exc)

        first = threading.Thread(target=attempt, daemon=True)
        first.start()
        pauser.wait_paused(lambda: daemon.proc.poll() is None)
        retry = threading.Thread(target=attempt, daemon=True)  # while the first commits
        retry.start()
        deadline = time.monotonic() + BOUND
        while f"key {key} waits for its first try" not in daemon.log_text():
            assert time.monotonic() < deadline, "the retry never arrived"
            time.sleep(0.02)
        pauser.release()
        first.join(BOUND)
        retry.join(BOUND)
        assert versions == [1, 1]
        assert publish(7, ctx, socket=daemon.socket, key=key) == 1  # remembered
        with pytest.raises(RemoteError, match="already committed version 1 of slot 7"):
            publish(8, ctx, socket=daemon.socket, key=key)
        assert publish(7, ctx, socket=daemon.socket) == 2  # another key: another version
        assert daemon.stop() == 0
    with running_daemon(tmp_path) as restarted:  # on the same store
        assert restarted.store == daemon.store
        assert publish(7, ctx, socket=restarted.socket, key=key) == 1  # from the index
        with PersistentStore(restarted.store, readonly=True) as store:
            assert [info.version for info in store.list_versions(7)] == [1, 2]


# -- the parts, without a daemon ----------------------------------------------------------------


def test_segment_reads_are_bounded_and_a_short_segment_is_refused(segments: Any) -> None:
    segment = segments(ARRAYS)
    with open_segment(segment.name) as opened:
        copies = read_tensors(opened, segment.specs, max_bytes=1 << 30)
        assert {name: digest(a) for name, a in copies.items()} == {
            name: digest(a) for name, a in ARRAYS.items()
        }
        assert not any(array.flags.writeable for array in copies.values())
        assert Context(copies).weights["w"] is copies["w"]  # taken as is: no second copy
        with pytest.raises(InvalidInputError, match=r"exceeds the daemon's max_publish_bytes"):
            read_tensors(opened, segment.specs, max_bytes=1024)
        os.ftruncate(segment.shm.fd, 4096)  # after the open: the size it began with is stale
        with pytest.raises(InvalidInputError, match="ended at byte 4096 while tensor 'w'"):
            read_tensors(opened, segment.specs, max_bytes=1 << 30)


def test_a_fifo_or_symlink_under_a_segment_name_is_refused_at_once(tmp_path: Path) -> None:
    fifo, link = publish_segment_name(os.getpid()), publish_segment_name(os.getpid())
    os.mkfifo(tmp_path / fifo[1:])  # opening it for reading would wait for a writer
    (tmp_path / link[1:]).symlink_to(tmp_path / fifo[1:])
    with pytest.raises(InvalidInputError, match="is not a regular file"):
        open_segment(fifo, str(tmp_path)).__enter__()
    with pytest.raises(InvalidInputError, match="cannot be opened: Too many levels"):
        open_segment(link, str(tmp_path)).__enter__()
    with pytest.raises(NotFoundError, match="does not exist"):
        open_segment(publish_segment_name(os.getpid()), str(tmp_path)).__enter__()


def test_the_sweep_takes_only_old_segments_of_dead_pids_not_busy_ones() -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    names = [publish_segment_name(pid) for _ in range(3)]
    made = [posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=64) for name in names]
    try:
        past = time.time() - 120
        for name in names[:2]:
            os.utime("/dev/shm" + name, (past, past))
        # names[0]: old, dead pid -> reclaimed; names[1]: busy; names[2]: written just now
        assert reclaim_orphans({names[1]}, min_age=60) == 1
        assert [Path("/dev/shm" + name).exists() for name in names] == [False, True, True]
        assert reclaim_orphans((), min_age=60, alive=lambda _: True) == 0
    finally:
        for segment in made:
            segment.close_fd()
            with contextlib.suppress(posix_ipc.ExistentialError):
                segment.unlink()


def test_publish_keys_wait_for_a_try_in_flight_retry_a_failed_one_and_stay_bounded() -> None:
    async def scenario() -> None:
        keys = PublishKeys(capacity=2)
        commits: list[str] = []
        gate = asyncio.Event()

        async def nothing_recorded() -> tuple[int, int] | None:
            return None

        async def commit(name: str, fail: bool = False) -> int:
            await gate.wait()
            if fail:
                raise RuntimeError("disk on fire")
            commits.append(name)
            return len(commits)

        first = asyncio.ensure_future(
            keys.run("k1", 1, nothing_recorded, lambda: commit("a", True))
        )
        waits: list[str] = []
        retry = asyncio.ensure_future(
            keys.run("k1", 1, nothing_recorded, lambda: commit("b"), lambda: waits.append("k1"))
        )
        await asyncio.sleep(0)
        gate.set()
        with pytest.raises(RuntimeError):
            await first
        assert await retry == 1 and commits == ["b"] and waits == ["k1"]  # it tried again
        assert await keys.run("k1", 1, nothing_recorded, lambda: commit("c")) == 1
        with pytest.raises(ConflictError, match="already committed version 1 of slot 1"):
            await keys.run("k1", 2, nothing_recorded, lambda: commit("d"))
        await keys.run("k2", 1, nothing_recorded, lambda: commit("k2"))
        await keys.run("k3", 1, nothing_recorded, lambda: commit("k3"))
        assert len(keys) == 2  # k1 forgotten in memory: the index (lookup) answers for it

        async def recorded() -> tuple[int, int] | None:
            return (1, 1)

        assert await keys.run("k1", 1, recorded, lambda: commit("e")) == 1
        assert commits == ["b", "k2", "k3"]

    asyncio.run(scenario())


def test_the_progress_line_redraws_on_a_terminal_and_stays_quiet_elsewhere() -> None:
    def update(elapsed: float, done: int = 0) -> Progress:
        return Progress(request_id=1, stage="reading", done=done, total=3 << 30, elapsed=elapsed)

    tty = io.StringIO()
    line = ProgressLine(tty, "slot 3", tty=True)
    line(update(0.5, 1 << 30))
    line(update(2.0, 2 << 30))
    line.finish()
    assert tty.getvalue() == (
        "\rslot 3: reading 1.0 GiB of 3.0 GiB (33%), 0 s"
        "\rslot 3: reading 2.0 GiB of 3.0 GiB (66%), 2 s\n"
    )
    log = io.StringIO()
    line = ProgressLine(log, "slot 3", tty=False, quiet_for=3.0, every=10.0)
    for elapsed in (1.0, 2.0, 4.0, 6.0, 14.0, 16.0):
        line(update(elapsed))
    line.finish()
    assert [text.rsplit(", ", 1)[1] for text in log.getvalue().splitlines()] == ["4 s", "14 s"]


def cli_publish(daemon: DaemonProcess, weights: Path, key: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "ctxstore.cli", "publish", "9", str(weights),
            "--socket", str(daemon.socket), "--key", key]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=BOUND, check=False)


def test_ctxstore_publish_takes_a_key_and_a_retry_commits_once(tmp_path: Path) -> None:
    weights = tmp_path / "w.npy"
    np.save(weights, np.arange(10, dtype="f4"))
    with running_daemon(tmp_path) as daemon:
        runs = [cli_publish(daemon, weights, "retry-me-123") for _ in range(2)]
        assert [run.stdout for run in runs] == ["slot 9: published version 1\n"] * 2
        assert all(run.returncode == 0 and run.stderr == "" for run in runs)


def test_ctxstore_publish_refuses_a_bad_key_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["publish", "9", str(tmp_path / "w.npy"), "--socket", str(tmp_path / "none.sock")]
    assert main([*argv, "--key", "no"]) == 1
    assert "publish key 'no' is not a publish key" in capsys.readouterr().err


def test_a_store_from_before_publish_keys_gains_them(tmp_path: Path) -> None:
    with PersistentStore(tmp_path / "s") as store:
        store.save_context(1, Context(ARRAYS))
    conn = sqlite3.connect(tmp_path / "s" / "index.db")
    conn.executescript(
        "DROP INDEX versions_by_publish_key; ALTER TABLE versions DROP COLUMN publish_key; "
        "DROP TABLE version_checks; DROP TABLE version_files; PRAGMA user_version = 2;"
    )
    conn.close()
    with pytest.raises(IntegrityError, match="schema version 2"):
        PersistentStore(tmp_path / "s", readonly=True)
    with PersistentStore(tmp_path / "s") as store:  # the writer migrates
        assert store.publish_key_version("some-key-1") is None
        version = store.save_context(1, Context(ARRAYS), publish_key="some-key-1")
        assert store.publish_key_version("some-key-1") == (1, version) == (1, 2)
        with pytest.raises(IntegrityError, match="UNIQUE"):  # one version per key
            store.save_context(2, Context(ARRAYS), publish_key="some-key-1")
        assert store.current_version(2) is None


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run the publisher as another uid")
def test_an_unprivileged_publisher_truncating_its_segment_cannot_kill_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same attack as above from uid 4242, on the daemon's allowlist (it died of SIGBUS)."""

    uid = 4242
    run = Path(tempfile.mkdtemp(prefix="ctxstore-pubtest-"))  # reachable by the dropped uid
    run.chmod(0o755)
    config, pauser = pause_hook_config(tmp_path, monkeypatch)
    daemon = start_daemon(tmp_path, tmp_path / "store", run / "ctx.sock", None,
                          "--config", str(config), "--allow-uid", str(uid))  # fmt: skip
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    pid = -1
    try:
        wait_for_socket(daemon.socket, daemon.proc)
        pauser.arm()
        pid = os.fork()
        if pid == 0:  # the hostile publisher: imports nothing new after dropping privileges
            outcome = b"?"
            try:
                os.setgroups([])
                os.setgid(0)
                os.setuid(uid)
                segment = Segment(ARRAYS)
                with DaemonClient(daemon.socket, timeout=BOUND) as client:
                    client._send(segment.request(slot=11))
                    os.read(to_child, 1)  # the daemon is inside the commit
                    os.ftruncate(segment.shm.fd, 0)
                    os.write(from_child, b"t")
                    reply = client._receive()
                    while isinstance(reply, Progress):
                        reply = client._receive()
                    outcome = repr(reply).encode()
                segment.close()
            except BaseException as exc:
                outcome = repr(exc).encode()
            finally:
                os.write(from_child, outcome)
                os._exit(0)
        pauser.wait_paused(lambda: daemon.proc.poll() is None)
        os.write(from_parent, b"g")
        assert os.read(to_parent, 1) == b"t"
        pauser.release()
        outcome = os.read(to_parent, 4096).decode()
        assert daemon.proc.poll() is None, f"daemon died: exit {daemon.proc.returncode}"
        assert outcome.startswith("Published(request_id=1, slot=11, version=1)"), outcome
        with PersistentStore(daemon.store, readonly=True) as store:
            assert store.verify(11) == []
    finally:
        if pid > 0:
            os.waitpid(pid, 0)
        for fd in (to_child, from_parent, to_parent, from_child):
            os.close(fd)
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(BOUND)
        shutil.rmtree(run, ignore_errors=True)

        Path("/dev/shm" + segment_name(daemon.store)).unlink(missing_ok=True)
