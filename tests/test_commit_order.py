"""The commit protocol's order, checked over the calls a real commit makes.

A recorder wraps os.fsync / os.rename / os.link, SQLite's statement
trace and the daemon's announcer, then an ordering check asserts the commit
protocol (docs/reliability.md): every new tensor file fsynced before the rename, the version
directory (its entries) fsynced before COMMIT, the slot directory fsynced
after the rename and before COMMIT, the announcement after COMMIT. The check
is proven by deliberately broken builds that it must catch (a check that
passes everything proves nothing).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from support.commit_order import Recorder, check_commit_order

from ctxstore import Context, PersistentStore
from ctxstore.daemon.committer import Committer
from ctxstore.messages import Announce


def commit_once(
    store: PersistentStore, recorder: Recorder, context: Context, announce_first: bool = False
) -> list[tuple[str, str]]:
    recorder.events.clear()
    assert store._conn is not None
    store._conn.set_trace_callback(lambda sql: recorder.add("sql", sql.strip()))

    def announce(_: object) -> None:
        recorder.add("announce", "")

    committer = Committer(store, None, announce)
    if announce_first:  # a broken build: tells readers before the version is durable
        real_save = store.save_context

        def save_announcing_first(*args: object, **kw: object) -> int:
            announce(None)
            return real_save(*args, **kw)  # type: ignore[arg-type]

        store.save_context = save_announcing_first  # type: ignore[method-assign]
    try:
        asyncio.run(committer.commit(1, context))
    finally:
        store._conn.set_trace_callback(None)
        store.__dict__.pop("save_context", None)
    return list(recorder.events)


def ctx(seed: int) -> Context:
    rng = np.random.default_rng(seed)
    return Context({"a": rng.standard_normal(64), "b": rng.standard_normal(8), "same": np.ones(4)})


def test_real_commits_follow_the_protocol(tmp_path: Path, recorder: Recorder) -> None:
    with PersistentStore(tmp_path / "store") as store:
        for seed in range(3):  # later commits hard-link the unchanged tensor
            events = commit_once(store, recorder, ctx(seed))
            assert check_commit_order(events) == [], events


Breakage = Callable[[pytest.MonkeyPatch], object]


def _skip_file_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctxstore.store.commit as store_module

    real = store_module.fsync_all
    monkeypatch.setattr(
        store_module, "fsync_all", lambda paths, **kw: real([p for p in paths if os.path.isdir(p)])
    )


def _skip_dir_fsyncs(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctxstore.store.commit as store_module

    real = store_module.fsync_all
    monkeypatch.setattr(store_module, "fsync_dir", lambda path: None)
    monkeypatch.setattr(
        store_module,
        "fsync_all",
        lambda paths, **kw: real([p for p in paths if not os.path.isdir(p)]),
    )


def _sync_staging_too_early(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The staging directory fsynced when taken, before its files exist (and not after)."""
    import ctxstore.store.commit as store_module

    real_take = PersistentStore._take_spare_staging
    real_sync_dir = store_module.fsync_dir
    synced_early: list[str] = []

    def take(self: PersistentStore) -> str | None:
        staging = real_take(self)
        if staging is not None:  # (close() takes it too, to remove it)
            real_sync_dir(staging)
            synced_early.append(staging)
        return staging

    monkeypatch.setattr(PersistentStore, "_take_spare_staging", take)
    monkeypatch.setattr(
        store_module,
        "fsync_dir",
        lambda path: None if "wal" in Path(path).parts else real_sync_dir(path),
    )
    return synced_early


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (_skip_file_fsync, "was not fsynced before the rename"),
        (_skip_dir_fsyncs, "directory"),
        (_sync_staging_too_early, "after its entries"),
    ],
)
def test_the_check_catches_a_build_that_skips_an_fsync(
    tmp_path: Path, recorder: Recorder, monkeypatch: pytest.MonkeyPatch,
    breakage: Breakage, expected: str,
) -> None:  # fmt: skip
    with PersistentStore(tmp_path / "store") as store:
        store.save_context(1, ctx(6))  # so the checked commit takes a spare staging directory
        store.wait_background()
        evidence = breakage(monkeypatch)
        problems = check_commit_order(commit_once(store, recorder, ctx(7)))
        if evidence is not None:  # the breakage says what it did: it must have done it
            assert evidence, "the breakage never took effect"
    assert any(expected in p for p in problems), problems


def test_the_check_catches_announcing_before_commit(tmp_path: Path, recorder: Recorder) -> None:
    with PersistentStore(tmp_path / "store") as store:
        problems = check_commit_order(commit_once(store, recorder, ctx(1), announce_first=True))
    assert "announced before COMMIT" in problems


def test_the_table_and_the_announcement_come_before_the_chores_after_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 21: warming (and retention after it) follow the version table bump and the
    announcement. The store's warming is made to block until the event loop has the
    announcement: on a build that warms first it would wait for good (bounded here)."""
    import threading

    from ctxstore.versiontable import VersionTable

    announced = threading.Event()
    seen_while_warming: list[int | None] = []
    with PersistentStore(tmp_path / "store") as store:
        store.save_context(1, ctx(1))
        table = VersionTable.create(f"/ctxtest-order-{os.getpid()}", capacity=8)
        try:
            real_warm = store._warm

            def warm(slot: int, version: int, positions: list[int]) -> None:
                seen_while_warming.append(table.get(slot))
                seen_while_warming.append(int(announced.wait(10.0)))
                real_warm(slot, version, positions)

            monkeypatch.setattr(store, "_warm", warm)
            announcements: list[Announce] = []

            def announce(message: Announce) -> None:
                announcements.append(message)
                announced.set()

            committer = Committer(store, table, announce)
            version = asyncio.run(committer.commit(1, ctx(2)))
        finally:
            table.close()
            table.unlink()
    assert version == 2
    assert seen_while_warming == [2, 1]  # the table said 2, and the loop had announced it
    assert [(a.slot, a.version) for a in announcements] == [(1, 2)]
