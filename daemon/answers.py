"""The requests a session hands to the server, answered beside the event loop.

A :class:`~.session.Session` decides that a peer may publish, ask for status
or repair; :class:`Answers` does the work (the commit, the SQL and hashing in
worker threads) and sends the reply on the peer's connection: ``Published``
(with ``Progress`` frames while it runs, when asked), ``Status``,
``Repaired``, or a non-fatal ``Error`` naming what went wrong. A request is
never left unanswered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ctxstore.errors import CtxStoreError
from ctxstore.store import PersistentStore
from ctxstore.wire import (
    Progress,
    Published,
    RepairRequest,
    Status,
    StatusRequest,
    error_for,
)

from .cluster import refuse_local_write
from .committer import Committer, PublishProgress, PublishRequest, Requester
from .config import DaemonConfig
from .fleet import Fleet
from .logs import peer_events
from .session import repaired_answer
from .status_rows import build_status, reader_rows, slot_rows
from .subscriber import Subscriber

log = logging.getLogger("ctxstore.daemon")

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class Answers:
    """Publish, status and repair requests, answered on the connection that asked."""

    def __init__(
        self,
        store: PersistentStore,
        committer: Committer,
        fleet: Fleet,
        *,
        config: Callable[[], DaemonConfig],
        spawn: Spawn,
        daemon_row: Callable[[], dict[str, Any]],
        on_verify: Callable[[int], None] | None = None,
    ) -> None:
        self._store = store
        self._committer = committer
        self._fleet = fleet
        self._config = config  # the one in force: a reload replaces it
        self._spawn = spawn
        self._daemon_row = daemon_row
        self._on_verify = on_verify

    async def publish(self, sub: Subscriber, request: PublishRequest) -> None:
        """Commit one publish request and answer it. While it runs, the peer is not
        dropped for silence (it is waiting for us), and is sent Progress frames if it
        asked for them."""
        config = self._config()
        who = Requester(sub.peer.uid, config.import_roots, config.import_limits())
        progress = PublishProgress()
        sub.requests_in_flight += 1
        ticker = _ProgressTicker(sub, request, progress, self._config) if request.progress else None
        try:
            refuse_local_write(config, "publishes")  # a follower takes no local writes
            version = await self._committer.publish(request, who, progress)
        except CtxStoreError as exc:
            peer_events.log(
                "publish refused",
                logging.WARNING,
                "session %d: publish to slot %d refused: %s",
                sub.session,
                request.slot,
                exc,
            )
            sub.send(error_for(exc, request_id=request.request_id, fatal=False))
            return
        except Exception as exc:
            log.exception("session %d: publish to slot %d failed", sub.session, request.slot)
            sub.send(error_for(exc, request_id=request.request_id, fatal=False))
            return
        finally:
            sub.requests_in_flight -= 1
            if ticker is not None:
                ticker.cancel()
        sub.send(Published(request_id=request.request_id, slot=request.slot, version=version))

    async def admin(self, sub: Subscriber, request: StatusRequest | RepairRequest) -> None:
        """The requests answered from a worker thread, beside the loop: status, repair."""
        if isinstance(request, StatusRequest):
            await self._send_status(sub, request.request_id)
        else:
            await self._repair(sub, request)

    async def _send_status(self, sub: Subscriber, request_id: int) -> None:
        """Answer StatusRequest: the process, every other peer, every slot (SQL off the loop).

        The asking connection is left out of the rows and the counts: it wants to
        know who else is there, and its row would take a place another's could have.
        """
        store, fleet = self._store, self._fleet
        daemon = self._daemon_row()
        daemon["subscribers"] -= 1  # the others: not the asker
        max_frame_size = self._config().max_frame_size

        def build() -> Status:  # in a worker thread: SQL, and rows that may number 10,000
            # Anything that fails in here is answered with an error frame: a status request
            # is never left unanswered.
            slots, total = slot_rows(store)
            others = [peer for peer in fleet.snapshot() if peer.session != sub.session]
            readers = reader_rows(others, store.current_versions(), time.time())
            return build_status(
                request_id, daemon, readers, slots, slots_total=total, max_frame_size=max_frame_size
            )

        try:
            status = await asyncio.to_thread(build)
        except Exception as exc:
            log.exception("session %d: status failed", sub.session)
            sub.send(error_for(exc, request_id=request_id, fatal=False))
            return
        sub.send(status)

    async def _repair(self, sub: Subscriber, request: RepairRequest) -> None:
        """Answer RepairRequest: verify (off the loop, re-hashing), then move damaged current
        versions back under the commit lock and announce the moves (``ctxstore verify
        --repair`` beside a running daemon). The session let only publishers ask."""
        store, scope = self._store, "every slot" if request.slot is None else f"slot {request.slot}"
        try:
            problems = await asyncio.to_thread(store.verify, request.slot)
            if self._on_verify is not None:
                self._on_verify(len(problems))
            repairs = await self._committer.repair(request.slot, problems)
        except CtxStoreError as exc:
            log.warning("session %d: repair of %s refused: %s", sub.session, scope, exc)
            sub.send(error_for(exc, request_id=request.request_id, fatal=False))
            return
        except Exception as exc:
            log.exception("session %d: repair of %s failed", sub.session, scope)
            sub.send(error_for(exc, request_id=request.request_id, fatal=False))
            return
        log.info(
            "session %d: repair of %s: %d problem(s); moved %s", sub.session, scope,
            len(problems), [(r.slot, r.from_version, r.to_version) for r in repairs] or "nothing",
        )  # fmt: skip
        max_frame_size = self._config().max_frame_size
        sub.send(
            repaired_answer(request.request_id, problems, repairs, max_frame_size=max_frame_size)
        )


class _ProgressTicker:
    """Every ``publish_progress_interval`` while a publish runs: a Progress frame for it.

    A timer on the loop, not a task: a publish is usually answered before the
    first tick, and a task per publish cost more than the rest of its answer.
    """

    def __init__(
        self,
        sub: Subscriber,
        request: PublishRequest,
        progress: PublishProgress,
        config: Callable[[], DaemonConfig],
    ) -> None:
        self._sub, self._request, self._progress, self._config = sub, request, progress, config
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(config().publish_progress_interval, self._tick)

    def _tick(self) -> None:
        if self._sub.closed:
            return
        progress = self._progress
        self._sub.send(
            Progress(
                request_id=self._request.request_id,
                stage=progress.stage,
                done=progress.done,
                total=progress.total,
                elapsed=round(time.monotonic() - progress.started, 3),
            )
        )
        self._handle = self._loop.call_later(self._config().publish_progress_interval, self._tick)

    def cancel(self) -> None:
        self._handle.cancel()
