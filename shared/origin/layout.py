"""The origin's object keys and its two records, a version manifest and a slot head.

Sans-IO: what the uploader writes and the follower reads, checked on the way in.
The layout under ``s3://BUCKET/PREFIX``::

    objects/<checksum>                 a tensor file (.npy, byte-exact) or an extra file,
                                       immutable, named by its xxh3-128: shared by every
                                       version and slot that holds the same bytes
    manifests/<slot>/<version>.json    one version: config, metadata, tensors, files;
                                       created only if absent (If-None-Match: *)
    heads/<slot>.json                  the slot's current version and aliases, and a
                                       sequence number; moved by compare-and-swap (If-Match)

A manifest is written only after every object it names, and a head only after
its manifest, so whatever a reader of the origin finds through a head is whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..errors import IntegrityError, InvalidInputError
from ..validation import (
    RESERVED_ALIASES,
    check_alias,
    check_slot,
    check_tensor_name,
    check_version,
)
from ..versionfiles import check_file_name

_CHECKSUM = re.compile(r"[0-9a-f]{32}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
#: what a manifest or head may weigh: both are small JSON records
MAX_RECORD_BYTES = 16 << 20


@dataclass(frozen=True, slots=True)
class Origin:
    """Where the origin lives: ``s3://BUCKET/PREFIX`` (the prefix may be empty)."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise InvalidInputError(f"an origin is s3://BUCKET/PREFIX, got {url!r}")
        if not _BUCKET.fullmatch(parts.netloc):
            raise InvalidInputError(f"{parts.netloc!r} in {url!r} is no valid S3 bucket name")
        if parts.query or parts.fragment:
            raise InvalidInputError(f"an origin URL takes no query or fragment: {url!r}")
        prefix = parts.path.strip("/")
        if ".." in prefix.split("/"):
            raise InvalidInputError(f"an origin prefix has no '..' part: {url!r}")
        return cls(parts.netloc, prefix)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts)) if self.prefix else "/".join(parts)

    def object_key(self, checksum: str) -> str:
        return self.key("objects", check_checksum(checksum))

    def manifest_key(self, slot: int, version: int) -> str:
        return self.key("manifests", str(slot), f"{version}.json")

    def head_key(self, slot: int) -> str:
        return self.key("heads", f"{slot}.json")

    @property
    def heads_prefix(self) -> str:
        return self.key("heads", "")

    def slot_of_head(self, key: str) -> int | None:
        """The slot a key under ``heads/`` names, or None for anything else there."""
        name = key.removeprefix(self.heads_prefix)
        if name == key or not name.endswith(".json") or not name[:-5].isdigit():
            return None
        try:
            return check_slot(int(name[:-5]))
        except InvalidInputError:
            return None


def set_aliases(aliases: Mapping[str, int]) -> dict[str, int]:
    """The aliases a user set, without the ones the store computes (``latest``)."""
    return {name: v for name, v in aliases.items() if name not in RESERVED_ALIASES}


def check_checksum(text: object) -> str:
    if not isinstance(text, str) or not _CHECKSUM.fullmatch(text):
        raise IntegrityError(f"{text!r:.80} is no xxh3-128 checksum (32 lowercase hex digits)")
    return text


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a version: its .npy file's object and what the index records of it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    checksum: str

    @property
    def size(self) -> int:
        """The file's size (header and data)."""
        return self.offset + self.nbytes


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One extra file of a version (config.json, a tokenizer ...)."""

    name: str
    size: int
    checksum: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """One version as the origin holds it; written once, never changed."""

    slot: int
    version: int
    model_type: str | None
    config: Mapping[str, Any]
    metadata: Mapping[str, Any]
    tensors: tuple[TensorEntry, ...]
    files: tuple[FileEntry, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(t.size for t in self.tensors) + sum(f.size for f in self.files)

    def to_bytes(self) -> bytes:
        body = {
            "kind": "ctxstore.manifest",
            "slot": self.slot,
            "version": self.version,
            "model_type": self.model_type,
            "config": dict(self.config),
            "metadata": dict(self.metadata),
            "tensors": [
                [t.name, t.dtype, list(t.shape), t.offset, t.nbytes, t.checksum]
                for t in self.tensors
            ],
            "files": [[f.name, f.size, f.checksum] for f in self.files],
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        body = _load(data, where, "ctxstore.manifest")
        try:
            tensors = tuple(
                TensorEntry(
                    check_tensor_name(name),
                    _text(dtype),
                    tuple(_count(n) for n in shape),
                    _count(offset),
                    _count(nbytes),
                    check_checksum(checksum),
                )
                for name, dtype, shape, offset, nbytes, checksum in body["tensors"]
            )
            files = tuple(
                FileEntry(check_file_name(name), _count(size), check_checksum(checksum))
                for name, size, checksum in body["files"]
            )
            model_type = body["model_type"]
            if model_type is not None:
                model_type = _text(model_type)
            config, metadata = body["config"], body["metadata"]
            if not isinstance(config, dict) or not isinstance(metadata, dict):
                raise InvalidInputError("config and metadata are JSON objects")  # noqa: TRY301
            return cls(
                check_slot(body["slot"]),
                check_version(body["version"]),
                model_type,
                config,
                metadata,
                tensors,
                files,
            )
        except (KeyError, TypeError, ValueError, InvalidInputError, IntegrityError) as exc:
            raise IntegrityError(f"{where} is no valid manifest: {exc}") from None


@dataclass(frozen=True, slots=True)
class Head:
    """A slot's head: what it serves and its aliases; ``seq`` goes up by one per move.

    ``versions``: every version the writer keeps (ascending), each with a manifest at
    the origin, so a follower can hold the same ones (a rollback names one of them).
    """

    slot: int
    seq: int
    current: int
    aliases: Mapping[str, int] = field(default_factory=dict)
    model_type: str | None = None
    versions: tuple[int, ...] = ()

    def same_pointers(
        self, current: int, aliases: Mapping[str, int], versions: tuple[int, ...]
    ) -> bool:
        return (self.current, dict(self.aliases), self.versions) == (
            current, dict(aliases), versions
        )  # fmt: skip

    def to_bytes(self) -> bytes:
        body = {
            "kind": "ctxstore.head",
            "slot": self.slot,
            "seq": self.seq,
            "current": self.current,
            "aliases": dict(self.aliases),
            "model_type": self.model_type,
            "versions": list(self.versions),
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Head:
        body = _load(data, where, "ctxstore.head")
        try:
            aliases = body["aliases"]
            if not isinstance(aliases, dict):
                raise InvalidInputError("aliases is a JSON object")  # noqa: TRY301
            model_type = body.get("model_type")
            return cls(
                check_slot(body["slot"]),
                _count(body["seq"]),
                check_version(body["current"]),
                {check_alias(a): check_version(v) for a, v in aliases.items()},
                None if model_type is None else _text(model_type),
                tuple(sorted({check_version(v) for v in body.get("versions", ())})),
            )
        except (KeyError, TypeError, ValueError, InvalidInputError, IntegrityError) as exc:
            raise IntegrityError(f"{where} is no valid head: {exc}") from None


def _load(data: bytes, where: str, kind: str) -> dict[str, Any]:
    if len(data) > MAX_RECORD_BYTES:
        raise IntegrityError(f"{where} is {len(data)} bytes, more than a record may be")
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise IntegrityError(f"{where} is not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("kind") != kind:
        raise IntegrityError(f"{where} is not a {kind} record")
    return body


def _count(value: object) -> int:
    if type(value) is not int or value < 0:
        raise InvalidInputError(f"{value!r:.40} is not a count")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 256:
        raise InvalidInputError(f"{value!r:.40} is not a short string")
    return value
