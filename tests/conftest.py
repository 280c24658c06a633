"""Shared fixtures and the --long switch for the full-count runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.peers import close_open_peers

from ctxstore.store import PersistentStore


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
