"""A tampered store: links, FIFOs, stray entries and forged index values never crash, hang
or fool the store, never make it read or delete outside its directory; verify names them."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.contexts import store_with_one_version, tamper
from support.daemon import assert_the_error_comes_first, failed_start, running_daemon

import ctxstore.store.checking as store_module
from ctxstore import Context, IntegrityError, PersistentStore, StorageError
from ctxstore.cli import main


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctxstore.cli", *args], capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (links not followed) and the bytes of its files."""
    tree: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        tree[str(path.relative_to(root))] = path.read_bytes() if path.is_file() else None
    return tree


def outside_tree(root: Path) -> Path:
    """A directory outside the store that looks like a slot: numbered directories, files."""
    for name in ("1", "2", "3"):
        (root / name).mkdir(parents=True)
        (root / name / "0.npy").write_bytes(b"precious " + name.encode())
    (root / "notes.txt").write_text("precious")
    return root


# -- item 3: no link is followed by recovery, retention or repair ---------------------------------


def test_recovery_retention_and_repair_never_follow_a_link_out_of_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "VERIFY_SETTLE_MAX_S", 0.0)  # nothing here is passing
    store_dir = tmp_path / "store"
    with PersistentStore(store_dir, retention=5) as store:
        for value in range(3):
            store.save_context(2, Context({"w": np.full(8, float(value))}))
        store.save_context(1, Context({"w": np.zeros(8)}))
    elsewhere = tmp_path / "elsewhere"
    # slot 2's directory swapped for a link to a copy of it outside the store (its rows stay)
    shutil.copytree(store_dir / "slots/2", elsewhere / "slot2")
    shutil.rmtree(store_dir / "slots/2")
    os.symlink(elsewhere / "slot2", store_dir / "slots/2")
    # an unknown slot that is a link to numbered directories; wal/ a link to more of them
    os.symlink(outside_tree(elsewhere / "s77"), store_dir / "slots/77")
    shutil.rmtree(store_dir / "wal")
    os.symlink(outside_tree(elsewhere / "w"), store_dir / "wal")
    # a version directory that is a link, inside a real slot directory
    os.symlink(outside_tree(elsewhere / "v9"), store_dir / "slots/1/9")
    before = snapshot(elsewhere)

    with PersistentStore(store_dir, retention=1) as store:
        found = {(p.kind, p.slot, p.version) for p in store.recovery_problems}
        assert {("stray_entry", 77, None), ("stray_entry", 2, None), ("stray_entry", 1, 9),
                ("stray_entry", None, None)} <= found  # fmt: skip
        assert ("missing_version_dir", 2, 3) in found
        assert (store_dir / "wal").is_dir() and not (store_dir / "wal").is_symlink()
        with pytest.raises(StorageError, match="slots/2 is a symbolic link"):
            store.save_context(2, Context({"w": np.ones(8)}))  # would land outside
        assert store.apply_retention() == [(2, 1), (2, 2)]  # rows go; files are refused
        store.wait_background()
        problems = {(p.kind, p.slot, p.version) for p in store.verify()}
        assert {("stray_entry", 77, None), ("stray_entry", 2, None),
                ("stray_entry", 1, 9)} <= problems  # fmt: skip
        store.repair()
        assert store.load_context(1).version == 1
    assert snapshot(elsewhere) == before
    assert os.path.islink(store_dir / "slots/77") and os.path.islink(store_dir / "slots/2")


def test_a_slots_directory_that_is_a_link_is_refused_and_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "VERIFY_SETTLE_MAX_S", 0.0)  # nothing here is passing
    store_dir = tmp_path / "store"
    with PersistentStore(store_dir) as store:
        store.save_context(1, Context({"w": np.zeros(4)}))
    (store_dir / "slots").rename(tmp_path / "moved")
    os.symlink(tmp_path / "moved", store_dir / "slots")
    (tmp_path / "moved/1/5").mkdir()  # an orphan recovery would delete through the link
    with pytest.raises(StorageError, match="slots is a symbolic link"):
        PersistentStore(store_dir)
    assert (tmp_path / "moved/1/5").is_dir()
    with PersistentStore(store_dir, readonly=True) as store:
        assert sorted(p.kind for p in store.verify()) == [
            "missing_file", "missing_version_dir", "stray_entry"]  # fmt: skip


# -- item 4: every value from the index is checked before use -----------------------------------


LOAD = """
import sys
from ctxstore import CtxStoreError, PersistentStore
from ctxstore.readers import Reader
for store_dir in sys.argv[1:]:
    with PersistentStore(store_dir, readonly=True) as store:
        try:
            print("loaded", store.load_context(1)["w"][:4])
        except CtxStoreError as exc:
            print("refused:", exc)
    with Reader(store=store_dir, socket=store_dir + "/none.sock", name="t") as reader:
        try:
            print("read", reader.get(1)["w"][:4])
        except CtxStoreError as exc:
            print("refused:", exc)
"""

FORGED_MANIFESTS: list[tuple[dict[int, Any], str]] = [
    ({1: "'|O'", 2: [5]}, "holds Python objects"),  # a SIGSEGV before
    ({2: [48], 3: -24, 4: 192}, "data offset -24"),  # bytes before the map, or a SIGSEGV
    ({1: "'|V4'"}, "raw void bytes"),
    ({3: 0, 4: 168, 2: [42]}, "data offset 0"),  # the header read as numbers
]


def test_a_forged_manifest_never_crashes_or_fools_a_reader(tmp_path: Path) -> None:
    """In a child process: a crash there is a failed assertion here, not a dead test run."""
    stores = []
    for number, (manifest, _) in enumerate(FORGED_MANIFESTS):
        store_dir = tmp_path / f"store{number}"
        store_with_one_version(store_dir)
        tamper(store_dir, manifest, {})
        stores.append(str(store_dir))
    result = subprocess.run([sys.executable, "-c", LOAD, *stores],
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 2 * len(FORGED_MANIFESTS), lines
    for number, (_, refusal) in enumerate(FORGED_MANIFESTS):
        loaded, read = lines[2 * number : 2 * number + 2]
        assert loaded.startswith("refused:") and refusal in loaded, (refusal, lines)
        # a Reader serves the intact version 1 instead (self-healing, docs/reliability.md)
        assert read == "read [0. 1. 2. 3.]", (refusal, lines)


@pytest.mark.parametrize(
    ("column", "forged", "wrong"),
    [
        ("dtype", "'<i4'", "it holds '<f4', the index says int32"),
        ("shape", "2,5", "it has shape [10], the index says [2, 5]"),
    ],
)
def test_a_record_that_reinterprets_the_bytes_is_caught_by_checksums_and_verify(
    tmp_path: Path, column: str, forged: str, wrong: str
) -> None:
    """Same item size, same byte count: the checksum still matches the file, so the
    file's own .npy header must decide."""
    store_dir = tmp_path / "store"
    store_with_one_version(store_dir)
    field = {"dtype": 1, "shape": 2}[column]
    value: Any = forged if column == "dtype" else [2, 5]
    tamper(store_dir, {field: value}, {column: forged})
    with PersistentStore(store_dir, readonly=True) as store:
        with pytest.raises(IntegrityError, match=r"\.npy header disagrees"):
            store.load_context(1, verify=True)
        assert store.load_context(1, 1, verify=True).version == 1
        problems = store.verify()
    assert [(p.kind, p.slot, p.version) for p in problems] == [("header_mismatch", 1, 2)]
    assert wrong in problems[0].detail


def test_a_version_that_is_a_path_never_leads_outside_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "VERIFY_SETTLE_MAX_S", 0.0)  # nothing here is passing
    store_dir = tmp_path / "store"
    store_with_one_version(store_dir)
    outside = tmp_path / "outside" / "x"
    outside.mkdir(parents=True)
    shutil.copy(store_dir / "slots/1/2/0.npy", outside / "0.npy")
    conn = sqlite3.connect(store_dir / "index.db")
    with conn:
        conn.execute("PRAGMA foreign_keys = OFF")
        for table in ("versions", "tensors"):
            conn.execute(f"UPDATE {table} SET version = '../../../outside/x' WHERE version = 1")
        conn.execute("UPDATE slots SET current_version = '../../../outside/x'")
    conn.close()
    with PersistentStore(store_dir, readonly=True) as store:
        for call in (lambda: store.load_context(1), lambda: store.get_metadata(1),
                     store.current_versions):  # fmt: skip
            with pytest.raises(IntegrityError, match="which is no version number"):
                call()
        assert store.load_context(1, 2).version == 2
        kinds = {(p.kind, p.slot) for p in store.verify()}
    assert ("bad_record", 1) in kinds
    with PersistentStore(store_dir, retention=1) as store:
        store.apply_retention()
        store.repair()
    assert (outside / "0.npy").exists()


# -- item 5: a FIFO where a tensor file belongs --------------------------------------------------

FIFO = """
import sys
from ctxstore import CtxStoreError, PersistentStore
with PersistentStore(sys.argv[1], readonly=True) as store:
    try:
        store.load_context(1)
    except CtxStoreError as exc:
        print("refused:", exc)
    print([(p.kind, p.version) for p in store.verify()])
"""


def test_a_fifo_in_place_of_a_tensor_file_is_refused_at_once(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store_with_one_version(store_dir)
    os.unlink(store_dir / "slots/1/2/0.npy")
    os.mkfifo(store_dir / "slots/1/2/0.npy")
    result = subprocess.run([sys.executable, "-c", FIFO, str(store_dir)], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        f"refused: tensor file {store_dir}/slots/1/2/0.npy is not a regular file",
        "[('not_a_file', 2)]",
    ]


def test_a_link_in_place_of_a_tensor_file_is_not_followed(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store_with_one_version(store_dir)
    victim = store_dir / "slots/1/2/0.npy"
    shutil.copy(victim, tmp_path / "same.npy")
    os.unlink(victim)
    os.symlink(tmp_path / "same.npy", victim)  # the same bytes: only the link is wrong
    with PersistentStore(store_dir, readonly=True) as store:
        with pytest.raises(IntegrityError, match="is a symbolic link"):
            store.load_context(1)
        assert [(p.kind, p.version) for p in store.verify()] == [("not_a_file", 2)]


# -- item 6: a damaged index.db ------------------------------------------------------------------


def _damage_pages(index: Path) -> None:
    """Overwrite every page but the first (the header and schema): SQLite opens the file
    and reads its schema version, every table it reads then is garbage."""
    size = index.stat().st_size
    with open(index, "r+b") as f:
        for page in range(1, size // 4096):
            f.seek(page * 4096)
            f.write(bytes(range(256)) * 16)


@pytest.fixture
def damaged_stores(tmp_path: Path) -> dict[str, Path]:
    stores = {}
    for how in ("garbage", "pages"):
        store_dir = tmp_path / how
        with PersistentStore(store_dir, retention=100) as store:
            for n in range(5):
                store.save_context(n, Context({f"w{i}": np.zeros(2) for i in range(20)}))
        index = store_dir / "index.db"
        if how == "garbage":
            index.write_bytes(b"this is no database" * 200)
        else:
            _damage_pages(index)
        stores[how] = store_dir
    return stores


def test_a_damaged_index_is_said_in_the_cli_error_form(
    damaged_stores: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    for how, store_dir in damaged_stores.items():
        for args in (("verify",), ("verify", "3"), ("verify", "--repair")):
            status = main([*args, "--store", str(store_dir)])  # a traceback fails the test
            out, err = capsys.readouterr()
            assert status == 1, (how, args, out, err)
            if args == ("verify", "--repair") or how == "garbage":
                assert err.startswith("ctxstore verify: error: the store index "), (how, args, err)
                assert "is damaged" in err and "restore them from a backup" in err, err
            else:  # SQLite reads enough of it to say what it finds
                assert out.startswith("store: index_damaged: "), (how, args, out)


def test_a_daemon_on_a_damaged_index_says_why_in_one_error_line(
    tmp_path: Path, damaged_stores: dict[str, Path]
) -> None:
    store_dir = damaged_stores["pages"]  # it opens: the first query of recovery fails
    lines = failed_start(tmp_path, store_dir, tmp_path / "ctx.sock")
    assert_the_error_comes_first(lines, f"cannot start: the store index {store_dir}")
    assert "restore them from a backup" in lines[-1]


# -- item 7: stray entries -----------------------------------------------------------------------


def test_stray_entries_are_reported_and_verify_and_the_daemon_carry_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store_dir = tmp_path / "store"
    store_with_one_version(store_dir)
    (store_dir / "slots/9").write_text("a stray file")
    os.mkfifo(store_dir / "slots/8")
    (store_dir / "slots/1/notes").write_text("someone's notes")
    (store_dir / "slots/lost+found").mkdir()
    assert main(["verify", "--store", str(store_dir)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"slot 1: stray_entry: {store_dir}/slots/1/notes is a regular file, not a version "
        "directory",
        f"slot 8: stray_entry: {store_dir}/slots/8 is a FIFO, not a slot directory",
        f"slot 9: stray_entry: {store_dir}/slots/9 is a regular file, not a slot directory",
        f"store: stray_entry: {store_dir}/slots/lost+found is not named by a slot number",
    ]
    assert main(["verify", "9", "--store", str(store_dir)]) == 1
    assert "slots/9 is a regular file" in capsys.readouterr().out
    with running_daemon(tmp_path) as daemon, PersistentStore(store_dir, readonly=True) as store:
        assert store.load_context(1).version == 2
    log = daemon.log_text()
    assert "slots/9 is a regular file, not a slot directory" in log
    assert (store_dir / "slots/9").read_text() == "a stray file"
