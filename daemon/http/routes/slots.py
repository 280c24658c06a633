"""Slot and version endpoints: listings, metadata, aliases, pins, rollback, verify.

Pointer moves go through the daemon, never straight to the store: a rollback
is ``Committer.move_pointer`` (it bumps the version table and announces), an
alias move is committed and then announced, so readers and ``/events`` hear
of both. Reads are plain functions run in FastAPI's thread pool; the async
handlers hand their SQL to a thread themselves.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, status
from pydantic import BaseModel

from ctxstore.checks import Integer
from ctxstore.errors import NotFoundError

from ..context import Ctx
from ..errors import COMMON_ERRORS, GuardedRoute, errors
from ..fields import AliasPath, LabelQuery, SlotPath, SlotQuery, VersionPath, bounds
from ..schemas import (
    AliasBody,
    AliasOut,
    PinOut,
    ProblemOut,
    RollbackBody,
    RollbackOut,
    SlotOut,
    SlotsOut,
    VerifyOut,
    VersionDetailOut,
    VersionOut,
    VersionsOut,
    from_record,
    version_detail,
)

router = APIRouter(route_class=GuardedRoute, responses=COMMON_ERRORS)
TAG = "slots"
#: how many slots one page of GET /slots lists
PAGE = Integer(1, 10_000)


@router.get("/slots", tags=[TAG], response_model=SlotsOut, summary="List slots, filtered")
def list_slots(
    ctx: Ctx,
    model_type: LabelQuery = None,
    group: LabelQuery = None,
    offset: SlotQuery = 0,
    limit: Annotated[int, Query(**bounds(PAGE))] = 1000,
) -> SlotsOut:
    slots = ctx.view.list_slots(model_type=model_type, group=group)
    page = slots[offset : offset + limit]
    return SlotsOut(total=len(slots), slots=[from_record(SlotOut, info) for info in page])


@router.get(
    "/slots/{slot}",
    tags=[TAG],
    response_model=VersionDetailOut,
    responses=errors(404),
    summary="The current version's model type, config and metadata",
)
def get_slot(slot: SlotPath, ctx: Ctx) -> BaseModel:
    return version_detail(ctx.view.get_metadata(slot, None, tensors=False))


@router.get(
    "/slots/{slot}/versions",
    tags=[TAG],
    response_model=VersionsOut,
    responses=errors(404),
    summary="The slot's stored versions, oldest first",
)
def list_versions(slot: SlotPath, ctx: Ctx) -> VersionsOut:
    versions = ctx.view.list_versions(slot)
    return VersionsOut(slot=slot, versions=[from_record(VersionOut, info) for info in versions])


@router.get(
    "/slots/{slot}/versions/{version}",
    tags=[TAG],
    response_model=VersionDetailOut,
    responses=errors(404),
    summary="One version's metadata and tensor table (a number, latest, current or an alias)",
)
def get_version(slot: SlotPath, version: VersionPath, ctx: Ctx) -> BaseModel:
    return version_detail(ctx.view.get_metadata(slot, version, tensors=True))


@router.put(
    "/slots/{slot}/aliases/{name}",
    tags=[TAG],
    response_model=AliasOut,
    responses=errors(404),
    summary="Point an alias at a version (announced to subscribers)",
)
async def set_alias(slot: SlotPath, name: AliasPath, body: AliasBody, ctx: Ctx) -> AliasOut:
    committer = ctx.committer
    number = await asyncio.to_thread(ctx.store.set_alias, slot, name, body.version)
    committer.announce_aliases(slot, {name: number})
    return AliasOut(slot=slot, alias=name, version=number)


@router.delete(
    "/slots/{slot}/aliases/{name}",
    tags=[TAG],
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(404),
    summary="Delete an alias",
)
async def delete_alias(slot: SlotPath, name: AliasPath, ctx: Ctx) -> None:
    await asyncio.to_thread(ctx.store.delete_alias, slot, name)
    ctx.daemon.cluster.changed(slot)  # a writer's origin drops it too (docs/scale-out.md)


@router.post(
    "/slots/{slot}/versions/{version}/pin",
    tags=[TAG],
    response_model=PinOut,
    responses=errors(404),
    summary="Keep a version through retention",
)
def pin(slot: SlotPath, version: VersionPath, ctx: Ctx) -> PinOut:
    return PinOut(slot=slot, version=ctx.store.pin(slot, version), pinned=True)


@router.delete(
    "/slots/{slot}/versions/{version}/pin",
    tags=[TAG],
    response_model=PinOut,
    responses=errors(404),
    summary="Let retention remove a version again",
)
def unpin(slot: SlotPath, version: VersionPath, ctx: Ctx) -> PinOut:
    return PinOut(slot=slot, version=ctx.store.unpin(slot, version), pinned=False)


@router.post(
    "/slots/{slot}/rollback",
    tags=[TAG],
    response_model=RollbackOut,
    responses=errors(404),
    summary="Move the current pointer (default: to the previous version); announced",
)
async def rollback(slot: SlotPath, ctx: Ctx, body: RollbackBody | None = None) -> RollbackOut:
    target = None if body is None else body.version
    number = await ctx.committer.move_pointer(slot, target)
    return RollbackOut(slot=slot, version=number)


@router.post(
    "/verify",
    tags=[TAG],
    response_model=VerifyOut,
    summary="Check every slot: rows against files, checksums, the index",
)
async def verify_all(ctx: Ctx, rehash: bool = True) -> VerifyOut:
    return await _verify(ctx, None, rehash)


@router.post(
    "/slots/{slot}/verify",
    tags=[TAG],
    response_model=VerifyOut,
    responses=errors(404),
    summary="Check one slot's versions: files, sizes and checksums",
)
async def verify_slot(slot: SlotPath, ctx: Ctx, rehash: bool = True) -> VerifyOut:
    if await asyncio.to_thread(ctx.view.current_version, slot) is None:
        raise NotFoundError(f"slot {slot} has no versions")
    return await _verify(ctx, slot, rehash)


async def _verify(ctx: Ctx, slot: int | None, rehash: bool) -> VerifyOut:
    problems = await asyncio.to_thread(ctx.view.verify, slot, rehash=rehash)
    ctx.metrics.observe_verify(len(problems))
    return VerifyOut(ok=not problems, problems=[from_record(ProblemOut, p) for p in problems])
