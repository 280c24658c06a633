"""The field checks of the wire records, and the wire form of what they accept.

Each check takes an untrusted value (as msgpack decoded it, or as a caller passed
it) and returns the normalized value or raises
:class:`~ctxstore.errors.InvalidInputError` saying what was wrong; the record
prefixes the message and field name. A :class:`Field` pairs a check with the
dump that turns the normalized value back into its wire form: records declare
each field once, as ``Annotated[type, Field(check)]``
(:mod:`ctxstore.wire.record` derives the checks from those declarations).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, Final, NamedTuple, TypeAlias

from .. import checks
from ..checks import WIRE, check_alias, check_label, check_slot, check_version, integer, optional
from ..errors import InvalidInputError
from ..validation import freeze_mapping, thaw_json

ROLES: Final = ("reader", "publisher", "admin")

MAX_ID: Final = 2**63 - 1
MAX_PID: Final = 2**31 - 1
MAX_PROTOCOL: Final = 2**16 - 1
MAX_PATH_BYTES: Final = 4096
MAX_TEXT_BYTES: Final = 4096
MAX_REASON_BYTES: Final = 1024
#: the most reader or slot rows one Status frame carries (the daemon says when it truncated)
MAX_STATUS_ROWS: Final = 10_000

_SHM_NAME = re.compile(r"/[A-Za-z0-9_][A-Za-z0-9_.-]{0,250}")
_PUBLISH_KEY = re.compile(r"[A-Za-z0-9_-]{8,128}")
#: what a publish is doing, in a Progress frame: waiting for the commit before it (or for
#: the first try of the same key), reading its input, or being written by the store
PROGRESS_STAGES: Final = ("waiting", "reading", "committing")

Check: TypeAlias = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class Field:
    """How one record field is checked and how it travels: the metadata of its annotation.

    ``check`` normalizes or raises InvalidInputError; ``dump`` gives the wire form of
    the normalized value (None: the value itself); ``later`` marks a field added after
    protocol 1 shipped, which a frame may leave out (its default applies) so that a
    peer from an older ctxstore is still understood; ``omit_none``: a None value is
    not written at all (the frame is then byte for byte what an older peer sent).
    """

    check: Check
    dump: Check | None = None
    later: bool = False
    #: left out of the frame when None (a field only newer peers are sent, see ``later``)
    omit_none: bool = False


# -- checks: each takes an untrusted value and returns the normalized one --------------------
# (integers, booleans and optional values are ctxstore.checks' checks, in the wire's words)


#: true or false, nothing else
boolean: Final = checks.boolean(WIRE)


def timestamp(value: Any) -> float:
    if type(value) is float and 0 <= value < math.inf:
        return value  # the common case, without the isinstance chain (NaN fails the test)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError(f"must be a number of seconds, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise InvalidInputError(f"must be a finite number >= 0, got {value}")
    return float(value)


def text(max_bytes: int, *, lines: bool, empty: bool = True) -> Check:
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
        bad = next((c for c in value if is_control(c) and c not in allowed), None)
        if bad is not None:
            raise InvalidInputError(f"contains control character {bad!r}")
        return value

    return check


def is_control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code < 0xA0


def path(value: Any) -> str:
    path: str = text(MAX_PATH_BYTES, lines=False, empty=False)(value)
    if not path.startswith("/"):
        raise InvalidInputError(
            f"{path!r:.80} is not absolute (the daemon does not share your working directory)"
        )
    return path


def shm_name(value: Any) -> str:
    if not isinstance(value, str) or not _SHM_NAME.fullmatch(value):
        raise InvalidInputError(
            f"{value!r:.80} is not a shared-memory name: '/' then a letter, digit or '_', "
            "then up to 250 of [A-Za-z0-9_.-]"
        )
    return value


def publish_key(value: Any) -> str:
    if not isinstance(value, str) or not _PUBLISH_KEY.fullmatch(value):
        raise InvalidInputError(f"{value!r:.80} is not a publish key: 8 to 128 of [A-Za-z0-9_-]")
    return value


def stage(value: Any) -> str:
    if not isinstance(value, str) or value not in PROGRESS_STAGES:
        raise InvalidInputError(f"must be one of {', '.join(PROGRESS_STAGES)}, got {value!r:.40}")
    return value


def label(what: str) -> Check:
    return lambda value: check_label(value, what)


def role(value: Any) -> str:
    if not isinstance(value, str) or value not in ROLES:
        raise InvalidInputError(f"must be one of {', '.join(ROLES)}, got {value!r:.40}")
    return value


def sequence(value: Any) -> Sequence[Any]:
    if not isinstance(value, list | tuple):
        raise InvalidInputError(f"must be an array, got {type(value).__name__}")
    return value


def tuple_of(check: Check) -> Check:
    return lambda value: tuple(check(item) for item in sequence(value))


def pairs(value: Any) -> tuple[tuple[int, int], ...]:
    """``[[slot, version], ...]`` (or a slot -> version mapping) with no repeated pair."""
    items = value.items() if isinstance(value, Mapping) else sequence(value)
    found = []
    for item in items:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise InvalidInputError("must hold [slot, version] pairs")
        found.append((check_slot(item[0]), check_version(item[1])))
    if len(set(found)) != len(found):
        raise InvalidInputError("repeats a [slot, version] pair")
    return tuple(found)


def version_map(value: Any) -> Mapping[int, int]:
    """Slot -> version; on the wire an array of ``[slot, version]`` pairs, one per slot."""
    found = pairs(value)
    table = dict(found)
    if len(table) != len(found):
        raise InvalidInputError("names a slot twice")
    return MappingProxyType(table)


def alias_map(value: Any) -> Mapping[str, int]:
    if type(value) is not dict and not isinstance(value, Mapping):  # dict: no ABC check
        raise InvalidInputError(f"must be a map of alias -> version, got {type(value).__name__}")
    return MappingProxyType({check_alias(k): check_version(v) for k, v in value.items()})


def json_map(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"must be a map, got {type(value).__name__}")
    return freeze_mapping(value, "value")


def json_rows(value: Any) -> tuple[Mapping[str, Any], ...]:
    """An array of at most MAX_STATUS_ROWS JSON-like maps (status tables)."""
    rows = sequence(value)
    if len(rows) > MAX_STATUS_ROWS:
        raise InvalidInputError(f"has {len(rows)} rows; the limit is {MAX_STATUS_ROWS}")
    checked = []
    for index, row in enumerate(rows):
        try:
            checked.append(json_map(row))
        except InvalidInputError as exc:
            raise InvalidInputError(f"[{index}] {exc}") from None
    return tuple(checked)


size = integer(0, MAX_ID)


def dump_pairs(value: Mapping[int, int] | tuple[tuple[int, int], ...]) -> list[list[int]]:
    items = value.items() if isinstance(value, Mapping) else value
    return [[slot, version] for slot, version in items]


def dump_tuple(value: tuple[Any, ...]) -> list[Any]:
    return list(value)


def plain(value: Any) -> Any:
    """thaw_json for what freeze_json made, by exact type: 3x faster on big status tables.

    A Status frame is encoded on the daemon's event loop, where every millisecond counts.
    """
    kind = type(value)
    if kind is MappingProxyType:
        return {key: plain(item) for key, item in value.items()}
    if kind is tuple:
        return [plain(item) for item in value]
    return value


def dump_rows(rows: tuple[Mapping[str, Any], ...]) -> list[dict[str, Any]]:
    return [plain(row) for row in rows]


#: the most tensors a version record in an announcement describes (larger versions are
#: announced without one; readers then read the store)
MAX_RECORD_TENSORS: Final = 4096
#: the most UTF-8 bytes of config or metadata JSON text a version record carries
MAX_RECORD_TEXT: Final = 1 << 20


class VersionRecord(NamedTuple):
    """What a reader needs to map one version without reading the index: the daemon's word.

    ``config`` and ``metadata``: the stored JSON texts; ``tensors``: per tensor in
    position order ``(name, dtype, shape, data offset, data bytes)``, as the index
    records them; ``files``: each tensor file's identity (size, mtime_ns, inode,
    device), four integers per tensor, as the daemon recorded them verified. Only
    the structure and sizes are checked here (the wire knows no dtypes): the
    reader checks each tensor entry before it maps anything, once per distinct
    layout (``ctxstore.store.decode.announced_plan``).
    """

    config: str
    metadata: str
    tensors: tuple[tuple[Any, ...], ...]
    files: tuple[int, ...]


def _record_text(value: Any, what: str) -> str:
    if type(value) is not str:
        raise InvalidInputError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > MAX_RECORD_TEXT:  # characters: at least as many bytes
        raise InvalidInputError(f"{what} is longer than {MAX_RECORD_TEXT} bytes")
    return value


def version_record(value: Any) -> VersionRecord | None:
    """An optional version record: [config, metadata, tensors, files], bounded."""
    if value is None or type(value) is VersionRecord:
        return value  # a record built by this process was checked when it was made
    if not isinstance(value, tuple | list) or len(value) != 4:
        raise InvalidInputError("must be nil or [config, metadata, tensors, files]")
    config, metadata, tensors, files = value
    if not isinstance(tensors, tuple | list) or not 0 < len(tensors) <= MAX_RECORD_TENSORS:
        raise InvalidInputError(f"tensors must be an array of 1 to {MAX_RECORD_TENSORS} entries")
    if (
        not isinstance(files, tuple | list)
        or len(files) != 4 * len(tensors)
        or not set(map(type, files)) <= {int}
    ):
        raise InvalidInputError("files must be an array of 4 integers per tensor")
    return VersionRecord(
        _record_text(config, "config"),
        _record_text(metadata, "metadata"),
        tensors if type(tensors) is tuple else tuple(tensors),
        files if type(files) is tuple else tuple(files),
    )


# -- the fields, each declared once: type, check and wire form ----------------------------------
# (module-level names: a record's own field names, as slots, would shadow the checks)

RequestId: TypeAlias = Annotated[int, Field(integer(0, MAX_ID))]
Serial: TypeAlias = Annotated[int, Field(integer(1, MAX_ID))]
Protocol: TypeAlias = Annotated[int, Field(integer(1, MAX_PROTOCOL))]
Pid: TypeAlias = Annotated[int, Field(integer(1, MAX_PID))]
Size: TypeAlias = Annotated[int, Field(size)]
Flag: TypeAlias = Annotated[bool, Field(boolean)]
Seconds: TypeAlias = Annotated[float, Field(timestamp)]
Slot: TypeAlias = Annotated[int, Field(check_slot)]
Version: TypeAlias = Annotated[int, Field(check_version)]
PeerName: TypeAlias = Annotated[str, Field(label("name"))]
Reason: TypeAlias = Annotated[str, Field(text(MAX_REASON_BYTES, lines=False))]
ModelType: TypeAlias = Annotated[str | None, Field(optional(label("model type")))]
Alias: TypeAlias = Annotated[str | None, Field(optional(check_alias))]
Versions: TypeAlias = Annotated[Mapping[int, int], Field(version_map, dump=dump_pairs)]
Slots: TypeAlias = Annotated[tuple[int, ...], Field(tuple_of(check_slot), dump=dump_tuple)]
Groups: TypeAlias = Annotated[tuple[str, ...], Field(tuple_of(label("group")), dump=dump_tuple)]
Json: TypeAlias = Annotated[Mapping[str, Any], Field(json_map, dump=thaw_json)]
Rows: TypeAlias = Annotated[tuple[Mapping[str, Any], ...], Field(json_rows, dump=dump_rows)]
PeerRole: TypeAlias = Annotated[str, Field(role)]
AbsolutePath: TypeAlias = Annotated[str, Field(path)]
NodeType: TypeAlias = Annotated[str, Field(label("node type"))]
ShmName: TypeAlias = Annotated[str, Field(shm_name)]
Stage: TypeAlias = Annotated[str, Field(stage)]
Held: TypeAlias = Annotated[tuple[tuple[int, int], ...], Field(pairs, dump=dump_pairs)]
AliasVersions: TypeAlias = Annotated[Mapping[str, int], Field(alias_map, dump=dict)]
StatusMap: TypeAlias = Annotated[Mapping[str, Any], Field(json_map, dump=plain)]
SlotOrAll: TypeAlias = Annotated[int | None, Field(optional(check_slot))]
ErrorKind: TypeAlias = Annotated[str, Field(label("error kind"))]
ErrorText: TypeAlias = Annotated[str, Field(text(MAX_TEXT_BYTES, lines=True))]
RequestIdOrNone: TypeAlias = Annotated[int | None, Field(optional(integer(0, MAX_ID)))]
#: the fields every publish request gained after protocol 1 (see docs/protocol.md)
PublishKey: TypeAlias = Annotated[str | None, Field(optional(publish_key), later=True)]
WantProgress: TypeAlias = Annotated[bool, Field(boolean, later=True)]
#: protocol 2's addition to announce: sent only to peers that speak it, absent when None
AnnouncedRecord: TypeAlias = Annotated[
    VersionRecord | None, Field(version_record, later=True, omit_none=True)
]
