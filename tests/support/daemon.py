"""The one way tests start the daemon as a process (``start_daemon``) and what
wraps it: waiting for its socket or log, a daemon for a block, a start that must fail."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ctxstore.versiontable import segment_name
from support.notify import NotifySink
from support.procs import PEER_UID, dies_with_pytest


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    store: Path
    socket: Path
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


CLI = ("-m", "ctxstore.cli")  # how start_daemon runs the command line by default


def start_daemon(
    tmp: Path,
    store: Path,
    sock: Path,
    sink: NotifySink | None = None,
    *extra: str,
    launcher: tuple[str, ...] = CLI,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    locate: bool = True,
    cwd: Path | None = None,
    wrapper: tuple[str, ...] = (),
) -> DaemonProcess:
    """``ctxstore daemon --store STORE --socket SOCK EXTRA...`` as a process that dies with
    pytest, its output in ``log`` (appended to; default: a new file in ``tmp``).

    ``--http off`` unless ``extra`` names an address (test daemons never fight over the
    default port). ``sink``: the NOTIFY_SOCKET it reports to. ``launcher``: the Python
    arguments that run the CLI (a ``-c`` script that sets a resource limit first, say).
    ``env``: the environment (default: this one). ``locate=False``: no ``--store`` or
    ``--socket``, the daemon finds its places itself (``store`` and ``sock`` say where
    it will). ``cwd``: its working directory. ``wrapper``: a command the daemon runs
    under (``unshare ... sh -c SCRIPT sh``, which ends by exec'ing its arguments).
    Does not wait: see ``wait_for_socket`` and ``running_daemon``.
    """
    env = dict(os.environ if env is None else env)
    if sink is not None:
        env["NOTIFY_SOCKET"] = str(sink.address)
    if not any(arg.startswith("--http") for arg in extra):
        extra = (*extra, "--http", "off")
    if locate:
        extra = ("--store", str(store), "--socket", str(sock), *extra)
    if wrapper:  # dies_with_pytest execs its first argument by path
        wrapper = (shutil.which(wrapper[0]) or wrapper[0], *wrapper[1:])
    if log is None:
        log = tmp / f"daemon-{time.monotonic_ns()}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            dies_with_pytest([*wrapper, sys.executable, *launcher, "daemon", *extra]),
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
        )  # fmt: skip
    return DaemonProcess(proc, store, sock, log)


def wait_for_socket(sock: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "daemon exited during start"
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(sock))
            return
        except OSError:
            time.sleep(0.02)
        finally:
            probe.close()
    raise AssertionError(f"daemon socket {sock} never accepted a connection")


def stop_and_clean(daemon: DaemonProcess, *, kill: bool = False) -> None:
    """Stop ``daemon`` if it still runs (SIGTERM, then SIGKILL after 10 s; ``kill``: SIGKILL
    at once) and remove the version-table segment it leaves behind."""
    if daemon.proc.poll() is None:
        if kill:
            daemon.proc.kill()
        else:
            daemon.proc.terminate()
        try:
            daemon.proc.wait(10)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait(10)
    shm = Path("/dev/shm" + segment_name(daemon.store))
    if shm.exists():
        shm.unlink()


@contextlib.contextmanager
def running_daemon(tmp_path: Path, *extra: str) -> Iterator[DaemonProcess]:
    """A daemon on a store in ``tmp_path``, stopped (SIGTERM, then SIGKILL) and its
    version-table segment removed when the block ends."""
    proc = start_daemon(tmp_path, tmp_path / "store", tmp_path / "run" / "ctx.sock", None, *extra)
    try:
        wait_for_socket(proc.socket, proc.proc)
        yield proc
    finally:
        stop_and_clean(proc)


def failed_start(tmp_path: Path, store: Path, sock: Path, *extra: str) -> list[str]:
    """Start a daemon that must refuse to start; its log lines (it exits by itself)."""
    refused = start_daemon(tmp_path, store, sock, None, *extra)
    try:
        assert refused.proc.wait(60) == 1, refused.log_text()[-2000:]
    finally:
        if refused.proc.poll() is None:
            refused.proc.kill()
            refused.proc.wait(10)
    return refused.log_text().splitlines()


def assert_the_error_comes_first(lines: list[str], why: str) -> None:
    """The ERROR saying why is the last line, and nothing claims a daemon ran and stopped."""
    assert lines and " ERROR ctxstore.daemon: " in lines[-1] and why in lines[-1], lines
    assert not [line for line in lines if "stopped" in line], lines
    assert [line for line in lines if " ERROR " in line or " WARNING " in line] == lines[-1:]


def wait_for_log(proc: subprocess.Popen[bytes], log: Path, pattern: str) -> re.Match[str]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text(errors="replace"))
        if match:
            return match
        assert proc.poll() is None, log.read_text(errors="replace")
        time.sleep(0.02)
    raise AssertionError(f"{pattern!r} never appeared in the log")


@contextlib.contextmanager
def guarded_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon whose allowlist holds uid ``PEER_UID``, its socket in a directory a
    dropped-privilege child can reach (pytest's own temp root is 0700)."""
    run = Path(tempfile.mkdtemp(prefix="ctxstore-sec-"))
    run.chmod(0o755)
    daemon = start_daemon(tmp_path, tmp_path / "store", run / "ctx.sock", None,
                          "--allow-uid", str(PEER_UID))  # fmt: skip
    try:
        wait_for_socket(daemon.socket, daemon.proc)
        yield daemon
    finally:
        shutil.rmtree(run, ignore_errors=True)
        stop_and_clean(daemon, kill=True)
