"""`ctxstore verify [--repair]`: names exactly the damaged versions, exit status says so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ctxstore.store.checking as store_module
from ctxstore import Context, PersistentStore


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctxstore.cli", *args], capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


def test_verify_names_the_damaged_versions_and_repair_rolls_back(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    with PersistentStore(store_dir) as store:
        for v in range(1, 4):
            store.save_context(1, Context({"w": np.arange(50.0) + v}))
        store.save_context(2, Context({"w": np.zeros(50)}))
    assert cli("verify", "--store", str(store_dir)).returncode == 0
    victim = store_dir / "slots/1/3/0.npy"
    victim.chmod(0o644)
    with open(victim, "r+b") as f:
        f.seek(150)
        f.write(b"\x00\x01")
    os.truncate(store_dir / "slots/1/2/0.npy", 10)
    found = cli("verify", "--store", str(store_dir))
    assert found.returncode == 1
    assert "slot 1 version 3" in found.stdout
    assert "slot 1 version 2" in found.stdout
    assert "slot 2" not in found.stdout
    assert cli("verify", "2", "--store", str(store_dir)).returncode == 0
    repaired = cli("verify", "--repair", "--store", str(store_dir))
    assert repaired.returncode == 0  # every slot serves an intact version again
    assert "slot 1: current version 3 -> 1 (damaged: [2, 3])" in repaired.stdout
    assert "slot 1 version 3" in repaired.stdout  # the damage is still there, and said
    assert "every slot now serves an intact version" in repaired.stderr
    assert cli("verify", "--store", str(store_dir)).returncode == 1
    with PersistentStore(store_dir, readonly=True) as store:
        assert store.current_version(1) == 1
        assert np.array_equal(store.load_context(1, verify=True)["w"], np.arange(50.0) + 1)


def test_repair_beside_a_writer_without_a_daemon_socket_says_what_to_do(tmp_path: Path) -> None:
    with PersistentStore(tmp_path / "store"):
        result = cli("verify", "--repair", "--store", str(tmp_path / "store"),
                     "--socket", str(tmp_path / "none.sock"))  # fmt: skip
    assert result.returncode == 1
    assert "locked by pid" in result.stderr
    assert "the daemon holding it would repair it, but cannot reach" in result.stderr
    assert "pass its --socket, or stop it" in result.stderr


WRITER = """
import sys, time
import numpy as np
import pytest

import ctxstore.store.checking as store_module
from ctxstore import Context, PersistentStore
with PersistentStore(sys.argv[1], retention=1) as store:
    print("ready", flush=True)
    deadline = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline:
        for slot in (1, 2):
            store.save_context(slot, Context({"w": np.zeros(64), "b": np.ones(8)}))
"""


def test_read_only_verify_beside_a_busy_writer_reports_nothing_transient(tmp_path: Path) -> None:
    """A live writer commits (a version directory appears before its row) and retires (the
    row goes before the files) all the time; a read-only verify must not call those damage."""
    store_dir = tmp_path / "store"
    with PersistentStore(store_dir) as store:
        store.save_context(1, Context({"w": np.zeros(64)}))
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(store_dir), "20"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        reports = []
        with PersistentStore(store_dir, readonly=True) as store:
            for _ in range(12):
                reports.append(store.verify(rehash=False))
    finally:
        writer.kill()
        writer.wait(10)
        if writer.stdout is not None:
            writer.stdout.close()
    assert [problems for problems in reports if problems] == []
    with PersistentStore(store_dir) as store:  # recovery cleans what the kill left
        assert store.verify() == []


def test_real_damage_beside_a_busy_writer_is_still_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Damage at once; an orphan the writer never clears, once the wait for it is over."""
    monkeypatch.setattr(store_module, "VERIFY_SETTLE_MAX_S", 1.0)
    store_dir = tmp_path / "store"
    with PersistentStore(store_dir) as store:
        store.save_context(3, Context({"w": np.arange(64.0)}))  # the writer never touches 3
    victim = store_dir / "slots/3/1/0.npy"
    victim.chmod(0o644)
    with open(victim, "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xfe")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(store_dir), "20"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        (store_dir / "slots/3/99").mkdir()  # after the writer's recovery: it stays
        with PersistentStore(store_dir, readonly=True) as store:
            found = sorted((p.kind, p.slot, p.version) for p in store.verify())
    finally:
        writer.kill()
        writer.wait(10)
        if writer.stdout is not None:
            writer.stdout.close()
    assert found == [("checksum_mismatch", 3, 1), ("orphan", 3, 99)]


def test_repair_beside_a_running_daemon_asks_it_and_its_readers_are_told(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`verify --repair --socket S` while the daemon holds the store: the daemon verifies,
    moves the pointer (announced like a rollback) and the command prints it, exit 0."""
    from support.daemon import running_daemon
    from support.peers import RawPeer

    from ctxstore.cli import main
    from ctxstore.client import publish
    from ctxstore.messages import Announce

    with running_daemon(tmp_path) as daemon:
        sock = str(daemon.socket)
        for value in range(3):
            publish(1, Context({"w": np.full(64, float(value))}), socket=sock)
        publish(2, Context({"w": np.zeros(64)}), socket=sock)
        victim = daemon.store / "slots/1/3/0.npy"
        victim.chmod(0o644)
        with open(victim, "r+b") as f:
            f.seek(200)
            f.write(b"\xff\xfe")
        peer = RawPeer(daemon.socket, "watcher")
        peer.subscribe(slots=(1,))
        args = ["verify", "--repair", "--store", str(daemon.store), "--socket", sock]
        assert main(args) == 0
        out, err = capsys.readouterr()
        assert out.splitlines()[-1] == "slot 1: current version 3 -> 2 (damaged: [3])", out
        assert "slot 1 version 3 tensor 'w': checksum_mismatch" in out
        assert "every slot now serves an intact version" in err
        announce = peer.next()
        assert isinstance(announce, Announce) and (announce.slot, announce.version) == (1, 2)
        with PersistentStore(daemon.store, readonly=True) as store:
            assert store.current_version(1) == 2
        assert main(args) == 0  # nothing left to move: the damaged version is not served
        assert "current version" not in capsys.readouterr().out
        victim = daemon.store / "slots/2/1/0.npy"  # slot 2 has nothing to fall back to
        victim.chmod(0o644)
        os.truncate(victim, 100)
        assert main([*args[:2], "2", *args[2:]]) == 1
        assert "slot 2: no intact version to fall back to; left at 1" in capsys.readouterr().out
    assert "repair of every slot: 1 problem(s); moved [(1, 3, 2)]" in daemon.log_text()


def test_a_repair_answer_fits_one_frame_and_counts_what_it_leaves_out() -> None:
    from ctxstore.daemon.session import repaired_answer
    from ctxstore.messages import decode_body
    from ctxstore.protocol import DEFAULT_MAX_FRAME_SIZE, encode_body
    from ctxstore.records import Problem
    from ctxstore.store import Repair

    problems = [Problem("stray_file", "x" * 3000, 1, v) for v in range(1, 2001)]
    repairs = [Repair(1, 2000, 7, [2000])]
    answer = repaired_answer(9, problems, repairs, max_frame_size=DEFAULT_MAX_FRAME_SIZE * 4)
    body = encode_body(answer)
    assert len(body) <= DEFAULT_MAX_FRAME_SIZE
    assert 0 < len(answer.problems) < 2000 and answer.problems_total == 2000
    assert decode_body(body) == answer
    assert dict(answer.repairs[0]) == {"slot": 1, "from_version": 2000, "to_version": 7,
                                       "damaged": (2000,)}  # fmt: skip
    assert dict(answer.problems[0]) == problems[0].as_dict()
