"""Operator endpoints: /health, /ready, /readers, /metrics and the /events stream."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ...status_rows import reader_rows
from ..context import ApiContext, Ctx
from ..errors import COMMON_ERRORS, GuardedRoute
from ..fields import SlotQuery
from ..schemas import HealthOut, ReadersOut, ReadyOut

router = APIRouter(route_class=GuardedRoute, responses=COMMON_ERRORS)
TAG = "operations"
MAX_EVENT_SLOTS = 1000


@router.get(
    "/health",
    tags=[TAG],
    response_model=HealthOut,
    response_model_exclude_none=True,  # no scale-out role: {"status": "ok"} as ever
    summary="Liveness: the loop answers (and a scale-out role's state)",
)
async def health(ctx: Ctx) -> HealthOut:
    return HealthOut(status="ok", cluster=ctx.daemon.cluster.summary())


@router.get(
    "/ready",
    tags=[TAG],
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut, "description": "not ready; reasons say why"}},
    summary="Readiness: store open, socket listening, enough free disk",
)
async def ready(ctx: Ctx) -> JSONResponse:
    reasons, free = await asyncio.to_thread(readiness, ctx)
    body = ReadyOut(ready=not reasons, reasons=reasons, free_bytes=free)
    return JSONResponse(body.model_dump(), status_code=503 if reasons else 200)


def readiness(ctx: ApiContext) -> tuple[list[str], int | None]:
    """What keeps the daemon from being ready (nothing: ready), and the free bytes."""
    daemon, reasons = ctx.daemon, []
    if daemon.stopping:
        reasons.append("the daemon is stopping")
    if not daemon.listening:
        reasons.append(f"the socket {daemon.config.socket} is not listening")
    store = daemon.store
    if store is None:
        reasons.append("the store is not open")
        return reasons, None
    try:
        store.current_versions()
    except Exception as exc:  # any failure to read the index means not ready
        reasons.append(f"the store's index cannot be read: {exc}")
    try:
        fs = os.statvfs(store.root)
    except OSError as exc:
        reasons.append(f"cannot stat the store's filesystem: {exc.strerror}")
        return reasons, None
    free = fs.f_bavail * fs.f_frsize
    minimum = daemon.config.ready_min_free_bytes
    if free < minimum:
        reasons.append(
            f"{free} bytes free on the store's filesystem, below ready_min_free_bytes {minimum}"
        )
    return reasons, free


@router.get(
    "/readers",
    tags=[TAG],
    response_model=ReadersOut,
    summary="Connected peers: pid, name, versions held, lag, USS and PSS",
)
def readers(ctx: Ctx) -> ReadersOut:
    current = ctx.view.current_versions()
    rows = reader_rows(ctx.daemon.fleet.snapshot(), current, time.time())
    return ReadersOut.model_validate({"readers": rows})


@router.get(
    "/metrics",
    tags=[TAG],
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics (text exposition format)",
)
async def metrics(ctx: Ctx) -> Response:
    # on the loop: the live collector reads loop-owned state (fleet, job queue)
    return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/events",
    tags=[TAG],
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
    summary="Server-Sent Events: one `announce` event per commit, rollback or alias move "
    "(503 past limits.event_streams open streams)",
)
async def events(
    ctx: Ctx,
    slot: Annotated[
        list[SlotQuery] | None,
        Query(max_length=MAX_EVENT_SLOTS, description="only these slots (repeat the parameter)"),
    ] = None,
) -> StreamingResponse:
    stream = ctx.events.subscribe(slot)  # before the response starts: nothing is missed
    return StreamingResponse(
        stream.frames(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
