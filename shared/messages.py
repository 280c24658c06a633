"""The messages of the ctxstore socket protocol: one frozen record per frame type.

Every frame body is a msgpack map ``{"type": <name>, <field>: <value>, ...}``
holding exactly the fields of one record below. A record validates its fields
when it is built, so a message that exists is a valid message: the decoder
builds records from untrusted maps, and code that sends builds the same
records, so both sides refuse the same things with the same words.

:func:`decode_body` turns one frame body into a record or raises
:class:`~ctxstore.errors.RemoteProtocolError`; :func:`encode_body` is its
inverse. Framing, limits and the connection's state machine live in
:mod:`ctxstore.protocol`; docs/protocol.md is the reference.

On the wire, maps only ever have string keys, so slot -> version tables travel
as arrays of ``[slot, version]`` pairs.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType, NoneType
from typing import Any, ClassVar, Final, TypeAlias

import msgpack
import numpy as np

from .dtypes import ML_DTYPE_NAMES, ml_dtype, spec_text
from .errors import CtxStoreError, InvalidInputError, RemoteError, RemoteProtocolError
from .validation import (
    MAX_JSON_DEPTH,
    MAX_TENSORS,
    check_alias,
    check_dtype,
    check_label,
    check_shape,
    check_slot,
    check_tensor_name,
    check_version,
    freeze_mapping,
    thaw_json,
)

PROTOCOL_VERSION: Final = 1
ROLES: Final = ("reader", "publisher", "admin")

MAX_ID: Final = 2**63 - 1
MAX_PID: Final = 2**31 - 1
MAX_PROTOCOL: Final = 2**16 - 1
MAX_PATH_BYTES: Final = 4096
MAX_TEXT_BYTES: Final = 4096
MAX_REASON_BYTES: Final = 1024
MAX_NDIM: Final = 32
#: the most reader or slot rows one Status frame carries (the daemon says when it truncated)
MAX_STATUS_ROWS: Final = 10_000
MAX_DIM: Final = 2**62

_SHM_NAME = re.compile(r"/[A-Za-z0-9_][A-Za-z0-9_.-]{0,250}")
_PUBLISH_KEY = re.compile(r"[A-Za-z0-9_-]{8,128}")
#: what a publish is doing, in a Progress frame: waiting for the commit before it (or for
#: the first try of the same key), reading its input, or being written by the store
PROGRESS_STAGES: Final = ("waiting", "reading", "committing")
_DTYPE = re.compile(r"[<>|=]?[biufcmMSUV][0-9]{1,6}(\[[0-9]{0,4}[A-Za-z]{1,3}\])?")

Check: TypeAlias = Callable[[Any], Any]


# -- field checks: each takes an untrusted value and returns the normalized one ----------------


def _int(low: int, high: int) -> Check:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInputError(f"must be an integer, got {type(value).__name__}")
        if not low <= value <= high:
            raise InvalidInputError(f"must be between {low} and {high}, got {value}")
        return value

    return check


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidInputError(f"must be true or false, got {type(value).__name__}")
    return value


def _timestamp(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError(f"must be a number of seconds, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise InvalidInputError(f"must be a finite number >= 0, got {value}")
    return float(value)


def _text(max_bytes: int, *, lines: bool, empty: bool = True) -> Check:
    """Strings for humans: bounded UTF-8, no control characters (``lines`` allows newline, tab)."""
    allowed = "\n\t" if lines else ""

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise InvalidInputError(f"must be a string, got {type(value).__name__}")
        if not value and not empty:
            raise InvalidInputError("must not be empty")
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidInputError("is not valid Unicode (lone surrogate)") from None
        if size > max_bytes:
            raise InvalidInputError(f"is {size} UTF-8 bytes long; the limit is {max_bytes}")
        bad = next((c for c in value if _is_control(c) and c not in allowed), None)
        if bad is not None:
            raise InvalidInputError(f"contains control character {bad!r}")
        return value

    return check


def _is_control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code < 0xA0


def _path(value: Any) -> str:
    path: str = _text(MAX_PATH_BYTES, lines=False, empty=False)(value)
    if not path.startswith("/"):
        raise InvalidInputError(
            f"{path!r:.80} is not absolute (the daemon does not share your working directory)"
        )
    return path


def _shm_name(value: Any) -> str:
    if not isinstance(value, str) or not _SHM_NAME.fullmatch(value):
        raise InvalidInputError(
            f"{value!r:.80} is not a shared-memory name: '/' then a letter, digit or '_', "
            "then up to 250 of [A-Za-z0-9_.-]"
        )
    return value


def _publish_key(value: Any) -> str:
    if not isinstance(value, str) or not _PUBLISH_KEY.fullmatch(value):
        raise InvalidInputError(f"{value!r:.80} is not a publish key: 8 to 128 of [A-Za-z0-9_-]")
    return value


def _stage(value: Any) -> str:
    if not isinstance(value, str) or value not in PROGRESS_STAGES:
        raise InvalidInputError(f"must be one of {', '.join(PROGRESS_STAGES)}, got {value!r:.40}")
    return value


def _label(what: str) -> Check:
    return lambda value: check_label(value, what)


def _role(value: Any) -> str:
    if not isinstance(value, str) or value not in ROLES:
        raise InvalidInputError(f"must be one of {', '.join(ROLES)}, got {value!r:.40}")
    return value


def _optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def _sequence(value: Any) -> Sequence[Any]:
    if not isinstance(value, list | tuple):
        raise InvalidInputError(f"must be an array, got {type(value).__name__}")
    return value


def _tuple_of(check: Check) -> Check:
    return lambda value: tuple(check(item) for item in _sequence(value))


def _pairs(value: Any) -> tuple[tuple[int, int], ...]:
    """``[[slot, version], ...]`` (or a slot -> version mapping) with no repeated pair."""
    items = value.items() if isinstance(value, Mapping) else _sequence(value)
    pairs = []
    for item in items:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise InvalidInputError("must hold [slot, version] pairs")
        pairs.append((check_slot(item[0]), check_version(item[1])))
    if len(set(pairs)) != len(pairs):
        raise InvalidInputError("repeats a [slot, version] pair")
    return tuple(pairs)


def _version_map(value: Any) -> Mapping[int, int]:
    """Slot -> version; on the wire an array of ``[slot, version]`` pairs, one per slot."""
    pairs = _pairs(value)
    table = dict(pairs)
    if len(table) != len(pairs):
        raise InvalidInputError("names a slot twice")
    return MappingProxyType(table)


def _alias_map(value: Any) -> Mapping[str, int]:
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"must be a map of alias -> version, got {type(value).__name__}")
    return MappingProxyType({check_alias(k): check_version(v) for k, v in value.items()})


def _json_map(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"must be a map, got {type(value).__name__}")
    return freeze_mapping(value, "value")


def _json_rows(value: Any) -> tuple[Mapping[str, Any], ...]:
    """An array of at most MAX_STATUS_ROWS JSON-like maps (status tables)."""
    rows = _sequence(value)
    if len(rows) > MAX_STATUS_ROWS:
        raise InvalidInputError(f"has {len(rows)} rows; the limit is {MAX_STATUS_ROWS}")
    checked = []
    for index, row in enumerate(rows):
        try:
            checked.append(_json_map(row))
        except InvalidInputError as exc:
            raise InvalidInputError(f"[{index}] {exc}") from None
    return tuple(checked)


_size = _int(0, MAX_ID)


def _dump_pairs(value: Mapping[int, int] | tuple[tuple[int, int], ...]) -> list[list[int]]:
    items = value.items() if isinstance(value, Mapping) else value
    return [[slot, version] for slot, version in items]


def _dump_tuple(value: tuple[Any, ...]) -> list[Any]:
    return list(value)


def _plain(value: Any) -> Any:
    """thaw_json for what freeze_json made, by exact type: 3x faster on big status tables.

    A Status frame is encoded on the daemon's event loop, where every millisecond counts.
    """
    kind = type(value)
    if kind is MappingProxyType:
        return {key: _plain(item) for key, item in value.items()}
    if kind is tuple:
        return [_plain(item) for item in value]
    return value


def _dump_rows(rows: tuple[Mapping[str, Any], ...]) -> list[dict[str, Any]]:
    return [_plain(row) for row in rows]


# -- records ---------------------------------------------------------------------------------


class _Record:
    """Shared behaviour of messages: validate on construction, dump to a wire map."""

    __slots__ = ()
    TYPE: ClassVar[str]
    #: field name -> check (normalizes or raises InvalidInputError)
    CHECKS: ClassVar[Mapping[str, Check]]
    #: field name -> wire form of the normalized value (identity when absent)
    DUMPS: ClassVar[Mapping[str, Check]] = {}
    #: fields added after protocol 1 shipped: a frame may leave them out (their default
    #: applies), so a peer from an older ctxstore is still understood
    LATER: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        for name, check in self.CHECKS.items():
            try:
                value = check(getattr(self, name))
            except InvalidInputError as exc:
                raise InvalidInputError(f"{self.TYPE}.{name}: {exc}") from None
            object.__setattr__(self, name, value)

    def to_wire(self) -> dict[str, Any]:
        """The frame body as a plain map (before msgpack)."""
        body: dict[str, Any] = {"type": self.TYPE}
        for name in self.CHECKS:
            dump = self.DUMPS.get(name)
            value = getattr(self, name)
            body[name] = value if dump is None else dump(value)
        return body


_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _empty_map() -> Mapping[str, Any]:
    return _EMPTY


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor inside a shared-memory segment: ``bytes[offset:offset+nbytes]``, C order.

    On the wire: ``[name, dtype, shape, offset, nbytes]``; ``dtype`` is numpy's
    ``dtype.str`` (``"<f4"``) or an ml_dtypes name (``"bfloat16"``); ``nbytes`` must
    equal itemsize times the product of ``shape``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def __post_init__(self) -> None:
        name = check_tensor_name(self.name)
        dtype = _dtype(self.dtype, name)
        shape = _spec_field(name, "shape", _shape, self.shape)
        check_shape(shape, dtype.itemsize, f"tensor {name!r}")
        _spec_field(name, "offset", _size, self.offset)
        nbytes = _spec_field(name, "nbytes", _size, self.nbytes)
        text = spec_text(dtype)
        if nbytes != dtype.itemsize * math.prod(shape):
            raise InvalidInputError(
                f"tensor {name!r}: nbytes {nbytes} != {dtype.itemsize} x {shape} for {text}"
            )
        object.__setattr__(self, "dtype", text)
        object.__setattr__(self, "shape", shape)

    def to_wire(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape), self.offset, self.nbytes]


def _spec_field(name: str, what: str, check: Check, value: Any) -> Any:
    try:
        return check(value)
    except InvalidInputError as exc:
        raise InvalidInputError(f"tensor {name!r}: {what} {exc}") from None


def _shape(value: Any) -> tuple[int, ...]:
    shape: tuple[int, ...] = _tuple_of(_int(0, MAX_DIM))(value)
    if len(shape) > MAX_NDIM:
        raise InvalidInputError(f"has more than {MAX_NDIM} dimensions")
    return shape


def _dtype(value: Any, name: str) -> np.dtype[Any]:
    """A descriptor's dtype: a plain numpy dtype string, or an ml_dtypes name."""
    if isinstance(value, str) and value in ML_DTYPE_NAMES:
        try:
            return ml_dtype(value)
        except (ImportError, LookupError) as exc:
            raise InvalidInputError(f"tensor {name!r}: dtype {value}: {exc}") from None
    if not isinstance(value, str) or not _DTYPE.fullmatch(value):
        raise InvalidInputError(
            f"tensor {name!r}: {value!r:.40} is not a plain numpy dtype string or ml_dtypes name"
        )
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInputError(f"tensor {name!r}: numpy does not know dtype {value!r}") from None
    if dtype.itemsize == 0:
        raise InvalidInputError(f"tensor {name!r}: zero-size dtype {value!r}")
    check_dtype(dtype, name)
    return dtype


def _manifest(value: Any) -> tuple[TensorSpec, ...]:
    entries = _sequence(value)
    if len(entries) > MAX_TENSORS:
        raise InvalidInputError(f"more than {MAX_TENSORS} tensors")
    specs = []
    for index, entry in enumerate(entries):
        if isinstance(entry, TensorSpec):
            specs.append(entry)
        elif isinstance(entry, list | tuple) and len(entry) == 5:
            try:
                specs.append(TensorSpec(*entry))
            except InvalidInputError as exc:
                raise InvalidInputError(f"[{index}]: {exc}") from None
        else:
            raise InvalidInputError(f"[{index}] must be [name, dtype, shape, offset, nbytes]")
    if len({spec.name for spec in specs}) != len(specs):
        raise InvalidInputError("names a tensor twice")
    return tuple(specs)


_request_id = _int(0, MAX_ID)
_pid = _int(1, MAX_PID)
_slot_list = _tuple_of(check_slot)
_group_list = _tuple_of(_label("group"))
_optional_type = _optional(_label("model type"))
_optional_alias = _optional(check_alias)
_optional_key = _optional(_publish_key)
#: the fields every publish request gained after protocol 1 (see docs/protocol.md)
_PUBLISH_LATER = frozenset({"key", "progress"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(_Record):
    """Client -> daemon, first frame: who I am and which protocol I speak."""

    TYPE: ClassVar[str] = "hello"
    CHECKS: ClassVar[Mapping[str, Check]] = {
        "protocol": _int(1, MAX_PROTOCOL),
        "role": _role,
        "name": _label("name"),
        "pid": _pid,
    }
    protocol: int = PROTOCOL_VERSION
    role: str
    name: str
    pid: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome(_Record):
    """Daemon -> client: handshake accepted; ``versions`` is every slot's current version."""

    TYPE: ClassVar[str] = "welcome"
    CHECKS: ClassVar[Mapping[str, Check]] = {
        "protocol": _int(1, MAX_PROTOCOL),
        "session": _int(1, MAX_ID),
        "daemon_pid": _pid,
        "versions": _version_map,
    }
    DUMPS: ClassVar[Mapping[str, Check]] = {"versions": _dump_pairs}
    protocol: int = PROTOCOL_VERSION
    session: int
    daemon_pid: int
    versions: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe(_Record):
    """Client -> daemon: add slots, groups, or everything (``all``) to my announcements."""

    TYPE: ClassVar[str] = "subscribe"
    CHECKS: ClassVar[Mapping[str, Check]] = {
        "request_id": _request_id,
        "slots": _slot_list,
        "groups": _group_list,
        "all": _bool,
    }
    DUMPS: ClassVar[Mapping[str, Check]] = {"slots": _dump_tuple, "groups": _dump_tuple}
    request_id: int
    slots: tuple[int, ...] = ()
    groups: tuple[str, ...] = ()
    all: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribed(_Record):
    """Daemon -> client, answers Subscribe: current versions of the slots it added."""

    TYPE: ClassVar[str] = "subscribed"
    CHECKS: ClassVar[Mapping[str, Check]] = {"request_id": _request_id, "versions": _version_map}
    DUMPS: ClassVar[Mapping[str, Check]] = {"versions": _dump_pairs}
    request_id: int
    versions: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe(_Record):
    """Client -> daemon: stop announcing these; no answer (unknown names are ignored)."""

    TYPE: ClassVar[str] = "unsubscribe"
    CHECKS: ClassVar[Mapping[str, Check]] = {
        "slots": _slot_list,
        "groups": _group_list,
        "all": _bool,
    }
    DUMPS: ClassVar[Mapping[str, Check]] = {"slots": _dump_tuple, "groups": _dump_tuple}
    slots: tuple[int, ...] = ()
    groups: tuple[str, ...] = ()
    all: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Announce(_Record):
    """Daemon -> subscriber: ``slot`` now serves ``version`` (committed, warmed, in the table).

    ``seq`` strictly increases on a connection; ``aliases`` lists the aliases that
    moved with this commit (alias -> version).
    """

    TYPE: ClassVar[str] = "announce"
    CHECKS: ClassVar[Mapping[str, Check]] = {
        "slot": check_slot,
        "version": check_version,
        "seq": _int(1, MAX_ID),
        "committed_at": _timestamp,
        "model_type": _optional_type,
        "aliases": _alias_map,
    }
    DUMPS: ClassVar[Mapping[str, Check]] = {"aliases": dict}
    slot: int
    version: int
    seq: int
    committed_at: float
    model_type: str | None = None
    aliases: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(_Record):
    """Client -> daemon: I adopted ``version`` of ``slot``; no answer."""

    TYPE: ClassVar[str] = "ack"
    CHECKS: ClassVar[Mapping[str, Check]] = {"slot": check_slot, "version": check_version}
    slot: int
    version: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DamageReport(_Record):
    """Client -> daemon: ``version`` of ``slot`` failed my check (``detail`` says how); no answer.

    A report moves nothing by itself: the daemon hashes the version again and,
    if it is damaged, records it so and moves the slot's current pointer back
    to its newest intact version (announced as usual).
    """

    TYPE: ClassVar[str] = "damage_report"
    CHECKS: ClassVar[Mapping[str, Check]] = {
        "slot": check_slot,
        "version": check_version,
        "detail": _text(MAX_REASON_BYTES, lines=False),
    }
    slot: int
    version: int
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(_Record):
    """Client -> daemon, periodic: what I hold (``[slot, version]`` pairs) and my USS/PSS."""

    TYPE: ClassVar[str] = "heartbeat"
    CHECKS: ClassVar[Mapping[str, Check]] = {
        "pid": _pid,
        "name": _label("name"),
        "held": _pairs,
        "uss": _size,
        "pss": _size,
    }
    DUMPS: ClassVar[Mapping[str, Check]] = {"held": _dump_pairs}
    pid: int
    name: str
    held: tuple[tuple[int, int], ...] = ()
    uss: int = 0
    pss: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishFile(_Record):
    """Client -> daemon: commit the .npy / .npz / .safetensors file at absolute ``path``."""

    TYPE: ClassVar[str] = "publish_file"
    CHECKS: ClassVar[Mapping[str, Check]] = {
        "request_id": _request_id,
        "slot": check_slot,
        "path": _path,
        "model_type": _optional_type,
        "alias": _optional_alias,
        "metadata": _json_map,
        "key": _optional_key,
        "progress": _bool,
    }
    DUMPS: ClassVar[Mapping[str, Check]] = {"metadata": thaw_json}
    LATER: ClassVar[frozenset[str]] = _PUBLISH_LATER
    request_id: int
    slot: int
    path: str
    model_type: str | None = None
    alias: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=_empty_map)
    #: idempotency key: a retry with the same key commits at most once
    key: str | None = None
    #: send Progress frames while this publish runs
    progress: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishBuild(_Record):
    """Client -> daemon: build a context with node ``node_type`` from ``config`` and commit it."""

    TYPE: ClassVar[str] = "publish_build"
    CHECKS: ClassVar[Mapping[str, Check]] = {
        "request_id": _request_id,
        "slot": check_slot,
        "node_type": _label("node type"),
        "config": _json_map,
        "alias": _optional_alias,
        "key": _optional_key,
        "progress": _bool,
    }
    DUMPS: ClassVar[Mapping[str, Check]] = {"config": thaw_json}
    LATER: ClassVar[frozenset[str]] = _PUBLISH_LATER
    request_id: int
    slot: int
    node_type: str
    config: Mapping[str, Any] = field(default_factory=_empty_map)
    alias: str | None = None
    key: str | None = None
    progress: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishShm(_Record):
    """Client -> daemon: commit the tensors laid out in POSIX shared-memory segment ``shm_name``.

    The daemon copies what it needs before answering; the client unlinks the
    segment once it has the answer (Published or Error).
    """

    TYPE: ClassVar[str] = "publish_shm"
    CHECKS: ClassVar[Mapping[str, Check]] = {
        "request_id": _request_id,
        "slot": check_slot,
        "shm_name": _shm_name,
        "manifest": _manifest,
        "config": _json_map,
        "metadata": _json_map,
        "model_type": _optional_type,
        "alias": _optional_alias,
        "key": _optional_key,
        "progress": _bool,
    }
    DUMPS: ClassVar[Mapping[str, Check]] = {
        "manifest": lambda specs: [spec.to_wire() for spec in specs],
        "config": thaw_json,
        "metadata": thaw_json,
    }
    LATER: ClassVar[frozenset[str]] = _PUBLISH_LATER
    request_id: int
    slot: int
    shm_name: str
    manifest: tuple[TensorSpec, ...]
    config: Mapping[str, Any] = field(default_factory=_empty_map)
    metadata: Mapping[str, Any] = field(default_factory=_empty_map)
    model_type: str | None = None
    alias: str | None = None
    key: str | None = None
    progress: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Published(_Record):
    """Daemon -> client, answers a publish request: committed as ``version`` of ``slot``."""

    TYPE: ClassVar[str] = "published"
    CHECKS: ClassVar[Mapping[str, Check]] = {
        "request_id": _request_id,
        "slot": check_slot,
        "version": check_version,
    }
    request_id: int
    slot: int
    version: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress(_Record):
    """Daemon -> client, every few seconds while a publish that asked for it runs.

    ``stage`` is one of PROGRESS_STAGES; ``done`` and ``total`` count the bytes
    read of a ``publish_shm`` (0 and 0 when the daemon cannot tell); ``elapsed``
    is the seconds since the daemon received the request.
    """

    TYPE: ClassVar[str] = "progress"
    CHECKS: ClassVar[Mapping[str, Check]] = {
        "request_id": _request_id,
        "stage": _stage,
        "done": _size,
        "total": _size,
        "elapsed": _timestamp,
    }
    request_id: int
    stage: str
    done: int = 0
    total: int = 0
    elapsed: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusRequest(_Record):
    """Client -> daemon: describe yourself, your peers and your slots; answered by Status."""

    TYPE: ClassVar[str] = "status_request"
    CHECKS: ClassVar[Mapping[str, Check]] = {"request_id": _request_id}
    request_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Status(_Record):
    """Daemon -> client, answers StatusRequest: JSON-like maps for humans and monitoring.

    ``daemon`` describes the process, ``readers`` has one row per connected
    peer, ``slots`` one row per slot; each table holds at most MAX_STATUS_ROWS
    rows and ``daemon`` says how many there were in all. The rows' keys are
    listed in docs/protocol.md; clients must tolerate keys they do not know.
    """

    TYPE: ClassVar[str] = "status"
    CHECKS: ClassVar[Mapping[str, Check]] = {
        "request_id": _request_id,
        "daemon": _json_map,
        "readers": _json_rows,
        "slots": _json_rows,
    }
    DUMPS: ClassVar[Mapping[str, Check]] = {
        "daemon": _plain,
        "readers": _dump_rows,
        "slots": _dump_rows,
    }
    request_id: int
    daemon: Mapping[str, Any] = field(default_factory=_empty_map)
    readers: tuple[Mapping[str, Any], ...] = ()
    slots: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RepairRequest(_Record):
    """Client -> daemon: verify ``slot`` (or every slot: nil), re-hashing every file, and move
    each current version found damaged back to the newest intact one; answered by Repaired.

    What ``ctxstore verify --repair`` sends while the daemon holds the store's writer
    lock. The same peers that may publish may ask it (it moves current pointers).
    """

    TYPE: ClassVar[str] = "repair_request"
    CHECKS: ClassVar[Mapping[str, Check]] = {
        "request_id": _request_id,
        "slot": _optional(check_slot),
    }
    request_id: int
    slot: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Repaired(_Record):
    """Daemon -> client, answers RepairRequest: what verify found and the pointers it moved.

    ``problems``: rows ``{kind, detail, slot, version, tensor}`` (as ``ctxstore verify``
    prints them), as many as fit one frame; ``problems_total`` counts them all.
    ``repairs``: one row ``{slot, from_version, to_version, damaged}`` per slot whose
    current version was damaged; ``to_version`` nil when it had no intact one.
    Each move is announced like a rollback.
    """

    TYPE: ClassVar[str] = "repaired"
    CHECKS: ClassVar[Mapping[str, Check]] = {
        "request_id": _request_id,
        "problems": _json_rows,
        "problems_total": _size,
        "repairs": _json_rows,
    }
    DUMPS: ClassVar[Mapping[str, Check]] = {"problems": _dump_rows, "repairs": _dump_rows}
    request_id: int
    problems: tuple[Mapping[str, Any], ...] = ()
    problems_total: int = 0
    repairs: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Error(_Record):
    """Either way: a request failed (``request_id`` set), or, when ``fatal``, the sender is closing.

    ``kind`` is the ``kind`` of the ctxstore error class (``not_found``,
    ``remote_protocol``...), or ``internal`` for anything else.
    """

    TYPE: ClassVar[str] = "error"
    CHECKS: ClassVar[Mapping[str, Check]] = {
        "kind": _label("error kind"),
        "message": _text(MAX_TEXT_BYTES, lines=True),
        "request_id": _optional(_request_id),
        "fatal": _bool,
    }
    kind: str
    message: str
    request_id: int | None = None
    fatal: bool = False

    def exception(self) -> RemoteError:
        """The exception a client raises for this frame."""
        return RemoteError(self.kind, self.message)


@dataclass(frozen=True, slots=True, kw_only=True)
class Goodbye(_Record):
    """Either way: I send nothing more; the peer closes after reading what is in flight."""

    TYPE: ClassVar[str] = "goodbye"
    CHECKS: ClassVar[Mapping[str, Check]] = {"reason": _text(MAX_REASON_BYTES, lines=False)}
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping(_Record):
    """Either way, after the handshake: answer with a Pong carrying the same ``nonce``."""

    TYPE: ClassVar[str] = "ping"
    CHECKS: ClassVar[Mapping[str, Check]] = {"nonce": _int(0, MAX_ID)}
    nonce: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong(_Record):
    """Either way: the answer to a Ping."""

    TYPE: ClassVar[str] = "pong"
    CHECKS: ClassVar[Mapping[str, Check]] = {"nonce": _int(0, MAX_ID)}
    nonce: int


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
_FIELD_NAMES: Final = {
    name: frozenset(f.name for f in fields(cls)) for name, cls in MESSAGE_TYPES.items()
}
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
    text = "".join("?" if _is_control(c) and c not in "\n\t" else c for c in text[:MAX_TEXT_BYTES])
    encoded = text.encode("utf-8", "replace")[:MAX_TEXT_BYTES]
    return encoded.decode("utf-8", "ignore")


__all__ = [
    "MAX_ENTRIES",
    "MAX_PATH_BYTES",
    "MAX_REASON_BYTES",
    "MAX_STATUS_ROWS",
    "MAX_TEXT_BYTES",
    "MESSAGE_TYPES",
    "PROGRESS_STAGES",
    "PROTOCOL_VERSION",
    "ROLES",
    "Ack",
    "Announce",
    "DamageReport",
    "Error",
    "Goodbye",
    "Heartbeat",
    "Hello",
    "Message",
    "Ping",
    "Pong",
    "Progress",
    "PublishBuild",
    "PublishFile",
    "PublishShm",
    "Published",
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
