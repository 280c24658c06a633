"""Request and response bodies of the admin API, as pydantic models (they make the OpenAPI).

Identifiers carry the same bounds and patterns as ``ctxstore.validation``, so
the schema tells clients what the store will accept; the store still checks
everything itself. Either refusal is a 400 ``invalid_input`` whose message
names the field (``api_base.invalid_request`` words pydantic's errors).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Path, Query
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticKnownError

from ctxstore.records import ContextMetadata, Problem, SlotInfo, TensorInfo, VersionInfo
from ctxstore.validation import MAX_SLOT, thaw_json

#: a label (group, alias, model type): a letter, then up to 63 of [A-Za-z0-9_.-], no ".."
LABEL_PATTERN = r"^(?!.*\.\.)[A-Za-z][A-Za-z0-9_.-]{0,63}$"
#: an alias a user may set: a label other than the reserved ``latest`` and ``current``
ALIAS_PATTERN = r"^(?!(latest|current)$)(?!.*\.\.)[A-Za-z][A-Za-z0-9_.-]{0,63}$"
#: a version reference: a number, ``latest``, ``current`` or an alias
VERSION_REF_PATTERN = r"^([1-9][0-9]{0,14}|(?!.*\.\.)[A-Za-z][A-Za-z0-9_.-]{0,63})$"
#: version numbers and ids the API takes: bounds a JSON double holds exactly, so that
#: clients (and schema tools) that read numbers as doubles agree with the server
MAX_API_VERSION = 10**15 - 1
MAX_API_ID = 2**53 - 1


def _json_integer(value: object) -> object:
    """JSON integers only: 3 and 3.0 (JSON Schema calls both integers), not true or "3"."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticKnownError("int_type")  # the error pydantic's own strict int gives
    return value


_JSON_INT = BeforeValidator(_json_integer)
SlotId = Annotated[int, Field(ge=0, le=MAX_SLOT), _JSON_INT]
VersionNumber = Annotated[int, Field(ge=1, le=MAX_API_VERSION), _JSON_INT]
# Names are checked by ctxstore.validation (a 400 with its message); the patterns only
# document them in the schema (pydantic's regex engine has no look-ahead).
Label = Annotated[str, Field(json_schema_extra={"pattern": LABEL_PATTERN})]
VersionName = Annotated[str, Field(json_schema_extra={"pattern": VERSION_REF_PATTERN})]

SlotPath = Annotated[int, Path(ge=0, le=MAX_SLOT, description="slot id, 0 to 2**31-1")]
VersionPath = Annotated[
    str,
    Path(
        json_schema_extra={"pattern": VERSION_REF_PATTERN},
        description="version number, latest, current or an alias",
    ),
]
AliasPath = Annotated[
    str, Path(json_schema_extra={"pattern": ALIAS_PATTERN}, description="alias name")
]
GroupPath = Annotated[
    str, Path(json_schema_extra={"pattern": LABEL_PATTERN}, description="group name")
]
LabelQuery = Annotated[str | None, Query(json_schema_extra={"pattern": LABEL_PATTERN})]


class Body(BaseModel):
    """Request bodies refuse unknown keys, so a typo is an error rather than a no-op."""

    model_config = ConfigDict(extra="forbid")


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


class NodeHierarchyOut(BaseModel):
    """GET /nodes/{slot}/hierarchy: a node's whole place in the tree, read at one instant."""

    slot: int
    parent: int | None = Field(description="null for a root")
    children: list[int] = Field(description="direct children, by slot")
    ancestors: list[int] = Field(description="from the root down to the parent")
    descendants: list[int] = Field(description="every node below, breadth first")
    root: int = Field(description="the root of the node's tree (itself for a root)")
    groups: list[str] = Field(description="the groups the slot belongs to, by name")


class NodeOut(BaseModel):
    slot: int
    parent: int | None


class HierarchyOut(BaseModel):
    nodes: list[NodeOut]


class HierarchyStatsOut(BaseModel):
    nodes: int = Field(description="slots with a parent, children or a group (/hierarchy)")
    roots: int = Field(description="nodes without a parent")
    max_depth: int = Field(description="the deepest node's distance from its root")
    groups: int = Field(description="groups with at least one member")


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


class SlotOut(BaseModel):
    slot: int
    model_type: str | None
    current_version: int | None
    latest_version: int | None
    n_versions: int
    created_at: float
    updated_at: float

    @classmethod
    def of(cls, info: SlotInfo) -> SlotOut:
        return cls(
            slot=info.slot,
            model_type=info.model_type,
            current_version=info.current_version,
            latest_version=info.latest_version,
            n_versions=info.n_versions,
            created_at=info.created_at,
            updated_at=info.updated_at,
        )


class SlotsOut(BaseModel):
    total: int
    slots: list[SlotOut]


class VersionOut(BaseModel):
    slot: int
    version: int
    created_at: float
    n_tensors: int
    nbytes: int
    pinned: bool
    aliases: list[str]

    @classmethod
    def of(cls, info: VersionInfo) -> VersionOut:
        return cls(
            slot=info.slot,
            version=info.version,
            created_at=info.created_at,
            n_tensors=info.n_tensors,
            nbytes=info.nbytes,
            pinned=info.pinned,
            aliases=list(info.aliases),
        )


class VersionsOut(BaseModel):
    slot: int
    versions: list[VersionOut]


class TensorOut(BaseModel):
    position: int
    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    checksum: str = Field(description="xxh3-128 of the .npy file, hex")

    @classmethod
    def of(cls, info: TensorInfo) -> TensorOut:
        return cls(
            position=info.position,
            name=info.name,
            dtype=info.dtype,
            shape=list(info.shape),
            nbytes=info.nbytes,
            checksum=info.checksum,
        )


class VersionDetailOut(BaseModel):
    slot: int
    version: int
    model_type: str | None
    current_version: int | None
    created_at: float
    pinned: bool
    aliases: list[str] = Field(description="aliases naming this version")
    config: dict[str, Any]
    metadata: dict[str, Any]
    tensors: list[TensorOut] | None = Field(
        default=None, description="the tensor table (null when not asked for)"
    )

    @classmethod
    def of(cls, meta: ContextMetadata) -> VersionDetailOut:
        return cls(
            slot=meta.slot,
            version=meta.version,
            model_type=meta.model_type,
            current_version=meta.current_version,
            created_at=meta.created_at,
            pinned=meta.pinned,
            aliases=list(meta.aliases),
            config=_plain(meta.config),
            metadata=_plain(meta.metadata),
            tensors=None if meta.tensors is None else [TensorOut.of(t) for t in meta.tensors],
        )


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


class ProblemOut(BaseModel):
    kind: str
    detail: str
    slot: int | None
    version: int | None
    tensor: str | None

    @classmethod
    def of(cls, problem: Problem) -> ProblemOut:
        return cls(**problem.as_dict())


class VerifyOut(BaseModel):
    ok: bool
    problems: list[ProblemOut]


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


class ReadyOut(BaseModel):
    ready: bool
    reasons: list[str] = Field(description="why the daemon is not ready (empty when ready)")
    free_bytes: int | None = Field(description="free space on the store's filesystem")


class JobBody(Body):
    slot: SlotId
    node_type: Label
    config: dict[str, Any] = Field(default_factory=dict)
    priority: Annotated[int, Field(ge=-(2**31), le=2**31 - 1), _JSON_INT] = 0


class JobOut(BaseModel):
    job: dict[str, Any]


class JobsOut(BaseModel):
    jobs: list[dict[str, Any]]


def _plain(value: Mapping[str, Any]) -> dict[str, Any]:
    plain = thaw_json(value)
    assert isinstance(plain, dict)
    return plain
