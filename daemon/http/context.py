"""What every route reaches through FastAPI's dependency: the daemon behind the app.

A route takes ``ctx: Ctx`` and gets the :class:`ApiContext` the app was made
with: the daemon, and the app's metrics and event streams. ``ctx.store`` and
``ctx.committer`` answer 503 while the daemon is starting or stopping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from ctxstore.errors import ClosedError
from ctxstore.store import PersistentStore, StoreView

from ..events import EventBroadcaster
from ..metrics import DaemonMetrics

if TYPE_CHECKING:
    from ..committer import Committer
    from ..server import Daemon


@dataclass(frozen=True, slots=True)
class ApiContext:
    """The daemon behind one API app, and the app's metrics and event streams."""

    daemon: Daemon
    metrics: DaemonMetrics
    events: EventBroadcaster

    @property
    def store(self) -> PersistentStore:
        """The daemon's writer: for the routes that change the store."""
        store = self.daemon.store
        if store is None:
            raise ClosedError("the store is not open")
        return store

    @property
    def view(self) -> StoreView:
        """The store as the read routes see it: the writer's read-only view, no write to name."""
        return self.store.view

    @property
    def committer(self) -> Committer:
        committer = self.daemon.committer
        if committer is None:
            raise ClosedError("the daemon is not committing (starting or stopped)")
        return committer


async def _api_context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.ctxstore
    return context


Ctx = Annotated[ApiContext, Depends(_api_context)]
