"""daemon/wiring.py: the writer graph gets its settings and collaborators through constructors."""

from __future__ import annotations

from pathlib import Path

from ctxstore.daemon.config import DaemonConfig
from ctxstore.daemon.hooks import Hooks
from ctxstore.daemon.wiring import build_writer
from ctxstore.store import PersistentStore
from ctxstore.wire import Announce


def test_build_writer_hands_each_part_its_settings_and_collaborators(tmp_path: Path) -> None:
    config = DaemonConfig(
        store=tmp_path / "store",
        socket=tmp_path / "ctx.sock",
        verify_after_commit=False,
        reread_after_commit=True,
        max_publish_bytes=1 << 20,
        jobs_max_attempts=7,
        damage_recheck_interval=5.0,
    )
    announced: list[Announce] = []
    observed: list[tuple[int, int, float]] = []

    def observe(slot: int, version: int, seconds: float) -> None:
        observed.append((slot, version, seconds))

    store = PersistentStore(config.store)
    try:
        writer = build_writer(
            store, None, config=lambda: config, announce=announced.append, hooks=Hooks,
            on_commit=observe,
        )  # fmt: skip
        committer = writer.committer
        assert (committer.store, committer.table) == (store, None)
        assert (committer.verify_after_commit, committer.reread_after_commit) == (False, True)
        assert committer.max_publish_bytes == 1 << 20
        assert committer.on_commit is observe and committer.post_commit is not None
        assert writer.jobs.max_attempts == 7
        assert writer.damage._committer is committer
        assert writer.damage._recheck_interval() == 5.0
    finally:
        store.close()
