"""The sans-IO connection, under the name it had before :mod:`ctxstore.wire` held it.

Kept for code outside the repository: docs/protocol.md showed ``from ctxstore.protocol
import ...`` to client writers. New code imports from :mod:`ctxstore.wire`.
"""

from __future__ import annotations

from .wire.codec import (
    MESSAGE_TYPES,
    Message,
    decode_body,
    encode_body,
    error_for,
)
from .wire.connection import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER,
    MAX_FRAME_SIZE,
    MIN_FRAME_SIZE,
    Connection,
    Event,
    encode_frame,
    error_frame_for,
)
from .wire.fields import (
    ROLES,
)
from .wire.messages import (
    PROTOCOL_VERSION,
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
from .wire.states import (
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
from .wire.tensors import (
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
    "MAX_FRAME_SIZE",
    "MESSAGE_TYPES",
    "MIN_FRAME_SIZE",
    "Message",
    "NEED_DATA",
    "PEER_TRANSITIONS",
    "PROTOCOL_VERSION",
    "Ping",
    "Pong",
    "Progress",
    "PublishBuild",
    "PublishFile",
    "PublishShm",
    "Published",
    "ROLES",
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
    "Welcome",
    "decode_body",
    "encode_body",
    "encode_frame",
    "error_for",
    "error_frame_for",
    "event_name",
]
