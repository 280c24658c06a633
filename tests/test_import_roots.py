"""import_roots: file imports read only from under the configured directories, on every path."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.daemon import start_daemon, wait_for_socket
from support.inprocess import error_of, job_finished, run

from ctxstore import InvalidInputError, RemoteError
from ctxstore.client import build, publish
from ctxstore.daemon.import_roots import check_import_path, check_opened_file
from ctxstore.daemon.server import Daemon
from ctxstore.errors import PermissionDeniedError
from ctxstore.nodes.files import OpenedFile
from ctxstore.store import PersistentStore
from ctxstore.versiontable import segment_name


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """models/ (the root) with a.npy; models-evil/ beside it; outside/b.npy."""
    for folder in ("models", "models-evil", "outside"):
        (tmp_path / folder).mkdir()
    np.save(tmp_path / "models" / "a.npy", np.arange(3, dtype="f4"))
    np.save(tmp_path / "models-evil" / "c.npy", np.zeros(3, dtype="f4"))
    np.save(tmp_path / "outside" / "b.npy", np.ones(3, dtype="f4"))
    return tmp_path


def _check(roots: tuple[Path, ...], path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        opened = OpenedFile(fd, os.fspath(path), os.fstat(fd))
        check_opened_file(roots, opened, f"weights file {str(path)!r}")
    finally:
        os.close(fd)


def test_only_paths_that_resolve_under_a_root_pass(tree: Path) -> None:
    roots = (tree / "models",)
    _check(roots, tree / "models" / "a.npy")
    _check(roots, tree / "models" / ".." / "models" / "a.npy")
    _check((), tree / "outside" / "b.npy")  # no roots: no restriction
    (tree / "outside" / "into.npy").symlink_to(tree / "models" / "a.npy")
    _check(roots, tree / "outside" / "into.npy")  # its real location is under the root
    (tree / "models" / "escape.npy").symlink_to(tree / "outside" / "b.npy")
    for path in (
        tree / "outside" / "b.npy",
        tree / "models-evil" / "c.npy",  # a name that merely starts like the root
        tree / "models" / ".." / "outside" / "b.npy",
        tree / "models" / "escape.npy",
    ):
        with pytest.raises(PermissionDeniedError, match="outside the daemon's import roots"):
            _check(roots, path)
        with pytest.raises(PermissionDeniedError, match=re.escape(str(tree / "models"))):
            check_import_path(roots, os.fspath(path))
    check_import_path(roots, os.fspath(tree / "models" / "not-yet-written.npy"))


def test_what_was_opened_decides_not_what_the_path_names_later(tree: Path) -> None:
    """A directory swapped between open and check (a symlink to outside while the daemon
    opens, a real directory with a decoy when it looks): the file opened is refused."""
    root = tree / "models"
    (root / "d").symlink_to(tree / "outside")
    path = root / "d" / "b.npy"
    fd = os.open(path, os.O_RDONLY)  # opens outside/b.npy through the symlink
    try:
        (root / "d").unlink()
        (root / "d").mkdir()
        np.save(root / "d" / "b.npy", np.ones(3, dtype="f4"))  # the decoy the path names now
        check_import_path((root,), os.fspath(path))  # the path alone looks fine...
        opened = OpenedFile(fd, os.fspath(path), os.fstat(fd))
        with pytest.raises(PermissionDeniedError, match="outside the daemon's import roots"):
            check_opened_file((root,), opened, "weights file")  # ...the opened file does not
    finally:
        os.close(fd)


def test_unusable_paths_are_bad_input_not_a_crash(tree: Path) -> None:
    with pytest.raises(InvalidInputError, match="is not usable"):
        check_import_path((tree / "models",), "/srv/\x00a.npy")


def test_the_socket_imports_only_from_the_roots(tree: Path) -> None:
    """publish_file and a "file" build over the socket; the refusal says which roots hold."""
    sock = tree / "ctx.sock"
    daemon = start_daemon(tree, tree / "store", sock, None, "--import-root", str(tree / "models"))
    try:
        wait_for_socket(sock, daemon.proc)
        assert publish(1, tree / "models" / "a.npy", socket=sock) == 1
        with pytest.raises(RemoteError, match=r"permission_denied: .* outside the daemon's"):
            publish(1, tree / "outside" / "b.npy", socket=sock)
        with pytest.raises(RemoteError, match=r"permission_denied: .* outside the daemon's"):
            build(1, "file", {"path": str(tree / "models-evil" / "c.npy")}, socket=sock)
        assert build(2, "file", {"path": str(tree / "models" / "a.npy")}, socket=sock) == 1
    finally:
        assert daemon.stop() == 0
        Path("/dev/shm" + segment_name(tree / "store")).unlink(missing_ok=True)
    with PersistentStore(tree / "store", readonly=True) as store:
        assert [v.version for v in store.list_versions(1)] == [1]
        assert store.load_context(1)["a"].tolist() == [0.0, 1.0, 2.0]


def test_http_file_jobs_are_refused_outside_the_roots_when_queued_and_when_run(
    tree: Path,
) -> None:
    """POST /jobs answers 403 at once; a job queued before the roots changed fails when it
    runs, on its first attempt, without a retry."""
    roots = (tree / "models",)

    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        outside = {"slot": 1, "node_type": "file", "config": {"path": str(tree / "outside/b.npy")}}
        message = error_of(await http.post("/jobs", json=outside), 403, "permission_denied")
        assert "outside the daemon's import roots" in message and str(roots[0]) in message
        nul = {"slot": 1, "node_type": "file", "config": {"path": "/srv/\x00.npy"}}
        error_of(await http.post("/jobs", json=nul), 400, "invalid_input")
        inside = {"slot": 1, "node_type": "file", "config": {"path": str(tree / "models/a.npy")}}
        done = await job_finished(http, (await http.post("/jobs", json=inside)).json()["job"]["id"])
        assert (done["state"], done["version"]) == ("done", 1), done
        # the roots change (SIGHUP) while a job queued before waits (jobs outlive restarts too)
        daemon.config = daemon.config.replace(import_roots=(tree / "outside",))
        assert daemon.jobs is not None
        queued = await asyncio.to_thread(daemon.jobs.submit, 1, "file", inside["config"], 0)
        failed = await job_finished(http, queued.id)
        assert failed["state"] == "failed" and failed["attempts"] == 1, failed
        assert "outside the daemon's import roots" in str(failed["error"]), failed

    run(tree, scenario, import_roots=roots)
