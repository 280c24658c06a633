"""The tensor descriptors of a ``publish_shm`` frame: where each tensor lies in the segment.

A :class:`TensorSpec` checks its name, dtype, shape and byte span when it is
built, so the daemon reads only the bytes a valid descriptor names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Final, TypeAlias

import numpy as np

from ..checks import check_tensor_name, integer
from ..dtypes import ML_DTYPE_NAMES, ml_dtype, spec_text
from ..errors import InvalidInputError
from ..validation import MAX_TENSORS, check_dtype, check_shape
from .fields import MAX_ID, Check, Field, sequence, size, tuple_of

MAX_NDIM: Final = 32
MAX_DIM: Final = 2**62

_DTYPE = re.compile(r"[<>|=]?[biufcmMSUV][0-9]{1,6}(\[[0-9]{0,4}[A-Za-z]{1,3}\])?")


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
        dtype, text = _accepted_dtype(self.dtype, name)
        shape = _spec_field(name, "shape", _shape, self.shape)
        check_shape(shape, dtype.itemsize, f"tensor {name!r}")
        offset, nbytes = self.offset, self.nbytes
        if not (type(offset) is int and type(nbytes) is int and offset >= 0 and nbytes >= 0
                and offset <= MAX_ID and nbytes <= MAX_ID):  # fmt: skip
            _spec_field(name, "offset", size, offset)  # says what is wrong
            nbytes = _spec_field(name, "nbytes", size, nbytes)
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
    if (type(value) is list or type(value) is tuple) and all(
        type(n) is int and 0 <= n <= MAX_DIM for n in value
    ):  # the common case, in one pass; anything else is told by the checks below
        shape: tuple[int, ...] = tuple(value)
    else:
        shape = _DIMS(value)
    if len(shape) > MAX_NDIM:
        raise InvalidInputError(f"has more than {MAX_NDIM} dimensions")
    return shape


#: dtype strings accepted so far -> (dtype, spec text): a publish names the same few
#: dtypes for every tensor of every version, and parsing one costs more than the rest of
#: its descriptor's checks. Bounded: a peer sending ever new strings only misses it.
_ACCEPTED: dict[str, tuple[np.dtype[Any], str]] = {}
_ACCEPTED_MAX: Final = 64


def _accepted_dtype(value: Any, name: str) -> tuple[np.dtype[Any], str]:
    """:func:`_dtype` and its spec text, remembered for a string already accepted."""
    if type(value) is str:
        known = _ACCEPTED.get(value)
        if known is not None:
            return known
    dtype = _dtype(value, name)
    known = (dtype, spec_text(dtype))
    if type(value) is str and len(_ACCEPTED) < _ACCEPTED_MAX:
        _ACCEPTED[value] = known
    return known


_DIMS: Final = tuple_of(integer(0, MAX_DIM))


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


def manifest(value: Any) -> tuple[TensorSpec, ...]:
    entries = sequence(value)
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


def dump_manifest(specs: tuple[TensorSpec, ...]) -> list[list[Any]]:
    """The wire form of a checked manifest: one ``[name, dtype, shape, offset, nbytes]`` each."""
    return [spec.to_wire() for spec in specs]


Manifest: TypeAlias = Annotated[tuple[TensorSpec, ...], Field(manifest, dump=dump_manifest)]
