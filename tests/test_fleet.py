"""One daemon, many Reader processes: the one-to-many pattern end to end.

Every reader is a real process using ctxstore.readers.Reader against a real
daemon. Readers check every context they get: all tensors carry the version's
stamp (no torn context) and versions never go backwards while publishing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from support.daemon import DaemonProcess, start_daemon, stop_and_clean, wait_for_socket
from support.peers import RawPeer
from support.procs import dies_with_pytest

from ctxstore import Context
from ctxstore.client import DaemonClient, publish
from ctxstore.store import PersistentStore

SLOT = 7
N_TENSORS = 4

READER = textwrap.dedent(
    """
    import json, sys, time
    from ctxstore.readers import Reader
    store, sock, name, slot, final, deadline_s = sys.argv[1:7]
    slot, final = int(slot), int(final)
    deadline = time.monotonic() + float(deadline_s)
    seen, errors, last, torn, backwards = set(), [], 0, 0, 0
    with Reader(store=store, socket=sock, name=name) as reader:
        while not reader.connected and time.monotonic() < deadline:
            time.sleep(0.005)  # ready means connected: tests may stop us right after
        print("ready", flush=True)
        while time.monotonic() < deadline:
            try:
                ctx = reader.get(slot)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.01)
                continue
            stamps = {float(a[0]) for a in ctx.weights.values()}
            if stamps != {float(ctx.version)}:
                torn += 1
            if ctx.version < last:
                backwards += 1
            last = max(last, ctx.version)
            seen.add(ctx.version)
            if last >= final:
                break
            time.sleep(0.0005)
    print(json.dumps({"name": name, "last": last, "seen": len(seen), "torn": torn,
                      "backwards": backwards, "errors": errors[:5], "n_errors": len(errors)}))
    """
)


def stamped(version: int, size: int = 256) -> Context:
    return Context({f"t{i}": np.full(size, float(version), "f4") for i in range(N_TENSORS)})


def start_readers(
    daemon: DaemonProcess, n: int, final: int, deadline: float = 90.0
) -> list[subprocess.Popen[str]]:
    procs = [
        subprocess.Popen(
            dies_with_pytest(
                [
                    sys.executable,
                    "-c",
                    READER,
                    str(daemon.store),
                    str(daemon.socket),
                    f"reader-{i}",
                    str(SLOT),
                    str(final),
                    str(deadline),
                ]
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
    return procs


def collect(procs: list[subprocess.Popen[str]], timeout: float = 120) -> list[dict[str, object]]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.fixture
def fleet_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    proc = start_daemon(tmp_path, tmp_path / "store", tmp_path / "ctx.sock")
    try:
        wait_for_socket(proc.socket, proc.proc)
        yield proc
    finally:
        stop_and_clean(proc, kill=True)


def test_eight_readers_follow_200_versions_whole_and_in_order(fleet_daemon: DaemonProcess) -> None:
    total = 200
    assert publish(SLOT, stamped(1), socket=fleet_daemon.socket) == 1
    readers = start_readers(fleet_daemon, 8, final=total)
    try:
        for version in range(2, total + 1):
            assert publish(SLOT, stamped(version), socket=fleet_daemon.socket) == version
        results = collect(readers)
    finally:
        for proc in readers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    for result in results:
        assert result["last"] == total, result
        assert result["torn"] == 0, result
        assert result["backwards"] == 0, result
        assert result["n_errors"] == 0, result


def test_readers_survive_a_daemon_sigkill_and_converge(
    tmp_path: Path, fleet_daemon: DaemonProcess
) -> None:
    assert publish(SLOT, stamped(1), socket=fleet_daemon.socket) == 1
    readers = start_readers(fleet_daemon, 4, final=40)
    second: DaemonProcess | None = None
    try:
        for version in range(2, 21):
            publish(SLOT, stamped(version), socket=fleet_daemon.socket)
        fleet_daemon.stop(signal.SIGKILL)
        # readers keep reading from the store while no daemon runs
        second = start_daemon(tmp_path, fleet_daemon.store, fleet_daemon.socket)
        wait_for_socket(second.socket, second.proc)
        for version in range(21, 41):
            assert publish(SLOT, stamped(version), socket=second.socket) == version
        results = collect(readers)
    finally:
        for proc in readers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if second is not None:
            assert second.stop() == 0
    for result in results:
        assert result["last"] == 40, result
        assert result["torn"] == 0, result
        assert result["n_errors"] == 0, result


MEMORY_READER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from ctxstore.readers import Reader, process_memory
    store, sock, slot = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with Reader(store=store, socket=sock, name="mem") as reader:
        before = process_memory()
        ctx = reader.get(slot)
        total = sum(float(np.asarray(a, dtype=np.float64).sum()) for a in ctx.weights.values())
        shared = all(not a.flags.writeable for a in ctx.weights.values())
        after = process_memory()
        print(json.dumps({"before": before, "after": after, "sum": total, "readonly": shared}),
              flush=True)
        sys.stdin.readline()  # stay mapped until every reader has measured
    """
)


def test_readers_share_one_copy_of_the_weights(fleet_daemon: DaemonProcess) -> None:
    """8 readers of a 64 MiB context add about 64 MiB of PSS in all, not 8 x 64 MiB."""
    size = 64 << 20
    weights = np.ones(size // 4, dtype="f4")
    publish(SLOT, Context({"w": weights}), socket=fleet_daemon.socket)
    procs = [
        subprocess.Popen(
            dies_with_pytest(
                [
                    sys.executable,
                    "-c",
                    MEMORY_READER,
                    str(fleet_daemon.store),
                    str(fleet_daemon.socket),
                    str(SLOT),
                ]
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    reports = []
    try:
        for proc in procs:  # all measure while all of them hold the mapping
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            reports.append(json.loads(line))
        # PSS splits each shared page among its mappers: measure once every reader maps it
        pss_now = [_pss(proc.pid) for proc in procs]
    finally:
        for proc in procs:
            proc.communicate("\n" if proc.poll() is None else None, timeout=30)
    for report in reports:
        assert report["sum"] == size // 4
        assert report["readonly"]
    added_uss = [r["after"][0] - r["before"][0] for r in reports]
    # no reader holds a private copy (that would be >= 64 MiB in one of them); the sum
    # had no room for the readers' own growth under load (it failed 1 run in 15)
    assert max(added_uss) < size // 2, [n >> 20 for n in added_uss]
    baseline = sum(r["before"][1] for r in reports)
    added_pss = sum(pss_now) - baseline
    assert added_pss < 2 * size, f"readers added {added_pss >> 20} MiB PSS for a 64 MiB context"


def _pss(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_full_info().pss)


HOLDER = textwrap.dedent(
    """
    import sys
    from ctxstore.readers import Reader
    store, sock, slot = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # follow=False: this worker stays on the version it has until it asks again
    with Reader(store=store, socket=sock, name="holder", follow=False) as reader:
        ctx = reader.get(slot)
        print("holding", ctx.version, flush=True)
        sys.stdin.readline()
        print("still", float(ctx["t0"][0]), flush=True)
    """
)


def test_retention_keeps_what_a_connected_reader_holds(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, tmp_path / "store", tmp_path / "ctx.sock", None,
                          "--retention", "1", "--log-level", "DEBUG")  # fmt: skip
    version_1 = tmp_path / "store" / "slots" / str(SLOT) / "1"
    holder: subprocess.Popen[str] | None = None
    try:
        wait_for_socket(daemon.socket, daemon.proc)
        publish(SLOT, stamped(1), socket=daemon.socket)
        holder = subprocess.Popen(
            dies_with_pytest([sys.executable, "-c", HOLDER, str(daemon.store),
                              str(daemon.socket), str(SLOT)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert holder.stdout is not None
        assert holder.stdout.readline().split() == ["holding", "1"]
        # the ack may still be in flight: the daemon must have it before retention runs
        wait_for_log(daemon, f"ack slot {SLOT} version 1")

        def stored() -> list[int]:  # the index says at once what retention kept
            with PersistentStore(daemon.store, readonly=True) as store:
                return [v.version for v in store.list_versions(SLOT)]

        for version in range(2, 6):
            assert publish(SLOT, stamped(version), socket=daemon.socket) == version
            assert 1 in stored(), f"version 1 was retired at version {version}"
            assert version_1.exists()
        out, err = holder.communicate("\n", timeout=30)
        assert out.split()[-2:] == ["still", "1.0"], err
        wait_for_log(daemon, "(holder (pid")  # its session closed
        publish(SLOT, stamped(6), socket=daemon.socket)  # nobody holds v1 any more
        assert 1 not in stored()
        deadline = time.monotonic() + 10  # its files go in the daemon's background thread
        while version_1.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not version_1.exists()
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.communicate(timeout=10)
        assert daemon.stop() == 0


def wait_for_log(daemon: DaemonProcess, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in daemon.log_text():
        assert time.monotonic() < deadline, daemon.log_text()[-2000:]
        time.sleep(0.02)


def test_a_sigstopped_reader_is_dropped_and_catches_up_after_sigcont(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, tmp_path / "store", tmp_path / "ctx.sock", None,
                          "--silent-timeout", "2", "--stuck-timeout", "2")  # fmt: skip
    try:
        wait_for_socket(daemon.socket, daemon.proc)
        publish(SLOT, stamped(1), socket=daemon.socket)
        stopped, healthy = start_readers(daemon, 2, final=30, deadline=120)
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            for version in range(2, 21):
                assert publish(SLOT, stamped(version), socket=daemon.socket) == version
            wait_for_log(daemon, "silent for 2s")  # dropped after the limit
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        for version in range(21, 31):
            publish(SLOT, stamped(version), socket=daemon.socket)
        results = collect([stopped, healthy])
    finally:
        assert daemon.stop() == 0
    for result in results:
        assert result["last"] == 30, result
        assert result["torn"] == 0, result
        assert result["n_errors"] == 0, result


def _reader_pids(daemon: DaemonProcess) -> set[int]:
    with DaemonClient(daemon.socket, name="fleet-status", role="admin", timeout=10) as client:
        return {row["pid"] for row in client.status().readers if row.get("role") == "reader"}


def _open_sockets(pid: int) -> int:
    """The process's socket descriptors: each connected peer costs the daemon one."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed while we listed
            count += os.readlink(fd).startswith("socket:")
    return count


def _settled(read: Callable[[], int], timeout: float = 20) -> int:
    """``read()`` once two readings 0.2 s apart agree (the daemon has closed what it will)."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = read()
        if now == last:
            return now
        last = now
    raise AssertionError(f"the count never settled (last {last})")


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def test_stopped_killed_and_never_reading_peers_hold_up_no_one(tmp_path: Path) -> None:
    """1 reader SIGSTOPped, 1 SIGKILLed mid-read, 1 peer that never reads its socket.

    The healthy readers get every version, whole; the dead reader leaves the
    daemon's status at once, the silent ones once past the limit; when all are
    gone the daemon holds no socket more than before they came.
    """
    daemon = start_daemon(tmp_path, tmp_path / "store", tmp_path / "ctx.sock", None,
                          "--silent-timeout", "3", "--stuck-timeout", "3")  # fmt: skip
    procs: list[subprocess.Popen[str]] = []
    mute: RawPeer | None = None
    try:
        wait_for_socket(daemon.socket, daemon.proc)
        publish(SLOT, stamped(1), socket=daemon.socket)
        assert _reader_pids(daemon) == set()
        sockets_before = _settled(lambda: _open_sockets(daemon.proc.pid))  # clients gone
        procs = start_readers(daemon, 4, final=40, deadline=120)
        stopped, killed, healthy = procs[0], procs[1], procs[2:]
        mute = RawPeer(daemon.socket, "mute")
        mute.subscribe(slots=(SLOT,))  # and never reads its socket again
        os.kill(stopped.pid, signal.SIGSTOP)
        for version in range(2, 41):
            assert publish(SLOT, stamped(version), socket=daemon.socket) == version
            if version == 20:
                killed.kill()  # the announcement is on its way: the reader is mapping it
        _wait_for(lambda: killed.pid not in _reader_pids(daemon), "the killed reader leaves")
        wait_for_log(daemon, f"(reader-0 (pid {stopped.pid})): closed: silent for 3s")
        wait_for_log(daemon, f"(mute (pid {os.getpid()})): closed: silent for 3s")
        gone = f"(reader-1 (pid {killed.pid})): closed: "
        reason = next(line for line in daemon.log_text().splitlines() if gone in line)
        assert "silent" not in reason and "stuck" not in reason, reason  # at its EOF
        assert not {stopped.pid, killed.pid, os.getpid()} & _reader_pids(daemon)
        results = collect(healthy)
        os.kill(stopped.pid, signal.SIGCONT)
        assert collect([stopped])[0]["last"] == 40  # it reconnects and catches up
        killed.communicate(timeout=10)
        assert killed.returncode == -signal.SIGKILL
        mute.close()
        _wait_for(lambda: _reader_pids(daemon) == set(), "every peer is gone")
        _wait_for(
            lambda: _open_sockets(daemon.proc.pid) <= sockets_before,
            "the daemon holds no socket of a gone peer",
        )
    finally:
        if mute is not None:
            mute.close()
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.communicate(timeout=10)
        assert daemon.stop() == 0
    for result in results:
        assert result["last"] == 40, result
        assert result["torn"] == 0, result
        assert result["backwards"] == 0, result
        assert result["n_errors"] == 0, result
