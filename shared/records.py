"""Plain records the store returns: what a slot, a version and a tensor look like."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple


class TensorInfo(NamedTuple):
    """One tensor of a version, as recorded (a tuple: cheap to build 300 at a time)."""

    position: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    checksum: str


@dataclass(frozen=True, slots=True)
class VersionInfo:
    slot: int
    version: int
    created_at: float
    n_tensors: int
    nbytes: int
    pinned: bool
    aliases: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SlotInfo:
    slot: int
    model_type: str | None
    current_version: int | None
    latest_version: int | None
    n_versions: int
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class ContextMetadata:
    """Everything about one stored version except its tensor data.

    Built by keyword; the field order is the key order of the HTTP API's body
    (``daemon/http/schemas.py`` makes its model from these fields).
    """

    slot: int
    version: int
    model_type: str | None
    current_version: int | None
    created_at: float
    pinned: bool
    aliases: tuple[str, ...]
    config: Mapping[str, Any]
    metadata: Mapping[str, Any]
    tensors: tuple[TensorInfo, ...] | None


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing :meth:`PersistentStore.verify` found wrong."""

    kind: str
    detail: str
    slot: int | None = None
    version: int | None = None
    tensor: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = "store" if self.slot is None else f"slot {self.slot}"
        if self.version is not None:
            where += f" version {self.version}"
        if self.tensor is not None:
            where += f" tensor {self.tensor!r}"
        return f"{where}: {self.kind}: {self.detail}"


class FileInfo(NamedTuple):
    """One extra file of a version (``config.json``, tokenizer files ...), as recorded."""

    name: str
    size: int
    checksum: str
