"""Hierarchy and group endpoints: /nodes/{slot}/..., /hierarchy, /groups.

A node is any slot that has a parent, children, groups or versions. Reading
an unknown node is a 404; setting a parent or a group creates the node. The
handlers are plain functions: FastAPI runs them in its thread pool, so the
SQL never runs on the daemon's event loop.
"""

from __future__ import annotations

from fastapi import APIRouter, status
from pydantic import BaseModel

from ctxstore.errors import NotFoundError
from ctxstore.store import StoreView

from ..context import Ctx
from ..errors import COMMON_ERRORS, GuardedRoute, errors
from ..fields import GroupPath, SlotPath
from ..schemas import (
    AncestorsOut,
    ChildrenOut,
    DescendantsOut,
    GroupBody,
    GroupMembershipOut,
    GroupOut,
    GroupsOut,
    GroupSummary,
    HierarchyOut,
    HierarchyStatsOut,
    NodeGroupsOut,
    NodeHierarchyOut,
    NodeOut,
    ParentBody,
    ParentOut,
    RootOut,
    from_record,
)

router = APIRouter(route_class=GuardedRoute, responses=COMMON_ERRORS)
NODE_TAG = "hierarchy"
GROUP_TAG = "groups"


def require_node(store: StoreView, slot: int) -> None:
    """NotFoundError unless ``slot`` has a parent, children, groups, versions or a tree entry."""
    tree = store.hierarchy
    if tree.get_parent(slot) is not None or tree.get_children(slot) or tree.get_groups(slot):
        return
    if store.current_version(slot) is not None or slot in tree.nodes():
        return
    raise NotFoundError(
        f"slot {slot} is not a node: it has no parent, children, groups or versions"
    )


# -- hierarchy ------------------------------------------------------------------------------------


@router.post(
    "/nodes/{slot}/parent",
    tags=[NODE_TAG],
    response_model=ParentOut,
    responses=errors(409),
    summary="Set a node's parent (null makes it a root)",
)
def set_parent(slot: SlotPath, body: ParentBody, ctx: Ctx) -> ParentOut:
    ctx.store.hierarchy.set_parent(slot, body.parent)
    return ParentOut(slot=slot, parent=body.parent)


@router.get(
    "/nodes/{slot}/parent",
    tags=[NODE_TAG],
    response_model=ParentOut,
    responses=errors(404),
    summary="A node's parent (null for a root)",
)
def get_parent(slot: SlotPath, ctx: Ctx) -> ParentOut:
    require_node(ctx.view, slot)
    return ParentOut(slot=slot, parent=ctx.view.hierarchy.get_parent(slot))


@router.get(
    "/nodes/{slot}/children",
    tags=[NODE_TAG],
    response_model=ChildrenOut,
    responses=errors(404),
    summary="A node's direct children",
)
def get_children(slot: SlotPath, ctx: Ctx) -> ChildrenOut:
    require_node(ctx.view, slot)
    return ChildrenOut(slot=slot, children=ctx.view.hierarchy.get_children(slot))


@router.get(
    "/nodes/{slot}/ancestors",
    tags=[NODE_TAG],
    response_model=AncestorsOut,
    responses=errors(404),
    summary="A node's ancestors, root first",
)
def get_ancestors(slot: SlotPath, ctx: Ctx) -> AncestorsOut:
    require_node(ctx.view, slot)
    return AncestorsOut(slot=slot, ancestors=ctx.view.hierarchy.get_ancestors(slot))


@router.get(
    "/nodes/{slot}/descendants",
    tags=[NODE_TAG],
    response_model=DescendantsOut,
    responses=errors(404),
    summary="Every node below a node, breadth first",
)
def get_descendants(slot: SlotPath, ctx: Ctx) -> DescendantsOut:
    require_node(ctx.view, slot)
    return DescendantsOut(slot=slot, descendants=ctx.view.hierarchy.get_descendants(slot))


@router.get(
    "/nodes/{slot}/root",
    tags=[NODE_TAG],
    response_model=RootOut,
    responses=errors(404),
    summary="The root of a node's tree (itself for a root)",
)
def get_root(slot: SlotPath, ctx: Ctx) -> RootOut:
    require_node(ctx.view, slot)
    return RootOut(slot=slot, root=ctx.view.hierarchy.get_root(slot))


@router.get(
    "/nodes/{slot}/hierarchy",
    tags=[NODE_TAG],
    response_model=NodeHierarchyOut,
    responses=errors(404),
    summary="A node's parent, children, ancestors, descendants, root and groups in one answer",
)
def get_node_hierarchy(slot: SlotPath, ctx: Ctx) -> BaseModel:
    require_node(ctx.view, slot)
    return from_record(NodeHierarchyOut, ctx.view.hierarchy.info(slot))


@router.get(
    "/hierarchy", tags=[NODE_TAG], response_model=HierarchyOut, summary="Every node and its parent"
)
def get_hierarchy(ctx: Ctx) -> HierarchyOut:
    nodes = ctx.view.hierarchy.nodes()
    return HierarchyOut(nodes=[NodeOut(slot=slot, parent=parent) for slot, parent in nodes.items()])


@router.get(
    "/hierarchy/stats",
    tags=[NODE_TAG],
    response_model=HierarchyStatsOut,
    summary="Node, root and group counts and the deepest level",
)
def get_hierarchy_stats(ctx: Ctx) -> BaseModel:
    return from_record(HierarchyStatsOut, ctx.view.hierarchy.stats())


# -- groups ---------------------------------------------------------------------------------------


@router.post(
    "/nodes/{slot}/groups",
    tags=[GROUP_TAG],
    response_model=GroupMembershipOut,
    status_code=status.HTTP_201_CREATED,
    summary="Add a slot to a group (idempotent)",
)
def add_to_group(slot: SlotPath, body: GroupBody, ctx: Ctx) -> GroupMembershipOut:
    ctx.store.hierarchy.add_to_group(slot, body.group)
    return GroupMembershipOut(slot=slot, group=body.group)


@router.delete(
    "/nodes/{slot}/groups/{name}",
    tags=[GROUP_TAG],
    status_code=status.HTTP_204_NO_CONTENT,
    responses=errors(404),
    summary="Remove a slot from a group",
)
def remove_from_group(slot: SlotPath, name: GroupPath, ctx: Ctx) -> None:
    ctx.store.hierarchy.remove_from_group(slot, name)


@router.get(
    "/nodes/{slot}/groups",
    tags=[GROUP_TAG],
    response_model=NodeGroupsOut,
    responses=errors(404),
    summary="The groups a slot belongs to",
)
def get_node_groups(slot: SlotPath, ctx: Ctx) -> NodeGroupsOut:
    require_node(ctx.view, slot)
    return NodeGroupsOut(slot=slot, groups=ctx.view.hierarchy.get_groups(slot))


@router.get(
    "/groups", tags=[GROUP_TAG], response_model=GroupsOut, summary="Every group and its size"
)
def list_groups(ctx: Ctx) -> GroupsOut:
    groups = ctx.view.hierarchy.list_groups()
    return GroupsOut(groups=[GroupSummary(name=n, members=c) for n, c in groups.items()])


@router.get(
    "/groups/{name}",
    tags=[GROUP_TAG],
    response_model=GroupOut,
    responses=errors(404),
    summary="The slots of a group",
)
def get_group(name: GroupPath, ctx: Ctx) -> GroupOut:
    slots = ctx.view.hierarchy.list_by_group(name)
    if not slots:
        raise NotFoundError(f"group {name!r} has no members")
    return GroupOut(name=name, slots=slots)
