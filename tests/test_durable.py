"""The commit path's file-system primitives: syncing many paths at once, and the reaper."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from support.store import wal_leftovers

import ctxstore.store.durable as durable
import ctxstore.store.reaper as reaper_module
from ctxstore import Context, NotFoundError, PersistentStore, StorageError
from ctxstore.store import layout


def test_fsync_all_syncs_every_path_and_reports_a_failure_after_all_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = [tmp_path / f"f{i}" for i in range(12)]
    for path in paths:
        path.write_bytes(b"x")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name.endswith("/f7"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)
        synced.append(name)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StorageError, match=r"cannot fsync .*/f7: Input/output error"):
        durable.fsync_all([*paths, tmp_path])
    # the failure did not cut the others short: every other path was synced
    assert sorted(synced) == sorted(str(p) for p in [*paths, tmp_path] if p.name != "f7")
    durable.fsync_all([])  # nothing to do is not an error


def test_a_small_version_is_synced_in_the_callers_thread_after_its_writeback_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small commit's files: writeback started as each is written, then each fsynced
    in the committing thread (a pool hand-off cost more CPU than the fsync); a failed
    fsync still does not cut the others short. A large batch still goes to the pool."""
    started: list[int] = []
    real_start = durable.start_writeback
    monkeypatch.setattr(durable, "start_writeback", lambda fd: (started.append(fd), real_start(fd)))
    small = [str(tmp_path / f"s{i}") for i in range(4)]
    for path in small:
        durable.write_new_file(path, (b"x" * 4096,), sync=False)
    assert len(started) == 4
    durable.write_new_file(str(tmp_path / "big"), (b"x" * (durable.SERIAL_SYNC_BYTES + 1),),
                           sync=False)  # fmt: skip
    assert len(started) == 4  # a large file is synced by the pool, with no head start

    threads: dict[str, int] = {}
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        threads[name] = threading.get_ident()
        if name.endswith("/s1"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StorageError, match=r"cannot fsync .*/s1: Input/output error"):
        durable.fsync_all(small, nbytes=4 * 4096)
    assert set(threads) == set(small)
    assert set(threads.values()) == {threading.get_ident()}
    threads.clear()
    with pytest.raises(StorageError, match="/s1"):
        durable.fsync_all(small, nbytes=durable.SERIAL_SYNC_BYTES + 1)
    assert set(threads) == set(small)
    assert set(threads.values()) - {threading.get_ident()}  # the pool synced some


def test_a_retired_version_is_deleted_in_the_background(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    real_remove = reaper_module.remove_beneath

    def slow_remove(root: str, relative: str) -> str | None:
        assert gate.wait(30), "the test never opened the gate"
        return real_remove(root, relative)

    monkeypatch.setattr(reaper_module, "remove_beneath", slow_remove)
    with PersistentStore(store_dir, retention=1) as store:
        store.save_context(1, Context({"w": np.full(16, 1.0)}))
        held = store.load_context(1, 1)["w"]
        store.save_context(1, Context({"w": np.full(16, 2.0)}))
        # version 1 is retired: its row is gone at once, its files wait for the reaper
        assert [v.version for v in store.list_versions(1)] == [2]
        assert layout.version_dir(store_dir, 1, 1).exists()
        with pytest.raises(NotFoundError):
            store.load_context(1, 1)
        store.save_context(1, Context({"w": np.full(16, 3.0)}))  # commits do not wait for it
        assert np.array_equal(held, np.full(16, 1.0))  # a mapped array keeps its pages
        gate.set()
        store.wait_background()
        assert sorted(os.listdir(layout.slot_dir(store_dir, 1))) == ["3"]
        assert wal_leftovers(store_dir) == []


def test_close_finishes_the_background_deletions(store_dir: Path) -> None:
    store = PersistentStore(store_dir, retention=1)
    for value in range(5):
        store.save_context(1, Context({"w": np.full(16, float(value))}))
    store.close()
    assert sorted(os.listdir(layout.slot_dir(store_dir, 1))) == ["5"]


def test_verify_does_not_mistake_a_pending_deletion_for_an_orphan(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_remove = reaper_module.remove_beneath
    monkeypatch.setattr(
        reaper_module, "remove_beneath", lambda *a: (release.wait(30), real_remove(*a))[1]
    )
    with PersistentStore(store_dir, retention=1) as store:
        store.save_context(1, Context({"w": np.full(16, 1.0)}))
        store.save_context(1, Context({"w": np.full(16, 2.0)}))
        threading.Timer(0.2, release.set).start()
        assert store.verify() == []  # it waited for the reaper instead of reporting version 1
        assert not layout.version_dir(store_dir, 1, 1).exists()


def test_drain_waits_for_what_was_queued_before_it_not_after() -> None:
    """Commits queue chores all the time; a drain (verify) must not wait for the future."""
    reaper = reaper_module.Reaper(delay=0.0)
    try:
        ran: list[int] = []
        started, release = threading.Event(), threading.Event()
        reaper.soon(lambda: ran.append(1))
        reaper.drain()
        assert ran == [1]

        def keep_queueing() -> None:  # a chore that queues another as long as it lives
            started.set()
            if not release.is_set():
                reaper.soon(keep_queueing)

        reaper.soon(keep_queueing)
        assert started.wait(10)
        done = threading.Event()
        drainer = threading.Thread(target=lambda: (reaper.drain(), done.set()))
        drainer.start()
        assert done.wait(10), "drain() waited for chores queued after it"
        release.set()
        drainer.join(10)
    finally:
        release.set()
        reaper.close()
