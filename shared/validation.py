"""Validation of every identifier and value that crosses a boundary.

The CLI, the socket, the HTTP API and the Python API all check their input
here, so a slot id, tensor name, alias or config is refused the same way on
every surface, with a message that says what was wrong. The identifier checks
(slot, version, label, alias, tensor name) live in :mod:`ctxstore.checks` and
are re-exported here; this module holds the dtype, shape and JSON checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from .checks import (
    MAX_SLOT,
    MAX_TENSOR_NAME_BYTES,
    MAX_VERSION,
    RESERVED_ALIASES,
    check_alias,
    check_label,
    check_slot,
    check_tensor_name,
    check_version,
)
from .dtypes import dtype_problem
from .errors import InvalidInputError

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_JSON_ITEMS",
    "MAX_SLOT",
    "MAX_TENSORS",
    "MAX_TENSOR_NAME_BYTES",
    "MAX_VERSION",
    "RESERVED_ALIASES",
    "check_alias",
    "check_dtype",
    "check_label",
    "check_shape",
    "check_slot",
    "check_tensor_name",
    "check_version",
    "freeze_json",
    "freeze_mapping",
    "freeze_trusted_json",
    "thaw_json",
]

MAX_TENSORS = 100_000
MAX_JSON_DEPTH = 32
MAX_JSON_ITEMS = 100_000
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


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
