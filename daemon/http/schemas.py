"""Request and response bodies of the admin API, as pydantic models (they make the OpenAPI).

The responses that show a record of the store (a slot, a version, a tensor, a
problem, a node's place in the tree) are made from that record's type by
:func:`~.derive.model_of`: their fields are declared once, in ``ctxstore.records``
and ``ctxstore.hierarchy``; here they get only their descriptions. Build one from
a record with :func:`from_record`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from ctxstore.hierarchy import HierarchyStats, NodeInfo
from ctxstore.records import ContextMetadata, Problem, SlotInfo, TensorInfo, VersionInfo
from ctxstore.validation import thaw_json

from ..jobs.records import PRIORITIES
from .derive import model_of, record_fields
from .fields import JSON_INT, Body, Label, SlotId, VersionName, VersionNumber, bounds

# -- errors ---------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    type: str = Field(description="the error's kind, e.g. not_found, invalid_input, conflict")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


# -- hierarchy and groups -------------------------------------------------------------------------


class ParentBody(Body):
    parent: SlotId | None = Field(description="the new parent slot, or null to make a root")


class GroupBody(Body):
    group: Label


class ParentOut(BaseModel):
    slot: int
    parent: int | None


class ChildrenOut(BaseModel):
    slot: int
    children: list[int]


class AncestorsOut(BaseModel):
    slot: int
    ancestors: list[int] = Field(description="from the root down to the parent")


class DescendantsOut(BaseModel):
    slot: int
    descendants: list[int] = Field(description="breadth first")


class RootOut(BaseModel):
    slot: int
    root: int


NodeHierarchyOut = model_of(
    NodeInfo,
    "NodeHierarchyOut",
    doc="GET /nodes/{slot}/hierarchy: a node's whole place in the tree, read at one instant.",
    fields={
        "parent": Field(description="null for a root"),
        "children": Field(description="direct children, by slot"),
        "ancestors": Field(description="from the root down to the parent"),
        "descendants": Field(description="every node below, breadth first"),
        "root": Field(description="the root of the node's tree (itself for a root)"),
        "groups": Field(description="the groups the slot belongs to, by name"),
    },
)


class NodeOut(BaseModel):
    slot: int
    parent: int | None


class HierarchyOut(BaseModel):
    nodes: list[NodeOut]


HierarchyStatsOut = model_of(
    HierarchyStats,
    "HierarchyStatsOut",
    fields={
        "nodes": Field(description="slots with a parent, children or a group (/hierarchy)"),
        "roots": Field(description="nodes without a parent"),
        "max_depth": Field(description="the deepest node's distance from its root"),
        "groups": Field(description="groups with at least one member"),
    },
)


class NodeGroupsOut(BaseModel):
    slot: int
    groups: list[str]


class GroupMembershipOut(BaseModel):
    slot: int
    group: str


class GroupSummary(BaseModel):
    name: str
    members: int


class GroupsOut(BaseModel):
    groups: list[GroupSummary]


class GroupOut(BaseModel):
    name: str
    slots: list[int]


# -- slots and versions ---------------------------------------------------------------------------


SlotOut = model_of(SlotInfo, "SlotOut")


class SlotsOut(BaseModel):
    total: int
    slots: list[SlotOut]  # type: ignore[valid-type]


VersionOut = model_of(VersionInfo, "VersionOut")


class VersionsOut(BaseModel):
    slot: int
    versions: list[VersionOut]  # type: ignore[valid-type]


TensorOut = model_of(
    TensorInfo,
    "TensorOut",
    fields={"checksum": Field(description="xxh3-128 of the .npy file, hex")},
)
VersionDetailOut = model_of(
    ContextMetadata,
    "VersionDetailOut",
    fields={
        "aliases": Field(description="aliases naming this version"),
        "tensors": Field(default=None, description="the tensor table (null when not asked for)"),
    },
    nested={TensorInfo: TensorOut},
)


def from_record(model: type[BaseModel], record: object) -> BaseModel:
    """The response ``model`` (made by :func:`model_of`) holding ``record``'s values."""
    return model.model_validate(record, from_attributes=True)


def version_detail(meta: ContextMetadata) -> BaseModel:
    """The body of one version: the record, with config and metadata as plain JSON."""
    plain = {field: getattr(meta, field) for field in record_fields(ContextMetadata)}
    plain["config"], plain["metadata"] = thaw_json(meta.config), thaw_json(meta.metadata)
    return from_record(VersionDetailOut, plain)


class AliasBody(Body):
    version: VersionNumber | VersionName = Field(
        description="version number, latest, current or another alias"
    )


class AliasOut(BaseModel):
    slot: int
    alias: str
    version: int


class PinOut(BaseModel):
    slot: int
    version: int
    pinned: bool


class RollbackBody(Body):
    version: VersionNumber | VersionName | None = Field(
        default=None, description="target version; null: the version before the current one"
    )


class RollbackOut(BaseModel):
    slot: int
    version: int = Field(description="the slot's current version now")


ProblemOut = model_of(Problem, "ProblemOut")


class VerifyOut(BaseModel):
    ok: bool
    problems: list[ProblemOut]  # type: ignore[valid-type]


# -- operations -----------------------------------------------------------------------------------


class ReaderOut(BaseModel):
    session: int
    pid: int
    name: str
    role: str
    uid: int
    connected_s: float
    last_seen_s: float
    held: dict[str, int] = Field(description="slot -> newest version held")
    lag: dict[str, int] = Field(description="slot -> current minus held (0: up to date)")
    older: dict[str, list[int]] = Field(description="slot -> older versions still mapped")
    uss: int
    pss: int
    acks: int


class ReadersOut(BaseModel):
    readers: list[ReaderOut]


class HealthOut(BaseModel):
    status: str
    cluster: dict[str, Any] | None = Field(
        default=None, description="the scale-out role and its state (docs/scale-out.md)"
    )


class ReadyOut(BaseModel):
    ready: bool
    reasons: list[str] = Field(description="why the daemon is not ready (empty when ready)")
    free_bytes: int | None = Field(description="free space on the store's filesystem")


class JobBody(Body):
    slot: SlotId
    node_type: Label
    config: dict[str, Any] = Field(default_factory=dict)
    priority: Annotated[int, Field(**bounds(PRIORITIES)), JSON_INT] = 0


class JobOut(BaseModel):
    job: dict[str, Any]


class JobsOut(BaseModel):
    jobs: list[dict[str, Any]]
