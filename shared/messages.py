"""The wire records, under the name they had before :mod:`ctxstore.wire` held them.

Kept for code outside the package (docs/protocol.md named this module); new code
imports from :mod:`ctxstore.wire`.
"""

from __future__ import annotations

from .wire.codec import (
    MAX_ENTRIES,
    MESSAGE_TYPES,
    Message,
    decode_body,
    encode_body,
    error_for,
)
from .wire.fields import (
    MAX_PATH_BYTES,
    MAX_REASON_BYTES,
    MAX_STATUS_ROWS,
    MAX_TEXT_BYTES,
    PROGRESS_STAGES,
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
from .wire.tensors import (
    TensorSpec,
)

__all__ = [
    "Ack",
    "Announce",
    "DamageReport",
    "Error",
    "Goodbye",
    "Heartbeat",
    "Hello",
    "MAX_ENTRIES",
    "MAX_PATH_BYTES",
    "MAX_REASON_BYTES",
    "MAX_STATUS_ROWS",
    "MAX_TEXT_BYTES",
    "MESSAGE_TYPES",
    "Message",
    "PROGRESS_STAGES",
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
    "Status",
    "StatusRequest",
    "Subscribe",
    "Subscribed",
    "TensorSpec",
    "Unsubscribe",
    "Welcome",
    "decode_body",
    "encode_body",
    "error_for",
]
