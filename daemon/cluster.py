"""Wiring of the scale-out roles into the daemon (``--origin``, ``--follow``, ``--feed``).

A writer with ``origin`` runs an :class:`~ctxstore.origin.uploader.Uploader`,
told of every announced change; a follower with ``follow`` runs a
:class:`~ctxstore.origin.follower.Follower` that commits through the daemon's
committer, and the daemon refuses local writes (:func:`refuse_local_write`).
The origin package (boto3, nats-py: the ``cluster`` extra) is imported only here
and only when one of the roles is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctxstore.errors import PermissionDeniedError

from .committer import Committer
from .config import DaemonConfig

if TYPE_CHECKING:
    from ctxstore.origin.feed import Feed
    from ctxstore.origin.follower import Follower
    from ctxstore.origin.uploader import Uploader
    from ctxstore.store import PersistentStore

log = logging.getLogger(__name__)

#: where the writer's outbox and the follower's state live, inside the store directory
#: (the store's own recovery and verify look only at slots/, wal/ and the index)
STATE_DIR_NAME = "origin"


def state_dir(config: DaemonConfig) -> Path:
    return config.store / STATE_DIR_NAME


def refuse_local_write(config: DaemonConfig, what: str) -> None:
    """PermissionDeniedError naming the origin when this daemon is a follower."""
    if config.follow:
        raise PermissionDeniedError(
            f"this daemon follows {config.follow}: it takes no local {what}; "
            "publish on the writer daemon of that origin"
        )


class Cluster:
    """The role this daemon plays beyond its host, and the task that plays it."""

    def __init__(self) -> None:
        self.uploader: Uploader | None = None
        self.follower: Follower | None = None
        self._task: asyncio.Task[None] | None = None
        self._feed: Feed | None = None
        #: "writer" or "follower" (None: this daemon serves its host alone)
        self.role: str | None = None
        self.origin: str | None = None
        self.feed_url: str | None = None

    @classmethod
    def start(cls, config: DaemonConfig, store: PersistentStore, committer: Committer) -> Cluster:
        """The role ``config`` names, started in the background (no role: nothing runs).

        boto3 takes seconds of CPU to build a client: that happens in a worker thread,
        so the daemon serves its socket meanwhile. A change announced before the
        uploader exists is found by its start-up pass over every slot.
        """
        cluster = cls()
        cluster.role = "writer" if config.origin else "follower" if config.follow else None
        cluster.origin = config.origin or config.follow
        cluster.feed_url = config.feed
        if config.origin or config.follow:
            cluster._task = asyncio.ensure_future(cluster._run(config, store, committer))
            cluster._task.add_done_callback(_report_end)
        return cluster

    async def _run(
        self, config: DaemonConfig, store: PersistentStore, committer: Committer
    ) -> None:
        from ctxstore.origin.feed import Feed
        from ctxstore.origin.layout import Origin
        from ctxstore.origin.s3 import OriginClient

        url = config.origin or config.follow
        assert url is not None
        client = await asyncio.to_thread(
            OriginClient,
            Origin.parse(url),
            part_size=config.origin_part_size,
            concurrency=config.origin_concurrency,
            objects_at_once=config.origin_upload_concurrency if config.origin else 1,
        )
        feed = None
        if config.feed:
            feed = Feed(config.feed, bucket=config.feed_bucket,
                        creds=str(config.feed_creds) if config.feed_creds else None)  # fmt: skip
        self._feed = feed
        if config.origin:
            from ctxstore.origin.outbox import Outbox
            from ctxstore.origin.uploader import Uploader

            outbox = Outbox(state_dir(config) / "outbox")
            width = config.origin_upload_concurrency
            self.uploader = Uploader(store, client, outbox, feed, upload_concurrency=width)
            log.info("writer for origin %s (%s), feed %s", url, client.endpoint, config.feed)
            await self.uploader.run()
        else:
            from ctxstore.origin.follower import Follower
            from ctxstore.origin.polling import PollPolicy

            policy = PollPolicy(
                config.follow_poll_interval,
                config.follow_poll_jitter,
                config.follow_poll_backoff_max,
                config.follow_pull_jitter,
            )
            self.follower = Follower(
                store, committer, client, state_dir(config), feed, policy=policy
            )  # fmt: skip
            log.info("following origin %s (%s), feed %s", url, client.endpoint, config.feed)
            await self.follower.run()

    def summary(self) -> dict[str, Any] | None:
        """The role's state for ``ctxstore status``, /health and the metrics (None: no role).

        In memory only (no I/O but the outbox's directory listing): cheap on the loop.
        """
        if self.role is None:
            return None
        feed = self._feed
        body: dict[str, Any] = {
            "role": self.role,
            "origin": self.origin,
            "feed": self.feed_url,
            "feed_connected": None if feed is None else feed.connected,
            "started": self.uploader is not None or self.follower is not None,
        }
        if self.uploader is not None:
            up = self.uploader.stats
            try:
                outbox: int | None = len(self.uploader.outbox.pending())
            except OSError:
                outbox = None
            body |= {
                "outbox": outbox,
                "heads": {str(slot): version for slot, (_, version) in sorted(up.heads.items())},
                "objects_uploaded": up.objects_uploaded,
                "bytes_uploaded": up.bytes_uploaded,
                "manifests_written": up.manifests_written,
                "heads_moved": up.heads_moved,
                "last_error": up.last_error,
            }
        if self.follower is not None:
            down = self.follower.stats
            body |= {
                "applied": {str(slot): v for slot, v in sorted(self.follower.applied.items())},
                "versions_pulled": down.versions_pulled,
                "objects_downloaded": down.objects_downloaded,
                "bytes_downloaded": down.bytes_downloaded + down.record_bytes,
                "tensors_reused": down.tensors_reused,
                "refused": down.refused,
                "poll_failures": self.follower.poll_failures,
                "last_error": down.last_error,
            }
        return body

    def changed(self, slot: int) -> None:
        """A slot's commit or pointer move was announced."""
        if self.uploader is not None:
            self.uploader.changed(slot)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        feed, self._feed = self._feed, None
        if feed is not None:
            await feed.close()


def _report_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the scale-out task ended: %s", task.exception())
