"""`ctxstore verify [--repair]`: names exactly the damaged versions, exit status says so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ctxstore.store as store_module
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
    assert repaired.returncode == 1  # the damage is still there, and said
    assert "slot 1: current version 3 -> 1 (damaged: [2, 3])" in repaired.stdout
    with PersistentStore(store_dir, readonly=True) as store:
        assert store.current_version(1) == 1
        assert np.array_equal(store.load_context(1, verify=True)["w"], np.arange(50.0) + 1)


def test_repair_refuses_while_a_writer_holds_the_store(tmp_path: Path) -> None:
    with PersistentStore(tmp_path / "store"):
        result = cli("verify", "--repair", "--store", str(tmp_path / "store"))
    assert result.returncode == 1
    assert "locked by pid" in result.stderr
    assert "POST /verify?repair=true" in result.stderr


WRITER = """
import sys, time
import numpy as np
import pytest

import ctxstore.store as store_module
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
