"""I/O errors injected with libfiu: fsync, fdatasync (SQLite's commit), rename and write fail
with EIO once or persistently. A failed commit is never reported successful, the store stays
consistent, and commits work again once the fault clears.

The writer runs in a child under libfiu's POSIX preload library; it switches failure points on
and off through libfiu's C API, so the store opens normally and only the commits see faults.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from support.procs import require_os_tool
from support.store import wal_leftovers

from ctxstore import Context, PersistentStore
from ctxstore.store import layout

PRELOADS = ("/usr/lib/fiu/fiu_run_preload.so", "/usr/lib/fiu/fiu_posix_preload.so")

WRITER = textwrap.dedent(
    """
    import ctypes, json, sys
    import numpy as np
    from ctxstore import Context, PersistentStore, CtxStoreError

    store_path, point, mode = sys.argv[1:4]
    fiu = ctypes.CDLL("libfiu.so.0")
    EIO, ONETIME = 5, 1
    attempts = []
    with PersistentStore(store_path, retention=20) as store:
        store.save_context(1, Context({"w": np.full(64, 1.0)}))
        fiu.fiu_enable(point.encode(), 1, ctypes.c_void_p(EIO), ONETIME if mode == "once" else 0)
        for value in (2.0, 3.0, 4.0):
            try:
                version = store.save_context(1, Context({"w": np.full(64, value)}))
                attempts.append(["ok", version, value])
            except CtxStoreError as exc:
                attempts.append(["refused", type(exc).__name__, str(exc)])
        fiu.fiu_disable(point.encode())
        after = store.save_context(1, Context({"w": np.full(64, 5.0)}))
        attempts.append(["ok", after, 5.0])
    print(json.dumps(attempts))
    """
)


@pytest.mark.parametrize(
    "point",
    ["posix/io/sync/fsync", "posix/io/sync/fdatasync", "posix/io/dir/rename", "posix/io/rw/write"],
)
@pytest.mark.parametrize("mode", ["once", "persistent"])
def test_commit_under_io_errors(tmp_path: Path, point: str, mode: str) -> None:
    for library in PRELOADS:
        require_os_tool(library, "fiu-utils")
    env = {**os.environ, "LD_PRELOAD": " ".join(PRELOADS)}
    store_path = tmp_path / "store"
    result = subprocess.run(
        [sys.executable, "-c", WRITER, str(store_path), point, mode],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    attempts = json.loads(result.stdout.strip().splitlines()[-1])
    refused = [a for a in attempts if a[0] == "refused"]
    reported = {a[1]: a[2] for a in attempts if a[0] == "ok"}
    assert refused, f"{point} {mode}: no commit saw the fault: {attempts}"
    if mode == "persistent":
        assert len(refused) == 3, attempts
    for outcome in refused:
        assert outcome[1] in {"StorageError", "IntegrityError"}, outcome
    with PersistentStore(store_path) as store:  # recovery, then the checks
        assert store.verify() == []
        assert store.recovery_problems == []
        assert wal_leftovers(store_path) == []
        stored = {v.version for v in store.list_versions(1)}
        # every commit reported successful is there with its own bytes...
        for version, value in reported.items():
            assert version in stored
            assert np.array_equal(store.load_context(1, version)["w"], np.full(64, value))
        # ...and nothing that was refused became visible
        assert stored == {1, *reported}
        assert store.load_context(1).version == max(reported)


KILLED_AFTER_FAILED_COMMIT = textwrap.dedent(
    """
    import ctypes, os, signal, sys
    import numpy as np
    from ctxstore import Context, PersistentStore, CtxStoreError

    store_path, mode = sys.argv[1:3]
    fiu = ctypes.CDLL("libfiu.so.0")
    EIO, ONETIME = 5, 1
    store = PersistentStore(store_path)
    store.save_context(1, Context({"w": np.full(64, 1.0)}))
    fiu.fiu_enable(b"posix/io/sync/fdatasync", 1, ctypes.c_void_p(EIO),
                   0 if mode == "persistent" else ONETIME)
    try:
        store.save_context(1, Context({"w": np.full(64, 2.0)}))
        print("committed", flush=True)
    except CtxStoreError as exc:
        print("refused", type(exc).__name__, exc, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


HOLDER = textwrap.dedent(
    """
    import sqlite3, sys
    conn = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
    conn.execute("SELECT count(*) FROM versions").fetchone()
    print("holding", flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.parametrize(
    ("mode", "after_kill"),
    [
        ("once", {1}),  # the settling write worked: version 2 is gone for good
        ("persistent", {1}),  # it failed too, yet its frame cut version 2's off
        ("unsettled", {1, 2}),  # killed before settling: WAL recovery replays version 2
        ("held", {1}),  # the same, but a reader holds the index: no WAL recovery at open
    ],
)
def test_sigkill_after_a_failed_index_commit(
    tmp_path: Path, mode: str, after_kill: set[int]
) -> None:
    """SQLite's COMMIT wrote its frames but their sync failed: the transaction is not
    visible, yet its frames sit in the WAL file with a valid commit marker, and the
    next WAL recovery replays them. The version must then be whole (its files kept)
    or, if it stays invisible, leave nothing behind: never a row without files.

    ``held``: another process keeps the index open across the kill, so the next
    writer sees version 2 as an orphan with its frames still in the WAL; once the
    holder goes, a later opener's WAL recovery would replay them unless the first
    opener buried them before deleting the files."""
    for library in PRELOADS:
        require_os_tool(library, "fiu-utils")
    env = {**os.environ, "LD_PRELOAD": " ".join(PRELOADS)}
    if mode in ("unsettled", "held"):
        env["CTXSTORE_CRASH_AT"] = "commit_failed"
    store_path = tmp_path / "store"
    holder = None
    if mode == "held":
        PersistentStore(store_path).close()
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(layout.index_path(store_path))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
    try:
        if holder is not None:
            assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        result = subprocess.run(
            [sys.executable, "-c", KILLED_AFTER_FAILED_COMMIT, str(store_path), mode],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == -9, result.stderr[-3000:]
        if mode in ("unsettled", "held"):
            assert result.stdout == "", "killed at commit_failed, so the commit must have failed"
        else:
            assert result.stdout.startswith("refused StorageError"), result.stdout + result.stderr
        if holder is not None:
            with PersistentStore(store_path) as store:  # recovery with the frames unseen
                assert store.recovery_problems == []
                assert {v.version for v in store.list_versions(1)} == {1}
    finally:
        if holder is not None:
            holder.communicate(timeout=30)  # closes its stdin: it exits, the WAL is replayable
    with PersistentStore(store_path) as store:
        assert store.recovery_problems == []
        assert store.verify() == []
        assert wal_leftovers(store_path) == []
        stored = {v.version for v in store.list_versions(1)}
        assert stored == after_kill
        for version in stored:
            value = float(version)
            assert np.array_equal(store.load_context(1, version)["w"], np.full(64, value))
        assert store.save_context(1, Context({"w": np.full(64, 9.0)})) == max(stored) + 1


KILLED_AFTER_FAILED_POINTER_MOVE = textwrap.dedent(
    """
    import ctypes, os, signal, sys
    import numpy as np
    from ctxstore import Context, PersistentStore, CtxStoreError

    store_path, op = sys.argv[1:3]
    fiu = ctypes.CDLL("libfiu.so.0")
    EIO, ONETIME = 5, 1
    store = PersistentStore(store_path)
    for value in (1.0, 2.0):
        store.save_context(1, Context({"w": np.full(64, value)}))
    fiu.fiu_enable(b"posix/io/sync/fdatasync", 1, ctypes.c_void_p(EIO), ONETIME)
    try:
        if op == "rollback":
            store.rollback(1, 1)
        else:
            store.set_alias(1, "stable", 1)
        print("applied", flush=True)
    except CtxStoreError as exc:
        print("refused", type(exc).__name__, exc, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("op", ["rollback", "set_alias"])
@pytest.mark.parametrize(("mode", "took_effect"), [("settled", False), ("unsettled", True)])
def test_sigkill_after_a_failed_pointer_move(
    tmp_path: Path, op: str, mode: str, took_effect: bool
) -> None:
    """A rollback or alias move whose COMMIT failed was reported failed: after a kill it
    must still not have happened, as long as the writer lived to bury the failed COMMIT's
    WAL frames. ``unsettled``: killed right after the failure, before that write, the
    frames are replayed and the move happens after all (a failed COMMIT's outcome is
    decided by what follows it, as in any database; the caller re-reads)."""
    for library in PRELOADS:
        require_os_tool(library, "fiu-utils")
    env = {**os.environ, "LD_PRELOAD": " ".join(PRELOADS)}
    if mode == "unsettled":
        env["CTXSTORE_CRASH_AT"] = "commit_failed"
    store_path = tmp_path / "store"
    result = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_FAILED_POINTER_MOVE, str(store_path), op],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == -9, result.stderr[-3000:]
    if mode == "unsettled":
        assert result.stdout == "", "killed at commit_failed, so the move must have failed"
    else:
        assert result.stdout.startswith("refused StorageError"), result.stdout + result.stderr
    with PersistentStore(store_path) as store:
        assert store.recovery_problems == []
        assert store.verify() == []
        moved = (
            store.current_version(1) == 1
            if op == "rollback"
            else store.get_aliases(1).get("stable") == 1
        )
        assert moved == took_effect
        assert {v.version for v in store.list_versions(1)} == {1, 2}
