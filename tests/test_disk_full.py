"""No space, file too large: the commit fails clearly, nothing partial shows, the next one works."""

from __future__ import annotations

import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support.daemon import CLI, start_daemon, wait_for_socket
from support.store import wal_leftovers

from ctxstore import Context, PersistentStore, RemoteError, StorageError
from ctxstore.client import publish
from ctxstore.versiontable import segment_name

MiB = 1 << 20


def big(mib: int, seed: int) -> Context:
    return Context({"w": np.random.default_rng(seed).integers(0, 255, mib * MiB, dtype=np.uint8)})


@pytest.fixture
def small_fs() -> Iterator[Path]:
    """A 16 MiB tmpfs, when this machine lets the test mount one."""
    mount_point = Path(tempfile.mkdtemp(prefix="ctxstore-smallfs-"))
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        mount_point.rmdir()
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip() or 'not root'}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        mount_point.rmdir()


def assert_nothing_partial(store: PersistentStore, expected_versions: list[int]) -> None:
    assert [v.version for v in store.list_versions(1)] == expected_versions
    assert wal_leftovers(store.root) == []
    assert store.verify() == []


def test_no_space_left_fails_cleanly_and_the_next_commit_fits(small_fs: Path) -> None:
    with PersistentStore(small_fs / "store", retention=10) as store:
        assert store.save_context(1, big(6, 1)) == 1
        with pytest.raises(StorageError, match="No space left") as caught:
            store.save_context(1, big(12, 2))
        assert "cannot write" in str(caught.value)
        assert_nothing_partial(store, [1])
        assert store.save_context(1, big(2, 3)) == 2
        assert_nothing_partial(store, [1, 2])


#: runs the CLI with files limited to 8 MiB; SIGXFSZ ignored, so writes fail with EFBIG
LIMITED = (
    "import resource, runpy, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    f"resource.setrlimit(resource.RLIMIT_FSIZE, ({8 * MiB}, {8 * MiB}))\n"
    "sys.argv = ['ctxstore', *sys.argv[1:]]\n"
    "runpy.run_module('ctxstore.cli', run_name='__main__')\n"
)


def _daemon(store: Path, sock: Path, log: Path, limit: bool) -> subprocess.Popen[bytes]:
    launcher = ("-c", LIMITED) if limit else CLI
    return start_daemon(log.parent, store, sock, None, launcher=launcher, log=log).proc


@pytest.mark.parametrize("fault", ["file_too_large", "no_space"])
def test_the_daemon_refuses_what_does_not_fit_and_keeps_serving(
    tmp_path: Path, fault: str, request: pytest.FixtureRequest
) -> None:
    if fault == "no_space":
        root = request.getfixturevalue("small_fs")
        too_big, expected = 12, "No space left"
    else:
        root, too_big, expected = tmp_path, 10, "too large"
    store, sock = root / "store", tmp_path / "ctx.sock"
    daemon = _daemon(store, sock, tmp_path / "daemon.log", limit=fault == "file_too_large")
    try:
        wait_for_socket(sock, daemon)
        assert publish(1, big(4, 1), socket=sock) == 1
        with pytest.raises(RemoteError, match=expected) as caught:
            publish(1, big(too_big, 2), socket=sock)
        assert caught.value.kind == "storage"
        assert daemon.poll() is None
        assert publish(1, big(1, 3), socket=sock) == 2
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        shm = Path("/dev/shm" + segment_name(store))
        if shm.exists():
            shm.unlink()
    with PersistentStore(store) as reopened:
        assert_nothing_partial(reopened, [1, 2])
