"""The ctxstore wire protocol, sans-IO: records, their checks, the codec and the connection.

One job per module: :mod:`~ctxstore.wire.fields` (field checks and the field
declarations), :mod:`~ctxstore.wire.record` (the record base that derives each
message's checks from its declaration), :mod:`~ctxstore.wire.tensors` (the
shared-memory tensor descriptors), :mod:`~ctxstore.wire.messages` (one record per
frame type), :mod:`~ctxstore.wire.codec` (frame bodies to records and back),
:mod:`~ctxstore.wire.states` (the lifecycle table) and
:mod:`~ctxstore.wire.connection` (one side of one connection: bytes in, events
out). Importing it loads neither sqlite3 nor the store. docs/protocol.md is the
reference.
"""

from __future__ import annotations

from .codec import (
    MAX_ENTRIES,
    MESSAGE_TYPES,
    Message,
    decode_body,
    encode_body,
    error_for,
)
from .connection import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER,
    MAX_FRAME_SIZE,
    MIN_FRAME_SIZE,
    Connection,
    Event,
    encode_frame,
    error_frame_for,
)
from .fields import (
    MAX_PATH_BYTES,
    MAX_REASON_BYTES,
    MAX_RECORD_TENSORS,
    MAX_RECORD_TEXT,
    MAX_STATUS_ROWS,
    MAX_TEXT_BYTES,
    PROGRESS_STAGES,
    ROLES,
    VersionRecord,
)
from .messages import (
    PROTOCOL_VERSION,
    RECORD_PROTOCOL,
    SUPPORTED_PROTOCOLS,
    Ack,
    Announce,
    DamageReport,
    Error,
    Goodbye,
    Heartbeat,
    Hello,
    Ping,
    Pong,
    Progress,
    PublishBuild,
    Published,
    PublishFile,
    PublishShm,
    Repaired,
    RepairRequest,
    Status,
    StatusRequest,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Welcome,
)
from .states import (
    CLOSED,
    FATAL_ERROR,
    NEED_DATA,
    PEER_TRANSITIONS,
    TRANSITIONS,
    Role,
    Signal,
    State,
    event_name,
)
from .tensors import (
    TensorSpec,
)

__all__ = [
    "Ack",
    "Announce",
    "CLOSED",
    "Connection",
    "DEFAULT_MAX_FRAME_SIZE",
    "DamageReport",
    "Error",
    "Event",
    "FATAL_ERROR",
    "Goodbye",
    "HEADER",
    "Heartbeat",
    "Hello",
    "MAX_ENTRIES",
    "MAX_FRAME_SIZE",
    "MAX_PATH_BYTES",
    "MAX_REASON_BYTES",
    "MAX_RECORD_TENSORS",
    "MAX_RECORD_TEXT",
    "MAX_STATUS_ROWS",
    "MAX_TEXT_BYTES",
    "MESSAGE_TYPES",
    "MIN_FRAME_SIZE",
    "Message",
    "NEED_DATA",
    "PEER_TRANSITIONS",
    "PROGRESS_STAGES",
    "PROTOCOL_VERSION",
    "RECORD_PROTOCOL",
    "Ping",
    "Pong",
    "Progress",
    "PublishBuild",
    "PublishFile",
    "PublishShm",
    "Published",
    "ROLES",
    "SUPPORTED_PROTOCOLS",
    "RepairRequest",
    "Repaired",
    "Role",
    "Signal",
    "State",
    "Status",
    "StatusRequest",
    "Subscribe",
    "Subscribed",
    "TRANSITIONS",
    "TensorSpec",
    "Unsubscribe",
    "VersionRecord",
    "Welcome",
    "decode_body",
    "encode_body",
    "encode_frame",
    "error_for",
    "error_frame_for",
    "event_name",
]
