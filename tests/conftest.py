"""Shared fixtures and the --long switch for the full-count runs."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.commit_order import Recorder, record_commit_calls
from support.peers import close_open_peers

from ctxstore.store import PersistentStore


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="also run tests marked slow (full crash, fuzz and soak counts)",
    )


#: the ``--basetemp`` this run chose for itself (none: the command line gave one)
_OWN_BASETEMP: list[Path] = []
#: how many failed runs' roots are kept, newest first, as pytest keeps its last three
KEPT_RUNS = 3


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Each run gets a temporary root of its own unless ``--basetemp`` names one.

    pytest's default root, ``/tmp/pytest-of-USER``, is shared by every run of that
    user: runs at the same time (several checkouts on one machine) number their
    directories in it and prune each other's. This run's root is removed when every
    test passed and kept (its path printed) when one failed; of the kept roots of runs
    that have ended, the newest ``KEPT_RUNS`` stay, as pytest keeps its own.
    """
    if config.option.basetemp is not None:
        return
    parent = Path(tempfile.gettempdir()) / f"ctxstore-pytest-{os.getuid()}"
    parent.mkdir(mode=0o700, exist_ok=True)
    ended = [run for run in parent.glob("run-*") if not _still_running(run)]
    for run in sorted(ended, key=lambda p: p.stat().st_mtime, reverse=True)[KEPT_RUNS:]:
        shutil.rmtree(run, ignore_errors=True)
    own = Path(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=parent))
    config.option.basetemp = str(own)
    _OWN_BASETEMP.append(own)


def _still_running(run: Path) -> bool:
    """Whether the pytest that made ``run`` (``run-PID-...``) is alive."""
    pid = run.name.split("-")[1]
    return pid.isdigit() and Path(f"/proc/{pid}").exists()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for own in _OWN_BASETEMP:
        if exitstatus == 0 or not any(own.iterdir()):
            shutil.rmtree(own, ignore_errors=True)
        elif (reporter := session.config.pluginmanager.get_plugin("terminalreporter")) is not None:
            reporter.write_line(f"temporary files kept in {own}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip_slow = pytest.mark.skip(reason="full-count run: use pytest --long")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _close_raw_peers() -> Iterator[None]:
    """RawPeer sockets (tests/support/peers.py) opened by any test are closed after it."""
    yield
    close_open_peers()


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_dir: Path) -> Iterator[PersistentStore]:
    with PersistentStore(store_dir) as s:
        yield s
        assert s.verify() == [], "store left inconsistent by the test"


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """Every fsync, rename and link the test makes, in order (tests/support/commit_order.py)."""
    return record_commit_calls(monkeypatch)
