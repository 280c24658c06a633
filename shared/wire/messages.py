"""The messages of the ctxstore socket protocol: one frozen record per frame type.

Every frame body is a msgpack map ``{"type": <name>, <field>: <value>, ...}``
holding exactly the fields of one record below, in the order they are declared.
Each field is declared once, with its check and wire form (the ``Annotated``
aliases of :mod:`ctxstore.wire.fields`); :func:`~ctxstore.wire.record.message` derives the record's
checks from those declarations. On the wire, maps only ever have string keys,
so slot -> version tables travel as arrays of ``[slot, version]`` pairs.
docs/protocol.md is the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Final

from ..errors import RemoteError
from .fields import (
    AbsolutePath,
    Alias,
    AliasVersions,
    AnnouncedRecord,
    ErrorKind,
    ErrorText,
    Flag,
    Groups,
    Held,
    Json,
    ModelType,
    NodeType,
    PeerName,
    PeerRole,
    Pid,
    Protocol,
    PublishKey,
    Reason,
    RequestId,
    RequestIdOrNone,
    Rows,
    Seconds,
    Serial,
    ShmName,
    Size,
    Slot,
    SlotOrAll,
    Slots,
    Stage,
    StatusMap,
    Version,
    Versions,
    WantProgress,
)
from .record import Record, message
from .tensors import Manifest

#: the protocol this side speaks; 2 added announce's ``record`` (docs/protocol.md)
PROTOCOL_VERSION: Final = 2
#: the versions a daemon answers in: a client's own, echoed in its welcome
SUPPORTED_PROTOCOLS: Final = (1, 2)
#: the first protocol whose announcements may carry a version record
RECORD_PROTOCOL: Final = 2

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _empty_map() -> Mapping[str, Any]:
    return _EMPTY


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Record):
    """Client -> daemon, first frame: who I am and which protocol I speak."""

    TYPE: ClassVar[str] = "hello"
    protocol: Protocol = PROTOCOL_VERSION
    role: PeerRole
    name: PeerName
    pid: Pid


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome(Record):
    """Daemon -> client: handshake accepted; ``versions`` is every slot's current version."""

    TYPE: ClassVar[str] = "welcome"
    protocol: Protocol = PROTOCOL_VERSION
    session: Serial
    daemon_pid: Pid
    versions: Versions = field(default_factory=dict)


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe(Record):
    """Client -> daemon: add slots, groups, or everything (``all``) to my announcements."""

    TYPE: ClassVar[str] = "subscribe"
    request_id: RequestId
    slots: Slots = ()
    groups: Groups = ()
    all: Flag = False


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribed(Record):
    """Daemon -> client, answers Subscribe: current versions of the slots it added."""

    TYPE: ClassVar[str] = "subscribed"
    request_id: RequestId
    versions: Versions = field(default_factory=dict)


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe(Record):
    """Client -> daemon: stop announcing these; no answer (unknown names are ignored)."""

    TYPE: ClassVar[str] = "unsubscribe"
    slots: Slots = ()
    groups: Groups = ()
    all: Flag = False


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class Announce(Record):
    """Daemon -> subscriber: ``slot`` now serves ``version`` (committed, warmed, in the table).

    ``seq`` strictly increases on a connection; ``aliases`` lists the aliases that
    moved with this commit (alias -> version). ``record`` (protocol 2, sent only to
    peers that speak it): what a reader needs to map the version without reading
    the index, or None (pointer moves, large versions: the reader reads the store).
    """

    TYPE: ClassVar[str] = "announce"
    slot: Slot
    version: Version
    seq: Serial
    committed_at: Seconds
    model_type: ModelType = None
    aliases: AliasVersions = field(default_factory=dict)
    record: AnnouncedRecord = None


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(Record):
    """Client -> daemon: I adopted ``version`` of ``slot``; no answer."""

    TYPE: ClassVar[str] = "ack"
    slot: Slot
    version: Version


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class DamageReport(Record):
    """Client -> daemon: ``version`` of ``slot`` failed my check (``detail`` says how); no answer.

    A report moves nothing by itself: the daemon hashes the version again and,
    if it is damaged, records it so and moves the slot's current pointer back
    to its newest intact version (announced as usual).
    """

    TYPE: ClassVar[str] = "damage_report"
    slot: Slot
    version: Version
    detail: Reason = ""


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Record):
    """Client -> daemon, periodic: what I hold (``[slot, version]`` pairs) and my USS/PSS."""

    TYPE: ClassVar[str] = "heartbeat"
    pid: Pid
    name: PeerName
    held: Held = ()
    uss: Size = 0
    pss: Size = 0


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class PublishFile(Record):
    """Client -> daemon: commit the .npy / .npz / .safetensors file at absolute ``path``."""

    TYPE: ClassVar[str] = "publish_file"
    request_id: RequestId
    slot: Slot
    path: AbsolutePath
    model_type: ModelType = None
    alias: Alias = None
    metadata: Json = field(default_factory=_empty_map)
    #: idempotency key: a retry with the same key commits at most once
    key: PublishKey = None
    #: send Progress frames while this publish runs
    progress: WantProgress = False


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class PublishBuild(Record):
    """Client -> daemon: build a context with node ``node_type`` from ``config`` and commit it."""

    TYPE: ClassVar[str] = "publish_build"
    request_id: RequestId
    slot: Slot
    node_type: NodeType
    config: Json = field(default_factory=_empty_map)
    alias: Alias = None
    key: PublishKey = None
    progress: WantProgress = False


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class PublishShm(Record):
    """Client -> daemon: commit the tensors laid out in POSIX shared-memory segment ``shm_name``.

    The daemon copies what it needs before answering; the client unlinks the
    segment once it has the answer (Published or Error).
    """

    TYPE: ClassVar[str] = "publish_shm"
    request_id: RequestId
    slot: Slot
    shm_name: ShmName
    manifest: Manifest
    config: Json = field(default_factory=_empty_map)
    metadata: Json = field(default_factory=_empty_map)
    model_type: ModelType = None
    alias: Alias = None
    key: PublishKey = None
    progress: WantProgress = False


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class Published(Record):
    """Daemon -> client, answers a publish request: committed as ``version`` of ``slot``."""

    TYPE: ClassVar[str] = "published"
    request_id: RequestId
    slot: Slot
    version: Version


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class Progress(Record):
    """Daemon -> client, every few seconds while a publish that asked for it runs.

    ``stage`` is one of PROGRESS_STAGES; ``done`` and ``total`` count the bytes
    read of a ``publish_shm`` (0 and 0 when the daemon cannot tell); ``elapsed``
    is the seconds since the daemon received the request.
    """

    TYPE: ClassVar[str] = "progress"
    request_id: RequestId
    stage: Stage
    done: Size = 0
    total: Size = 0
    elapsed: Seconds = 0.0


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class StatusRequest(Record):
    """Client -> daemon: describe yourself, your peers and your slots; answered by Status."""

    TYPE: ClassVar[str] = "status_request"
    request_id: RequestId


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class Status(Record):
    """Daemon -> client, answers StatusRequest: JSON-like maps for humans and monitoring.

    ``daemon`` describes the process, ``readers`` has one row per connected
    peer, ``slots`` one row per slot; each table holds at most MAX_STATUS_ROWS
    rows and ``daemon`` says how many there were in all. The rows' keys are
    listed in docs/protocol.md; clients must tolerate keys they do not know.
    """

    TYPE: ClassVar[str] = "status"
    request_id: RequestId
    daemon: StatusMap = field(default_factory=_empty_map)
    readers: Rows = ()
    slots: Rows = ()


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class RepairRequest(Record):
    """Client -> daemon: verify ``slot`` (or every slot: nil), re-hashing every file, and move
    each current version found damaged back to the newest intact one; answered by Repaired.

    What ``ctxstore verify --repair`` sends while the daemon holds the store's writer
    lock. The same peers that may publish may ask it (it moves current pointers).
    """

    TYPE: ClassVar[str] = "repair_request"
    request_id: RequestId
    slot: SlotOrAll = None


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class Repaired(Record):
    """Daemon -> client, answers RepairRequest: what verify found and the pointers it moved.

    ``problems``: rows ``{kind, detail, slot, version, tensor}`` (as ``ctxstore verify``
    prints them), as many as fit one frame; ``problems_total`` counts them all.
    ``repairs``: one row ``{slot, from_version, to_version, damaged}`` per slot whose
    current version was damaged; ``to_version`` nil when it had no intact one.
    Each move is announced like a rollback.
    """

    TYPE: ClassVar[str] = "repaired"
    request_id: RequestId
    problems: Rows = ()
    problems_total: Size = 0
    repairs: Rows = ()


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class Error(Record):
    """Either way: a request failed (``request_id`` set), or, when ``fatal``, the sender is closing.

    ``kind`` is the ``kind`` of the ctxstore error class (``not_found``,
    ``remote_protocol``...), or ``internal`` for anything else.
    """

    TYPE: ClassVar[str] = "error"
    kind: ErrorKind
    message: ErrorText
    request_id: RequestIdOrNone = None
    fatal: Flag = False

    def exception(self) -> RemoteError:
        """The exception a client raises for this frame."""
        return RemoteError(self.kind, self.message)


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class Goodbye(Record):
    """Either way: I send nothing more; the peer closes after reading what is in flight."""

    TYPE: ClassVar[str] = "goodbye"
    reason: Reason = ""


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class Ping(Record):
    """Either way, after the handshake: answer with a Pong carrying the same ``nonce``."""

    TYPE: ClassVar[str] = "ping"
    nonce: RequestId


@message
@dataclass(frozen=True, slots=True, kw_only=True)
class Pong(Record):
    """Either way: the answer to a Ping."""

    TYPE: ClassVar[str] = "pong"
    nonce: RequestId
