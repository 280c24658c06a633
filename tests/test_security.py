"""Who gets in and what gets refused, on the socket and the command line."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
from support.daemon import DaemonProcess, guarded_daemon, start_daemon, wait_for_socket
from support.peers import RawPeer
from support.procs import PEER_UID, as_uid

from ctxstore import Context, CtxStoreError, RemoteError
from ctxstore.client import DaemonClient, build, publish
from ctxstore.messages import Error
from ctxstore.protocol import HEADER
from ctxstore.store import PersistentStore
from ctxstore.versiontable import segment_name


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[DaemonProcess]:
    with guarded_daemon(tmp_path) as daemon:
        yield daemon


def test_socket_is_0660(guarded: DaemonProcess) -> None:
    assert guarded.socket.stat().st_mode & 0o777 == 0o660


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to drop to another uid in a child")
def test_a_peer_outside_the_allowlist_is_refused(guarded: DaemonProcess) -> None:
    """uid 65534 with the socket's group passes the file mode but not the daemon's allowlist."""

    def connect_and_read() -> bytes:
        peer = socket.socket(socket.AF_UNIX)
        peer.connect(str(guarded.socket))
        data = b""
        while chunk := peer.recv(65536):
            data += chunk
        return data[:4096]

    received = as_uid(65534, connect_and_read)
    assert b"forbidden" in received, received
    assert "uid 65534 is not allowed" in guarded.log_text()
    # the daemon's own uid (root here) is still served
    assert publish(1, Context({"w": np.zeros(1)}), socket=guarded.socket) == 1


PUBLISHERS_GID = 4343  # the group allowed to publish in the publisher-allowlist test


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a peer as another uid")
def test_a_peer_cannot_import_a_file_it_does_not_own(guarded: DaemonProcess) -> None:
    """The daemon reads files for a peer only if the peer owns them, whichever request names
    them: a publish_file, or a publish_build of node type "file" (which once slipped by)."""
    run = guarded.socket.parent
    secret = run / "secret.npy"
    np.save(secret, np.full(3, 7.0, dtype="f4"))
    secret.chmod(0o600)  # root's: the peer cannot read it, the daemon (root here) can
    own = run / "own.npy"
    np.save(own, np.ones(3, dtype="f4"))
    os.chown(own, PEER_UID, 0)
    sock = guarded.socket
    calls: dict[str, Callable[[], int]] = {
        "file": lambda: publish(1, secret, socket=sock),
        "build": lambda: build(1, "file", {"path": str(secret)}, socket=sock),
        "own": lambda: publish(1, own, socket=sock),
    }

    def publish_each() -> bytes:
        answers = {}
        for what, call in calls.items():
            try:
                answers[what] = f"version {call()}"
            except CtxStoreError as exc:
                answers[what] = str(exc)
        return json.dumps(answers).encode()

    received = as_uid(PEER_UID, publish_each)
    got = json.loads(received) if received.startswith(b"{") else {"child": received.decode()}
    refusal = f"belongs to uid 0, not to the requesting uid {PEER_UID}"
    assert refusal in got.get("file", "") and refusal in got.get("build", ""), got
    assert got["own"] == "version 1", got  # nothing was committed before its own file
    with PersistentStore(guarded.store, readonly=True) as store:
        assert [v.version for v in store.list_versions(1)] == [1]
        assert float(store.load_context(1)["own"][0]) == 1.0


def _frame(body: dict[str, object]) -> bytes:
    packed = msgpack.packb(body)
    return HEADER.pack(len(packed)) + packed


@pytest.mark.parametrize(
    "request_fields",
    [
        {"type": "publish_file", "request_id": 1, "slot": -1, "path": "/tmp/x.npy"},
        {"type": "publish_file", "request_id": 1, "slot": 2**40, "path": "/tmp/x.npy"},
        {"type": "publish_file", "request_id": 1, "slot": 1, "path": "relative/../x.npy"},
        {"type": "publish_file", "request_id": 1, "slot": 1, "path": "/tmp/x\x00.npy"},
        {"type": "publish_build", "request_id": 1, "slot": 1, "node_type": "../evil"},
        {
            "type": "publish_file",
            "request_id": 1,
            "slot": 1,
            "path": "/tmp/x.npy",
            "alias": "../../etc",
        },
        {"type": "ack", "slot": 1, "version": -5},
    ],
)
def test_hostile_identifiers_on_the_socket_are_refused(
    tmp_path: Path, request_fields: dict[str, object]
) -> None:
    daemon = start_daemon(tmp_path, tmp_path / "store", tmp_path / "ctx.sock")
    try:
        wait_for_socket(daemon.socket, daemon.proc)
        peer = RawPeer(daemon.socket)
        peer.sock.sendall(_frame(request_fields))
        reply = peer.next()
        assert isinstance(reply, Error)
        assert reply.kind in {"remote_protocol", "invalid_input"}
        peer.close()
        assert publish(1, Context({"w": np.zeros(1)}), socket=daemon.socket) == 1  # carries on
        assert not (tmp_path / "store" / "slots" / "-1").exists()
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["versions", "-1"],
        ["versions", "99999999999"],
        ["versions", "1/../2"],
        ["show", "abc"],
        ["alias", "1", "../../etc", "1"],
        ["build", "1", "--type", "llm", "--set", "novalue"],
    ],
)
def test_hostile_identifiers_on_the_command_line_are_refused(
    tmp_path: Path, argv: list[str]
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ctxstore.cli", *argv, "--store", str(tmp_path / "s"),
         "--socket", str(tmp_path / "none.sock")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "error" in result.stderr.lower()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to drop to another uid in a child")
def test_only_listed_publishers_may_publish(tmp_path: Path) -> None:
    """publish_gids: a peer may connect and read status, but publishes only from the group."""
    run = Path(tempfile.mkdtemp(prefix="ctxstore-sec-"))
    run.chmod(0o755)
    daemon = start_daemon(tmp_path, tmp_path / "store", run / "ctx.sock", None,
                          "--publish-gid", str(PUBLISHERS_GID))  # fmt: skip
    sock = daemon.socket

    def try_both() -> bytes:
        answers = {}
        with DaemonClient(sock, timeout=10) as client:
            answers["status"] = f"commits {client.status().daemon['commits']}"
        for what, call in {
            "publish": lambda: publish(1, Context({"w": np.ones(2)}), socket=sock),
            "build": lambda: build(2, "cnn", {"seed": 1}, socket=sock),
        }.items():
            try:
                answers[what] = f"version {call()}"
            except RemoteError as exc:
                answers[what] = str(exc)
        return json.dumps(answers).encode()

    try:
        wait_for_socket(sock, daemon.proc)
        outsider = json.loads(as_uid(PEER_UID, try_both))
        member = json.loads(as_uid(PEER_UID, try_both, groups=(PUBLISHERS_GID,)))
    finally:
        shutil.rmtree(run, ignore_errors=True)
        daemon.stop()
        shm = Path("/dev/shm" + segment_name(daemon.store))
        if shm.exists():
            shm.unlink()
    assert outsider["status"] == "commits 0", outsider
    for what in ("publish", "build"):
        assert outsider[what].startswith("permission_denied: "), outsider
        assert f"uid {PEER_UID} may not publish" in outsider[what], outsider
    assert member == {"status": "commits 0", "publish": "version 1", "build": "version 1"}


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a peer as another uid")
def test_a_repair_is_allowed_only_to_the_peers_that_may_publish(tmp_path: Path) -> None:
    """A repair moves current versions: a peer outside publish_uids is refused, by name."""
    run = Path(tempfile.mkdtemp(prefix="ctxstore-sec-"))
    run.chmod(0o755)
    daemon = start_daemon(tmp_path, tmp_path / "store", run / "ctx.sock", None,
                          "--publish-uid", str(PEER_UID))  # fmt: skip
    try:
        wait_for_socket(daemon.socket, daemon.proc)

        def ask_for_a_repair() -> bytes:
            with DaemonClient(daemon.socket, name="outsider", role="admin", timeout=10) as client:
                try:
                    return repr(client.repair()).encode()
                except RemoteError as exc:
                    return f"{exc.kind}: {exc.message}".encode()

        answer = as_uid(65534, ask_for_a_repair).decode()
        assert answer.startswith("permission_denied: uid 65534 may not repair"), answer
        with DaemonClient(daemon.socket, name="root", role="admin", timeout=10) as client:
            assert client.repair().problems_total == 0  # the daemon's own uid may
    finally:
        daemon.proc.terminate()
        daemon.proc.wait(10)
        shutil.rmtree(run, ignore_errors=True)
        shm = Path("/dev/shm" + segment_name(daemon.store))
        if shm.exists():
            shm.unlink()
