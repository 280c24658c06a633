"""Validation of every identifier and value that crosses a boundary.

The CLI, the socket, the HTTP API and the Python API all check their input
here, so a slot id, tensor name, alias or config is refused the same way on
every surface, with a message that says what was wrong.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from .dtypes import dtype_problem
from .errors import InvalidInputError

MAX_SLOT = 2**31 - 1
MAX_VERSION = 2**63 - 1
MAX_TENSOR_NAME_BYTES = 256
MAX_TENSORS = 100_000
MAX_JSON_DEPTH = 32
MAX_JSON_ITEMS = 100_000
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

_LABEL = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
RESERVED_ALIASES = frozenset({"latest", "current"})


def check_slot(slot: object) -> int:
    """Return ``slot`` as an int, or raise: slots are integers in [0, 2**31 - 1]."""
    if isinstance(slot, bool) or not isinstance(slot, int | np.integer):
        raise InvalidInputError(f"slot must be an integer, got {type(slot).__name__} {slot!r:.40}")
    value = int(slot)
    if not 0 <= value <= MAX_SLOT:
        raise InvalidInputError(f"slot must be between 0 and {MAX_SLOT}, got {value}")
    return value


def check_version(version: object) -> int:
    """Return ``version`` as an int, or raise: versions are integers >= 1."""
    if isinstance(version, bool) or not isinstance(version, int | np.integer):
        raise InvalidInputError(
            f"version must be an integer, got {type(version).__name__} {version!r:.40}"
        )
    value = int(version)
    if not 1 <= value <= MAX_VERSION:
        raise InvalidInputError(f"version must be between 1 and {MAX_VERSION}, got {value}")
    return value


def check_label(value: object, what: str) -> str:
    """Alias, group and model-type names: a letter, then up to 63 of [A-Za-z0-9_.-]."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a string, got {type(value).__name__}")
    if not _LABEL.fullmatch(value) or ".." in value:
        raise InvalidInputError(
            f"{what} {value!r:.80} is not allowed: use a letter followed by up to 63 "
            "letters, digits, '_', '-' or '.' (no '..')"
        )
    return value


def check_alias(name: object) -> str:
    """An alias a user may set: a label that is not reserved."""
    alias = check_label(name, "alias")
    if alias in RESERVED_ALIASES:
        raise InvalidInputError(f"alias {alias!r} is reserved")
    return alias


def check_tensor_name(name: object) -> str:
    """Tensor names: 1-256 UTF-8 bytes, no control characters, no path traversal.

    Names never become paths (files are named by position), but they travel
    through logs, HTTP and terminals, so anything that looks like traversal or
    carries control or invisible format characters is refused.
    """
    if not isinstance(name, str):
        raise InvalidInputError(f"tensor name must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidInputError("tensor name must not be empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_TENSOR_NAME_BYTES:
        raise InvalidInputError(
            f"tensor name {name[:40]!r}... is longer than {MAX_TENSOR_NAME_BYTES} UTF-8 bytes"
        )
    # ASCII is printable exactly where it holds no category-C character: the common case
    # costs one C call, not a category lookup per character
    for char in "" if name.isascii() and name.isprintable() else name:
        if unicodedata.category(char)[0] == "C":
            raise InvalidInputError(
                f"tensor name {name!r:.80} contains control or invisible character {char!r}"
            )
    if name.startswith(("/", "\\")) or "\\" in name:
        raise InvalidInputError(f"tensor name {name!r:.80} must not start with '/' or contain '\\'")
    if any(part in {".", ".."} for part in name.split("/")):
        raise InvalidInputError(f"tensor name {name!r:.80} must not contain '.' or '..' segments")
    return name


def check_dtype(dtype: np.dtype[Any], name: str) -> None:
    """Refuse dtypes that would not read back as themselves (see :func:`.dtypes.dtype_problem`):
    Python objects, raw void, and anything a .npy header or the index cannot name."""
    problem = dtype_problem(dtype)
    if problem is not None:
        raise InvalidInputError(f"tensor {name!r} has dtype {dtype}: {problem}")


def check_shape(shape: tuple[int, ...], itemsize: int, what: str) -> tuple[int, ...]:
    """Refuse a shape numpy cannot make an array of, ``(0, 10**30)`` included.

    numpy needs every dimension, and the product of the non-zero ones times the
    element size, to fit in a signed 64-bit byte count, even when a zero
    dimension leaves the array empty; past that it raises a bare ValueError.
    """
    extent = max(itemsize, 1)
    for n in shape:
        if n > _SIZE_MAX:
            extent = _SIZE_MAX + 1
            break
        extent *= n or 1
    if extent > _SIZE_MAX:
        raise InvalidInputError(
            f"{what}: shape {list(shape)!s:.120} is too large for an array (its non-zero "
            f"dimensions times the {itemsize}-byte element size exceed 2**63 - 1 bytes)"
        )
    return shape


_SIZE_MAX = 2**63 - 1


def freeze_json(value: object, what: str) -> Any:
    """Validate JSON-like data and return an immutable copy of it.

    Dicts become read-only mappings and lists become tuples, so nothing
    reachable from a Context can be mutated. Numpy scalars become Python
    scalars; NaN, infinities, non-string keys and other types are refused.
    """
    counter = [0]
    return _freeze(value, what, 0, counter)


def _freeze(value: object, path: str, depth: int, counter: list[int]) -> Any:
    counter[0] += 1
    if counter[0] > MAX_JSON_ITEMS:
        raise InvalidInputError(f"{path}: more than {MAX_JSON_ITEMS} values")
    if depth > MAX_JSON_DEPTH:
        raise InvalidInputError(f"{path}: nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        value = value.item()
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise InvalidInputError(f"{path}: integer {value} does not fit in 64 bits")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError(f"{path}: {value} is not a finite number")
        return value
    if isinstance(value, Mapping):
        frozen = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInputError(f"{path}: key {key!r:.40} is not a string")
            frozen[key] = _freeze(item, f"{path}.{key}", depth + 1, counter)
        return MappingProxyType(frozen)
    if isinstance(value, list | tuple):
        return tuple(
            _freeze(item, f"{path}[{i}]", depth + 1, counter) for i, item in enumerate(value)
        )
    raise InvalidInputError(
        f"{path}: {type(value).__name__} is not plain JSON-like data "
        "(use None, bool, int, float, str, list or dict with string keys)"
    )


def freeze_trusted_json(value: Any) -> Any:
    """What :func:`freeze_json` makes of JSON this package validated when it wrote it.

    The same immutable shape (read-only mappings, tuples) without checking each
    value again: the store's read path decodes config and metadata on every
    load and metadata lookup, and the checks cost five times the decoding.
    """
    kind = type(value)
    if kind is dict:
        return MappingProxyType(
            {k: freeze_trusted_json(v) if type(v) in _CONTAINERS else v for k, v in value.items()}
        )
    if kind is list:
        return tuple(freeze_trusted_json(v) if type(v) in _CONTAINERS else v for v in value)
    return value


_CONTAINERS = frozenset({dict, list})


def thaw_json(value: Any) -> Any:
    """The mutable (dict / list) deep copy of a frozen value."""
    if isinstance(value, Mapping):
        return {key: thaw_json(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [thaw_json(item) for item in value]
    return value


def freeze_mapping(value: object, what: str) -> Mapping[str, Any]:
    """Like :func:`freeze_json` for a top-level dict (config, metadata); None means empty."""
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"{what} must be a dict, got {type(value).__name__}")
    frozen: Mapping[str, Any] = freeze_json(value, what)
    return frozen
