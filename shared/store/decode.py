"""What the read path derives from the index, checked, and memoized where it repeats.

Version references resolved to numbers, a version's manifest decoded into its read
plan and tensor table, stored config and metadata documents, and the checks of
mapped files against the manifest (their hash, their .npy headers). Stored
documents are immutable, so what is decoded from them is memoized by their bytes.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import sqlite3
import stat
import struct
from collections.abc import Mapping, Sequence
from functools import lru_cache
from types import MappingProxyType
from typing import Any, NamedTuple, TypeAlias

import numpy as np

from ..checksum import checksum_parts
from ..context import Array
from ..errors import (
    IntegrityError,
    NotFoundError,
)
from ..integrity import (
    Identity,
    identity_of,
    pack_identities,
)
from ..records import TensorInfo
from ..validation import (
    check_alias,
    check_version,
    freeze_trusted_json,
    thaw_json,
)
from ..verify import recorded_version
from . import layout
from .manifest import Manifest, check_layout_entries, unpack_manifest
from .npyfile import (
    MapSpec,
    check_npy_header,
    dtype_from_text,
    dtype_name,
)

#: a version as callers name it: None or "current", "latest", an alias, a number
VersionRef = int | str | None

#: what load_context needs of one version (and a writer's check of it, if any);
#: completed by the version clause
RECORD_SQL = (
    "SELECT v.version, v.config, v.metadata, v.manifest, c.state, c.boot_id, c.files, c.detail "
    "FROM slots s JOIN versions v ON v.slot = s.slot LEFT JOIN version_checks c "
    "ON c.slot = v.slot AND c.version = v.version WHERE s.slot = ?1 AND v.version = "
)
#: an announcement's version record as the store gives it: config and metadata texts, the
#: tensors' ``(name, dtype, shape, offset, nbytes)`` and their files' identities, flat
AnnouncedRecord = tuple[str, str, tuple[tuple[Any, ...], ...], tuple[int, ...]]
#: what a commit keeps to make its version's record on demand: the config, metadata and
#: manifest texts its transaction wrote, its files' identities and the boot id
RecordParts = tuple[tuple[str, str, bytes], list[Identity], str | None]
#: one version's record, its slot's pointer and its aliases; completed by the version clause
METADATA_SQL = (
    "SELECT v.version, s.model_type, s.current_version, v.created_at, v.config, v.metadata, "
    "v.pinned, (SELECT group_concat(name, ',') FROM (SELECT name FROM aliases a "
    "WHERE a.slot = v.slot AND a.version = v.version ORDER BY name)), v.manifest "
    "FROM slots s JOIN versions v ON v.slot = s.slot WHERE s.slot = ?1 AND v.version = "
)


def resolve_version(conn: sqlite3.Connection, slot: int, version: VersionRef) -> int:
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if version is None or version == "current":
        row = conn.execute("SELECT current_version FROM slots WHERE slot = ?", (slot,)).fetchone()
        if row is None or row[0] is None:
            raise NotFoundError(f"slot {slot} has no versions")
        return recorded_version(row[0], slot)
    if version == "latest":
        row = conn.execute("SELECT MAX(version) FROM versions WHERE slot = ?", (slot,)).fetchone()
        if row[0] is None:
            raise NotFoundError(f"slot {slot} has no versions")
        return recorded_version(row[0], slot)
    if isinstance(version, str):
        alias = check_alias(version)
        row = conn.execute(
            "SELECT version FROM aliases WHERE slot = ? AND name = ?", (slot, alias)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"slot {slot} has no alias {alias!r}")
        return recorded_version(row[0], slot)
    number = check_version(version)
    row = conn.execute(
        "SELECT 1 FROM versions WHERE slot = ? AND version = ?", (slot, number)
    ).fetchone()
    if row is None:
        raise NotFoundError(f"slot {slot} has no version {number}")
    return number


def require_slot(conn: sqlite3.Connection, slot: int) -> None:
    if conn.execute("SELECT 1 FROM slots WHERE slot = ?", (slot,)).fetchone() is None:
        raise NotFoundError(f"slot {slot} does not exist")


class ReadPlan(NamedTuple):
    """What the read path derives from one manifest, in position order."""

    names: tuple[str, ...]
    #: per tensor: file name, dtype, shape, data offset, data bytes (map_arrays' specs)
    specs: tuple[MapSpec, ...]


# Stored documents are immutable and the same few versions are read over and
# over, so what is decoded from them is memoized by their exact bytes: no key
# can go stale, and a hit costs a hash instead of a decode. Oversized documents
# are decoded each time rather than kept.
_MEMO_ENTRIES = 256
_MEMO_MAX_LEN = 256 << 10


@lru_cache(maxsize=_MEMO_ENTRIES)
def _memo_read_plan(blob: bytes) -> tuple[Manifest, ReadPlan]:
    manifest = unpack_manifest(blob)  # every value checked, once per distinct manifest
    plan = ReadPlan(
        tuple(entry[0] for entry in manifest),
        tuple(
            (layout.tensor_file_name(position), dtype_from_text(dtype), shape, offset, nbytes)
            for position, (_, dtype, shape, offset, nbytes, _) in enumerate(manifest)
        ),
    )
    return manifest, plan


def read_plan(blob: bytes) -> tuple[Manifest, ReadPlan]:
    """A version's manifest and how to map it, memoized by the manifest's bytes."""
    if len(_manifest_bytes(blob)) > _MEMO_MAX_LEN:
        return _memo_read_plan.__wrapped__(blob)
    return _memo_read_plan(blob)


#: the longest config or metadata text of an announcement's record the memo keeps
RECORD_MEMO_MAX_LEN = 4 << 10


# A reader follows a few models. A layout holds up to 1024 tensors, ~2 MB at worst (long
# names, 64 dimensions): 16 of them bound a hostile daemon's cost to ~32 MB.
@lru_cache(maxsize=16)
def _memo_announced_plan(tensors: tuple[tuple[Any, ...], ...]) -> tuple[Manifest, ReadPlan]:
    entries = check_layout_entries(tensors)  # every value checked, once per distinct layout
    manifest: Manifest = tuple((*entry, "") for entry in entries)
    plan = ReadPlan(
        tuple(entry[0] for entry in entries),
        tuple(
            (layout.tensor_file_name(position), dtype_from_text(dtype), shape, offset, nbytes)
            for position, (_, dtype, shape, offset, nbytes) in enumerate(entries)
        ),
    )
    return manifest, plan


def announced_plan(tensors: tuple[tuple[Any, ...], ...]) -> tuple[Manifest, ReadPlan]:
    """How to map a version from its announcement's tensors (name, dtype, shape, offset,
    nbytes per tensor), checked as a stored manifest is (IntegrityError otherwise); the
    manifest has no checksums. Memoized by the tensors themselves: successive versions
    of one model have the same layout, whatever their values."""
    try:
        if len(tensors) <= _MEMO_ANNOUNCED_MAX:
            return _memo_announced_plan(tensors)
    except TypeError:  # a map somewhere in it (unhashable): not a layout
        raise IntegrityError("the announced tensors are not a list of entries") from None
    return _memo_announced_plan.__wrapped__(tensors)


#: the most tensors of an announced layout that is memoized (larger ones are checked each time)
_MEMO_ANNOUNCED_MAX = 1024


@lru_cache(maxsize=_MEMO_ENTRIES)
def _memo_tensor_table(blob: bytes) -> tuple[TensorInfo, ...]:
    return tuple(
        TensorInfo(position, name, dtype_name(dtype), shape, nbytes, checksum)
        for position, (name, dtype, shape, _, nbytes, checksum) in enumerate(unpack_manifest(blob))
    )


def tensor_table(blob: bytes) -> tuple[TensorInfo, ...]:
    """A version's tensor table, memoized by its manifest's bytes."""
    if len(_manifest_bytes(blob)) > _MEMO_MAX_LEN:
        return _memo_tensor_table.__wrapped__(blob)
    return _memo_tensor_table(blob)


def _manifest_bytes(blob: object) -> bytes:
    """A stored manifest as read from the index: bytes, or IntegrityError."""
    if type(blob) is not bytes:
        raise IntegrityError(f"stored tensor manifest is a {type(blob).__name__}, not bytes")
    return blob


def verify_mapped(
    slot: int, version: int, manifest: Manifest, weights: Mapping[str, Array]
) -> None:
    """Re-hash each mapped file (header and data: the whole map) against the manifest,
    and compare its .npy header with the recorded dtype, shape and data offset.

    The checksum covers the file's bytes, not how the index says to read them: a
    record whose dtype or shape was changed to others of the same size would read
    the right bytes as wrong numbers, so the header the file was written with
    decides (it is in the pages being hashed anyway).
    """
    for name, _, shape, offset, _, checksum in manifest:
        array = weights[name]
        mapped: object = array.base
        matches = False
        if isinstance(mapped, mmap.mmap):
            with memoryview(mapped) as view:
                matches = checksum_parts((view,)) == checksum
        if not matches:
            raise IntegrityError(
                f"slot {slot} version {version} tensor {name!r} does not match its "
                "recorded checksum (run `ctxstore verify`)"
            )
        _check_mapped_header(slot, version, name, array, shape=shape, offset=offset)


#: one mapped array's file and place in it: (file identity, dtype, shape, data offset)
MappedKey: TypeAlias = tuple[Identity, np.dtype[Any], tuple[int, ...], int]

#: (file identity, dtype, shape, data offset) whose .npy header this process found to
#: agree: a file keeps its header while it keeps its identity, so a file shared by many
#: versions (deduplicated by hard links) or a version mapped again is checked once
_HEADERS_AGREED: dict[MappedKey, None] = {}
_HEADERS_AGREED_MAX = 1 << 16


def check_mapped_headers(
    slot: int,
    version: int,
    manifest: Manifest,
    weights: Mapping[str, Array],
    identities: Sequence[Identity],
) -> None:
    """Only the .npy header check of :func:`verify_mapped`: for a version served on a
    writer's verified record, whose bytes are vouched for but whose index rows may
    have been changed since (the first page of each file; no hash). ``identities``:
    each mapped file's (:func:`mapped_identities`), in manifest order; a file whose
    identity already passed the same comparison in this process is not read again."""
    agreed = _HEADERS_AGREED
    for (name, _, shape, offset, _, _), identity in zip(manifest, identities, strict=True):
        array = weights[name]
        key = (identity, array.dtype, shape, offset)
        if key in agreed:
            continue
        _check_mapped_header(slot, version, name, array, shape=shape, offset=offset)
        if len(agreed) >= _HEADERS_AGREED_MAX:
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):  # other threads
                del agreed[next(iter(agreed))]
        agreed[key] = None


def _check_mapped_header(
    slot: int, version: int, name: str, array: Array, *, shape: tuple[int, ...], offset: int
) -> None:
    mapped: object = array.base
    header = b""
    if isinstance(mapped, mmap.mmap):
        header = mapped[:offset]  # bytes; offset: checked to lie within the map
    try:
        check_npy_header(header, array.dtype, shape, offset)
    except IntegrityError as exc:
        raise IntegrityError(
            f"slot {slot} version {version} tensor {name!r}: its file's .npy header "
            f"disagrees with the index ({exc}; run `ctxstore verify`)"
        ) from None


def mapped_identities(stats: list[os.stat_result]) -> list[Identity]:
    """Each mapped file's identity (size, mtime, inode, device), from its fstat."""
    return [identity_of(st) for st in stats]


def same_identities(identities: Sequence[Identity], recorded: object) -> bool:
    """Whether the mapped files are the ones a writer hashed: same size, mtime, inode, device.

    Compared packed, as the index stores them (one bytes comparison, not a tuple per file).
    """
    if not isinstance(recorded, bytes):
        return False
    try:
        return pack_identities(identities) == recorded
    except struct.error:  # a value no recorded identity can hold
        return False


def dump_json(value: Mapping[str, Any]) -> str:
    return _ENCODER.encode(thaw_json(value)) if value else "{}"


def load_json(text: str, what: str, memo_max: int = _MEMO_MAX_LEN) -> Mapping[str, Any]:
    """A stored config or metadata document, frozen, memoized by its text (up to
    ``memo_max`` characters: an announcement's record keeps its texts out of the memo
    past a few KiB, as a hostile peer's could cost ~40 bytes of objects a character)."""
    if len(text) > memo_max:
        return _decode_json(text, what)
    return _memo_json(text, what)


def _decode_json(text: str, what: str) -> Mapping[str, Any]:
    """Decode and freeze a stored document (it was validated when it was committed)."""
    try:
        value = _DECODER.decode(text)
    except (ValueError, TypeError, RecursionError) as exc:
        raise IntegrityError(f"stored {what} is unreadable: {exc}") from exc
    if value is None:
        return _EMPTY
    if type(value) is not dict:
        raise IntegrityError(f"stored {what} is a {type(value).__name__}, not a JSON object")
    frozen: Mapping[str, Any] = freeze_trusted_json(value)
    return frozen


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a finite number")


_memo_json = lru_cache(maxsize=_MEMO_ENTRIES)(_decode_json)
_EMPTY: Mapping[str, Any] = MappingProxyType({})


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)  # one, not one per json.loads
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # and one per dumps


def read_extra_file(version_dir: str, name: str, size: int, where: str) -> bytes:
    """At most ``size`` + 1 bytes of ``files/<name>`` under a version directory, opened
    relative to it without following a link (b"" when its size is not ``size``)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    opened: list[int] = []
    try:
        opened.append(os.open(version_dir, flags | os.O_DIRECTORY))
        opened.append(os.open(layout.FILES_DIR, flags | os.O_DIRECTORY, dir_fd=opened[-1]))
        opened.append(os.open(name, flags | os.O_NONBLOCK, dir_fd=opened[-1]))
        status = os.fstat(opened[-1])
        if not stat.S_ISREG(status.st_mode) or status.st_size != size:
            return b""
        return os.pread(opened[-1], size + 1, 0) if size else b""
    except FileNotFoundError:
        raise IntegrityError(f"{where} is missing (run `ctxstore verify`)") from None
    except OSError as exc:
        raise IntegrityError(
            f"{where} cannot be read: {exc.strerror} (run `ctxstore verify`)"
        ) from None
    finally:
        for fd in opened:
            os.close(fd)
