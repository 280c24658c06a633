"""Shared fixtures and the --long switch for the full-count runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctxstore import layout
from ctxstore.store import PersistentStore

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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="also run tests marked slow (full crash, fuzz and soak counts)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip_slow = pytest.mark.skip(reason="full-count run: use pytest --long")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _close_raw_peers() -> Iterator[None]:
    """RawPeer sockets (tests/test_daemon.py) opened by any test module are closed after it."""
    yield
    module = sys.modules.get("test_daemon")
    peers = getattr(module, "_OPEN_PEERS", None)
    while peers:
        peers.pop().close()


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_dir: Path) -> Iterator[PersistentStore]:
    with PersistentStore(store_dir) as s:
        yield s
        assert s.verify() == [], "store left inconsistent by the test"


_apt_updated: list[bool] = []


def ensure_os_tool(path_or_binary: str, package: str) -> str:
    """The path of an OS tool the tests need, installing its Debian package when we can.

    The README's `pytest` must work on a fresh machine, so a missing tool is
    installed with apt-get when running as root; elsewhere the test fails with
    the command that installs it (a missing tool is never a silent skip).
    """

    def find() -> str | None:
        if os.path.isabs(path_or_binary):
            return path_or_binary if os.path.exists(path_or_binary) else None
        return shutil.which(path_or_binary)

    found = find()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if not _apt_updated:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True,
                           timeout=600, check=False)  # fmt: skip
            _apt_updated.append(True)
        subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env,
                       capture_output=True, timeout=900, check=False)  # fmt: skip
        found = find()
    if found is None:
        pytest.fail(f"{path_or_binary} is missing: install it with `apt-get install -y {package}`")
    return found


def wal_leftovers(store_root: Path) -> list[str]:
    """What wal/ holds besides an empty staging directory a writer prepared ahead of time
    (one that a commit took and began to fill counts: it is a leftover)."""
    wal = layout.wal_dir(store_root)
    return sorted(
        name
        for name in os.listdir(wal)
        if not (name.startswith(layout.SPARE_PREFIX) and not os.listdir(wal / name))
    )
