"""The .npy format as ctxstore writes and maps it.

Every stored tensor is a standard .npy file (``np.load`` opens it anywhere),
always C-ordered, its header padded so the data starts 64-byte aligned. The
index records dtype, shape and the data offset, so the read path maps a file
with ``os.open`` + ``mmap`` + ``np.ndarray(buffer=, offset=)`` and never parses
a header (about 4 us a file, against about 100 us for ``np.load(mmap_mode="r")``).
"""

from __future__ import annotations

import ast
import io
import mmap
import os
import struct
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import IntegrityError, NotFoundError

Array = npt.NDArray[Any]


@lru_cache(maxsize=1024)  # bytes each; a structured dtype's can reach 64 KiB and more
def npy_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    """The .npy header for a C-ordered array of ``dtype`` and ``shape`` (format 1.0, else 2.0).

    Cached: a model commits the same shapes version after version, and numpy
    builds each header by formatting and padding a dict's repr.
    """
    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": shape,
    }
    try:
        return _header_bytes(np.lib.format.write_array_header_1_0, header)
    except UnicodeEncodeError:  # non-latin-1 field names need format 3.0 (UTF-8 header)
        return _header_bytes(_write_header_3_0, header)
    except ValueError:  # longer than 64 KiB: structured dtypes with many fields
        return _header_bytes(np.lib.format.write_array_header_2_0, header)


def _header_bytes(writer: Any, header: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    writer(buf, header)
    return buf.getvalue()


def _write_header_3_0(buf: io.BytesIO, header: dict[str, Any]) -> None:
    """Format 3.0: as 2.0 with a UTF-8 header (numpy reads it, but only writes it privately)."""
    text = "{" + "".join(f"{key!r}: {header[key]!r}, " for key in sorted(header)) + "}"
    prefix = 6 + 2 + 4  # magic, version, uint32 header length
    body = text.encode("utf-8")
    padding = -(prefix + len(body) + 1) % 64
    body += b" " * padding + b"\n"
    buf.write(b"\x93NUMPY\x03\x00" + struct.pack("<I", len(body)) + body)


@lru_cache(maxsize=4096)
def dtype_to_text(dtype: np.dtype[Any]) -> str:
    """How a dtype is recorded in the index: the repr of its .npy descr (cached)."""
    return repr(np.lib.format.dtype_to_descr(dtype))


@lru_cache(maxsize=4096)
def dtype_from_text(text: str) -> np.dtype[Any]:
    """Inverse of :func:`dtype_to_text`, cached: the read path sees few distinct dtypes."""
    try:
        descr = ast.literal_eval(text)
        dtype: np.dtype[Any] = np.lib.format.descr_to_dtype(descr)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise IntegrityError(f"index records an unreadable dtype {text!r:.80}") from exc
    return dtype


@lru_cache(maxsize=4096)
def dtype_name(text: str) -> str:
    """The readable name of a recorded dtype (``float32``, ``>i8``...)."""
    return str(dtype_from_text(text))


def shape_to_text(shape: tuple[int, ...]) -> str:
    return ",".join(map(str, shape))


def shape_from_text(text: str) -> tuple[int, ...]:
    return tuple(map(int, text.split(","))) if text else ()


def contiguous_bytes(array: Array) -> memoryview:
    """A flat byte view of ``array``'s data in C order (copies only if it is not C-contiguous)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return memoryview(flat.view(np.uint8).data)


def map_array(
    path: str, dtype: np.dtype[Any], shape: tuple[int, ...], offset: int, nbytes: int
) -> Array:
    """Map a stored tensor read-only, checking the file size against its record.

    ``nbytes`` is the recorded data size (dtype.itemsize times the element
    count). Raises NotFoundError when the file is gone and IntegrityError when
    its size disagrees with the record: a wrong-sized array is never returned.
    """
    return map_arrays("", ((path, dtype, shape, offset, nbytes),))[0]


def map_arrays(
    prefix: str, specs: Iterable[tuple[str, np.dtype[Any], tuple[int, ...], int, int]]
) -> list[Array]:
    """:func:`map_array` for each (file name, dtype, shape, offset, nbytes) under ``prefix``.

    One loop with everything it calls bound locally: a 300-tensor context is
    300 opens and maps, and a Python call per tensor would cost a tenth more.
    """
    arrays: list[Array] = []
    append, open_, close, new_map, ndarray = arrays.append, os.open, os.close, mmap.mmap, np.ndarray
    flags, access = os.O_RDONLY | os.O_CLOEXEC, mmap.ACCESS_READ
    for file_name, dtype, shape, offset, nbytes in specs:
        path = prefix + file_name
        try:
            fd = open_(path, flags)
        except FileNotFoundError:
            raise NotFoundError(f"tensor file {path} does not exist") from None
        try:
            mm = new_map(fd, 0, access=access)
        except ValueError:  # an empty file cannot be mapped
            raise IntegrityError(f"tensor file {path} is empty") from None
        finally:
            close(fd)
        if len(mm) != offset + nbytes:
            size = len(mm)
            mm.close()
            raise IntegrityError(
                f"tensor file {path} has {size} bytes, its record says {offset + nbytes}"
            )
        try:
            append(ndarray(shape, dtype, mm, offset))
        except (TypeError, ValueError):  # the record's shape needs more bytes than it says
            mm.close()
            raise IntegrityError(
                f"tensor file {path}: record {dtype}{list(shape)} does not fit {nbytes} bytes"
            ) from None
    return arrays
