"""Frame bodies: a record to msgpack bytes and back, refusing malformed bodies on the way in.

:func:`decode_body` turns one frame body into a record or raises
:class:`~ctxstore.errors.RemoteProtocolError` saying what was wrong;
:func:`encode_body` is its inverse. Framing, limits and the connection's state
machine live in :mod:`ctxstore.wire.connection`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from types import MappingProxyType, NoneType
from typing import Any, Final, TypeAlias

import msgpack

from ..checks import check_label
from ..errors import CtxStoreError, InvalidInputError, RemoteProtocolError
from ..validation import MAX_JSON_DEPTH
from .fields import MAX_TEXT_BYTES, is_control
from .messages import (
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

Message: TypeAlias = (
    Hello
    | Welcome
    | Subscribe
    | Subscribed
    | Unsubscribe
    | Announce
    | Ack
    | DamageReport
    | Heartbeat
    | PublishFile
    | PublishBuild
    | PublishShm
    | Published
    | Progress
    | StatusRequest
    | Status
    | RepairRequest
    | Repaired
    | Error
    | Goodbye
    | Ping
    | Pong
)

MESSAGE_TYPES: Final[Mapping[str, type[Message]]] = MappingProxyType(
    {
        cls.TYPE: cls
        for cls in (
            Hello,
            Welcome,
            Subscribe,
            Subscribed,
            Unsubscribe,
            Announce,
            Ack,
            DamageReport,
            Heartbeat,
            PublishFile,
            PublishBuild,
            PublishShm,
            Published,
            Progress,
            StatusRequest,
            Status,
            RepairRequest,
            Repaired,
            Error,
            Goodbye,
            Ping,
            Pong,
        )
    }
)

_FIELD_NAMES: Final = {name: frozenset(cls.CHECKS) for name, cls in MESSAGE_TYPES.items()}
#: the most entries a frame body's map can have ("type" + the longest record's fields)
MAX_ENTRIES: Final = 1 + max(len(names) for names in _FIELD_NAMES.values())


# -- bodies ----------------------------------------------------------------------------------


class _Packers(threading.local):
    """One msgpack Packer per thread, kept: ``msgpack.packb`` makes a Packer per call, and
    each Packer allocates a 1 MiB buffer (its own mmap where the daemon fixes malloc's mmap
    threshold, daemon/limits.py), which cost more than the encoding of a small frame."""

    def __init__(self) -> None:
        self.packer = msgpack.Packer(use_bin_type=True, autoreset=True)


_PACKERS: Final = _Packers()


def encode_body(message: Message) -> bytes:
    """The msgpack body of ``message`` (without the length header)."""
    wire = message.to_wire()
    packer = _PACKERS.packer
    try:
        packed: bytes = packer.pack(wire)
    except BaseException:
        packer.reset()  # a failed pack may leave bytes behind in the kept buffer
        raise
    return packed


def decode_body(body: bytes | bytearray) -> Message:
    """Parse and validate one frame body, or raise RemoteProtocolError saying what was wrong."""
    entries = _check_outer_map(body)
    raw = _unpack(body)
    if len(raw) != entries:
        raise RemoteProtocolError("frame body has a map with a repeated key")
    name = raw.pop("type", None)
    if not isinstance(name, str):
        what = "no 'type' field" if name is None else f"a {_wire_type(name)} 'type'"
        raise RemoteProtocolError(f"frame has {what}; expected one of {', '.join(MESSAGE_TYPES)}")
    cls = MESSAGE_TYPES.get(name)
    if cls is None:
        raise RemoteProtocolError(
            f"unknown frame type {name!r:.40}; protocol {PROTOCOL_VERSION} has "
            f"{', '.join(MESSAGE_TYPES)}"
        )
    expected = _FIELD_NAMES[name]
    if raw.keys() != expected and not expected - cls.LATER <= raw.keys() <= expected:
        raise RemoteProtocolError(_field_mismatch(name, expected - cls.LATER, set(raw), expected))
    try:
        return cls(**raw)
    except InvalidInputError as exc:
        raise RemoteProtocolError(f"bad {name!r} frame: {exc}") from exc
    except RecursionError:
        # msgpack's parser stops at 1024 levels, Python's stack near 1000: a field nested
        # deeper than its check (or the repr in its refusal) can follow is refused here
        raise RemoteProtocolError(
            f"bad {name!r} frame: a field is nested too deep (only config and metadata may "
            f"nest, at most {MAX_JSON_DEPTH} levels)"
        ) from None


def _check_outer_map(body: bytes | bytearray) -> int:
    """The entry count of the body's map, read from its first bytes; refuse anything else.

    This costs nothing, where decoding a 1 MiB array of empty containers
    first would cost a tenth of a second.
    """
    if not body:
        raise RemoteProtocolError("frame body is empty")
    first = body[0]
    if 0x80 <= first <= 0x8F:
        entries = first & 0x0F
    elif first in (0xDE, 0xDF):
        end = 3 if first == 0xDE else 5
        if len(body) < end:
            raise RemoteProtocolError("frame body is a truncated map header")
        entries = int.from_bytes(body[1:end], "big")
    else:
        raise RemoteProtocolError(f"frame body must be a map, got {_FIRST_BYTE[first]}")
    if entries > MAX_ENTRIES:
        raise RemoteProtocolError(
            f"frame body is a map of {entries} entries; no message has more than {MAX_ENTRIES}"
        )
    return entries


def _first_byte_names() -> tuple[str, ...]:
    """What each msgpack lead byte starts (for error messages)."""
    names = ["an extension value"] * 256
    spans = [
        (0x00, 0x7F, "integer"),
        (0xCC, 0xD3, "integer"),
        (0xE0, 0xFF, "integer"),
        (0x80, 0x8F, "map"),
        (0xDE, 0xDF, "map"),
        (0x90, 0x9F, "array"),
        (0xDC, 0xDD, "array"),
        (0xA0, 0xBF, "string"),
        (0xD9, 0xDB, "string"),
        (0xC4, 0xC6, "binary"),
        (0xC0, 0xC0, "nil"),
        (0xC1, 0xC1, "the reserved byte 0xc1"),
        (0xC2, 0xC3, "boolean"),
        (0xCA, 0xCB, "float"),
    ]
    for low, high, name in spans:
        names[low : high + 1] = [name] * (high - low + 1)
    return tuple(names)


_FIRST_BYTE: Final = _first_byte_names()


def _unpack(body: bytes | bytearray) -> dict[str, Any]:
    """msgpack.unpackb with every limit tied to the body's real size.

    A container's declared length can never exceed the bytes that would hold
    its elements, so a 5-byte body announcing 4 billion elements is refused
    before anything is allocated. No binary or extension types are used.
    Arrays decode as tuples: the validators take any sequence, and tuples
    spare the garbage collector (empty ones are free). Inside config and
    metadata a repeated key keeps its last value, as JSON parsers do; the
    outer map's repeated keys are caught by counting its entries.
    """
    size = len(body)
    try:
        raw: dict[str, Any] = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=False,
            max_str_len=size,
            max_bin_len=0,
            max_array_len=size,
            max_map_len=size // 2,
            max_ext_len=0,
        )
    except RemoteProtocolError:
        raise
    except msgpack.StackError:
        raise RemoteProtocolError("frame body is nested more than 1024 levels deep") from None
    except msgpack.ExtraData:
        raise RemoteProtocolError("frame body has bytes after its msgpack value") from None
    except msgpack.FormatError:
        raise RemoteProtocolError("frame body is not valid msgpack") from None
    except Exception as exc:  # msgpack reports other malformed input with assorted types
        detail = str(exc) or type(exc).__name__
        raise RemoteProtocolError(f"frame body is not valid msgpack: {detail:.200}") from None
    return raw


def _field_mismatch(
    name: str, required: frozenset[str], got: set[str], known: frozenset[str]
) -> str:
    missing = sorted(required - got)
    extra = sorted(str(key)[:40] for key in got - known)
    parts = []
    if missing:
        parts.append(f"missing field(s) {', '.join(missing)}")
    if extra:
        parts.append(f"unknown field(s) {', '.join(extra[:5])}")
    return f"bad {name!r} frame: {'; '.join(parts)}"


def _wire_type(value: object) -> str:
    names = {dict: "map", tuple: "array", str: "string", bytes: "binary", NoneType: "nil"}
    return names.get(type(value), type(value).__name__)


def error_for(exc: BaseException, *, request_id: int | None = None, fatal: bool = True) -> Error:
    """The Error message that reports ``exc`` to the peer (kind = the class's ``kind``).

    Never fails: the text is cleaned of control characters and truncated to fit.
    """
    kind = getattr(exc, "kind", None) if isinstance(exc, CtxStoreError) else None
    if not isinstance(kind, str):
        kind = "internal"
    try:
        check_label(kind, "error kind")
    except InvalidInputError:
        kind = "internal"
    text = str(exc) if isinstance(exc, CtxStoreError) else f"{type(exc).__name__}: {exc}"
    return Error(kind=kind, message=_clean(text), request_id=request_id, fatal=fatal)


def _clean(text: str) -> str:
    text = "".join("?" if is_control(c) and c not in "\n\t" else c for c in text[:MAX_TEXT_BYTES])
    encoded = text.encode("utf-8", "replace")[:MAX_TEXT_BYTES]
    return encoded.decode("utf-8", "ignore")
