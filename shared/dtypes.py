"""The element types ctxstore stores: numpy's own, and the ml_dtypes small floats.

numpy has no bfloat16 or float8; checkpoints are full of them. The ml_dtypes
package (what JAX and TensorFlow use) adds them as numpy dtypes, but a .npy
header cannot name them: ``np.save`` writes a bfloat16 array as raw bytes
(``'<V2'``) and a float8_e5m2 one as ``'<f1'``, which ``np.load`` cannot even
read. So ctxstore keeps two things apart:

- the *true* dtype, recorded in the index by its ml_dtypes name (``bfloat16``)
  and handed to every reader, and
- the *storage* dtype of the .npy header: the unsigned integer of the same
  width (``'<u2'`` for bfloat16, ``'|u1'`` for float8), so a plain
  ``np.load`` of a stored file returns the exact bits.

ml_dtypes is imported only when a recorded name has to become a dtype: a
process that never meets one never pays for its import (about a second on a
busy host). A dtype made by ml_dtypes is recognised by its scalar type's module,
which needs no import either. Every check here answers for a dtype object, so
the hot paths cache on it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from functools import lru_cache
from types import MappingProxyType
from typing import Any

import numpy as np

#: the ml_dtypes types ctxstore records by name (a fixed allowlist: the index
#: text of a dtype is one of these or a numpy .npy descr, nothing else)
ML_DTYPE_NAMES = frozenset(
    {
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e4m3b11fnuz",
        "float8_e4m3",
        "float8_e3m4",
        "float8_e5m3fnu",
        "float8_e8m0fnu",
        "float6_e2m3fn",
        "float6_e3m2fn",
        "float4_e2m1fn",
        "int1",
        "uint1",
        "int2",
        "uint2",
        "int4",
        "uint4",
        "complex32",
        "bcomplex32",
    }
)

#: safetensors dtype code -> dtype text (a numpy ``dtype.str`` or an ml_dtypes name)
SAFETENSORS_DTYPES = MappingProxyType(
    {
        "BOOL": "|b1",
        "U8": "|u1",
        "I8": "|i1",
        "U16": "<u2",
        "I16": "<i2",
        "U32": "<u4",
        "I32": "<i4",
        "U64": "<u8",
        "I64": "<i8",
        "F16": "<f2",
        "F32": "<f4",
        "F64": "<f8",
        "C64": "<c8",
        "BF16": "bfloat16",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "F8_E8M0": "float8_e8m0fnu",
    }
)

#: safetensors codes of packed sub-byte types (two F4, or four F6 in three bytes):
#: ml_dtypes holds one element per byte, so these cannot keep the file's layout
SAFETENSORS_PACKED = frozenset({"F4", "F6_E2M3", "F6_E3M2"})

#: numpy's own kinds a .npy descr states faithfully (object, void and others are not)
_PLAIN_KINDS = frozenset("biufcmMSU")


def ml_dtype_name(dtype: np.dtype[Any]) -> str | None:
    """The ml_dtypes name of ``dtype`` (``"bfloat16"``), or None for any other dtype."""
    scalar = dtype.type
    if not scalar.__module__.startswith("ml_dtypes"):
        return None
    name = scalar.__name__
    return name if name in ML_DTYPE_NAMES else None


def ml_dtype(name: str) -> np.dtype[Any]:
    """The dtype of ml_dtypes type ``name`` (imports ml_dtypes; LookupError if unknown)."""
    if name not in ML_DTYPE_NAMES:
        raise LookupError(f"{name!r:.40} is not an ml_dtypes type ctxstore records")
    module = importlib.import_module("ml_dtypes")
    scalar = getattr(module, name, None)
    if scalar is None:
        raise LookupError(
            f"dtype {name} needs a newer ml_dtypes than {getattr(module, '__version__', '?')}"
        )
    dtype: np.dtype[Any] = np.dtype(scalar)
    return dtype


@lru_cache(maxsize=256)
def storage_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype a stored .npy header declares for ``dtype``: itself, or for an ml_dtypes
    type the unsigned integer of its width (what ``np.load`` then returns: the bits)."""
    if ml_dtype_name(dtype) is None:
        return dtype
    return np.dtype(f"<u{dtype.itemsize}")


@lru_cache(maxsize=256)
def dtype_problem(dtype: np.dtype[Any]) -> str | None:
    """Why ``dtype`` cannot be stored so that it reads back as itself (a clause about
    "it"), or None when it can.

    Storable: numpy's numeric, bool, string and datetime dtypes, structured
    dtypes of those, and the ml_dtypes types (native byte order) as a whole
    array's dtype. Refused: Python objects (a .npy could only pickle them), raw
    void (it does not say what its bytes are), other libraries' dtypes, and
    ml_dtypes types inside a structured dtype (its .npy descr would say void).
    """
    name = ml_dtype_name(dtype)
    if name is not None:
        if dtype != np.dtype(dtype.type):
            return f"it is a byte-swapped {name}; convert it to native byte order first"
        return None
    for field, leaf in _leaves(dtype, ""):
        problem = _leaf_problem(leaf, f"its field {field!r}" if field else "it")
        if problem is not None:
            return problem
    return None


def _leaf_problem(leaf: np.dtype[Any], subject: str) -> str | None:
    if leaf.hasobject:
        return (
            f"{subject} holds Python objects; only plain numeric, bool, string, datetime, "
            "structured and ml_dtypes (bfloat16, float8...) dtypes can be stored"
        )
    if leaf.type.__module__.startswith("ml_dtypes"):
        if subject == "it":
            return f"it is an ml_dtypes type ctxstore does not record ({leaf.type.__name__})"
        return (
            f"{subject} is {leaf.type.__name__}, which a structured dtype cannot record; "
            "store that field as a tensor of its own"
        )
    if leaf.kind == "V":
        return (
            f"{subject} is raw bytes (void), which do not say what they hold; give the "
            "array its true dtype (for example an ml_dtypes type such as bfloat16)"
        )
    if leaf.kind not in _PLAIN_KINDS:
        return f"{subject} is {leaf}, which a .npy file cannot record faithfully"
    return None


def _leaves(dtype: np.dtype[Any], path: str) -> Iterator[tuple[str, np.dtype[Any]]]:
    """(field path, dtype) of every element type inside ``dtype``, itself if it is plain."""
    if dtype.fields is not None:
        for field, spec in dtype.fields.items():
            yield from _leaves(spec[0], f"{path}.{field}" if path else str(field))
    elif dtype.subdtype is not None:
        yield from _leaves(dtype.subdtype[0], path)
    else:
        yield path, dtype


def spec_text(dtype: np.dtype[Any]) -> str:
    """How a dtype travels in a publish descriptor: its ml_dtypes name or numpy's ``dtype.str``."""
    return ml_dtype_name(dtype) or dtype.str


def dtype_from_spec(text: str) -> np.dtype[Any]:
    """Inverse of :func:`spec_text` (for a text a descriptor's validation accepted)."""
    return ml_dtype(text) if text in ML_DTYPE_NAMES else np.dtype(text)


def is_ml_float(dtype: np.dtype[Any]) -> bool:
    """True for the ml_dtypes floating and complex types (which can hold NaN or Inf)."""
    name = ml_dtype_name(dtype)
    return name is not None and not name.startswith(("int", "uint"))
