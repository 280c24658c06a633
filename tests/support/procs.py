"""Child processes that die with the test run, free ports, other uids, OS tools."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

_DIE_WITH_PARENT = (
    "import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 9)"  # PR_SET_PDEATHSIG, SIGKILL
    "; os.getppid() == int(sys.argv[1]) or os._exit(70)"  # the parent died before prctl
    "; os.execv(sys.argv[2], sys.argv[2:])"
)


def dies_with_pytest(argv: list[str]) -> list[str]:
    """``argv`` run so that the kernel SIGKILLs it when the thread that started it dies,
    however it dies (a crash, a SIGKILL, a CI timeout), where fixtures' clean-up never
    runs: a daemon once outlived a killed run by an hour. The setting survives the
    exec; a ``preexec_fn`` would do the same, but is unsafe beside the tests' threads.
    Only for children started from the main thread."""
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def as_uid(uid: int, work: Callable[[], bytes], groups: tuple[int, ...] = ()) -> bytes:
    """What ``work`` returns when run in a forked child that dropped to ``uid`` (keeping
    group 0, the socket's, plus ``groups``), or the repr of what it raised. The child
    imports nothing new: the interpreter's files may be unreadable to that uid."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(0)
            os.setuid(uid)
            os.write(write_end, work())
        except BaseException as exc:
            os.write(write_end, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        received = pipe.read()
    os.waitpid(pid, 0)
    return received


PEER_UID = 4242  # on the guarded daemon's allowlist


def _find_tool(path_or_binary: str) -> str | None:
    if os.path.isabs(path_or_binary):
        return path_or_binary if os.path.exists(path_or_binary) else None
    return shutil.which(path_or_binary)


def _install_os_packages() -> None:
    script = Path(__file__).resolve().parents[2] / ".ci" / "os-packages"
    subprocess.run([str(script)], check=False, capture_output=True, timeout=900)


def require_os_tool(path_or_binary: str, package: str) -> str:
    """The path of an OS tool the tests need. A missing one is installed by
    ``.ci/os-packages`` (the script ``.ci/run`` uses; as root with apt-get), so the
    README's plain ``pytest`` works on a fresh machine; where it cannot be installed the
    test fails saying how to get it, never a silent skip."""
    found = _find_tool(path_or_binary)
    if found is None:
        _install_os_packages()
        found = _find_tool(path_or_binary)
    if found is None:
        pytest.fail(
            f"{path_or_binary} is missing: `.ci/run` installs it "
            f"(or run `apt-get install -y {package}`)"
        )
    return found
