"""The .npy format as ctxstore writes and maps it.

Every stored tensor is a standard .npy file (``np.load`` opens it anywhere),
always C-ordered, its header padded so the data starts 64-byte aligned. The
index records dtype, shape and the data offset, so the read path maps a file
with ``os.open`` + ``mmap`` + ``np.ndarray(buffer=, offset=)`` and never parses
a header (about 4 us a file, against about 100 us for ``np.load(mmap_mode="r")``).

An ml_dtypes tensor (bfloat16, float8...) is written with the unsigned integer
of its width in the header (a .npy descr cannot name it; see dtypes.py) and
recorded in the index by its name, which is what the read path maps it as.

The map is private and writable (:class:`PrivateMap`, ``MAP_PRIVATE`` with
``PROT_READ|PROT_WRITE``): its pages are the page cache's, shared with every
other reader, until this process writes one, which the kernel then copies for
this process alone. Nothing written reaches the file or another process, so an
in-place write through a torch tensor over the map (``ctxstore.readers.torch``)
is a private edit, not a SIGSEGV. The numpy arrays stay flagged read-only.
Under ``vm.overcommit_memory=2`` a writable private map is charged to the
commit limit at its full size; when the kernel refuses that charge (ENOMEM)
the file is mapped read-only instead, and the torch adapter copies it.
"""

from __future__ import annotations

import ast
import errno
import io
import mmap
import os
import struct
from collections.abc import Iterable
from functools import lru_cache
from typing import Any, NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt

from ..dtypes import ML_DTYPE_NAMES, ml_dtype, ml_dtype_name, storage_dtype
from ..errors import IntegrityError, NotFoundError

Array = npt.NDArray[Any]


@lru_cache(maxsize=1024)  # bytes each; a structured dtype's can reach 64 KiB and more
def npy_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    """The .npy header for a C-ordered array of ``dtype`` and ``shape`` (format 1.0, else 2.0).

    An ml_dtypes ``dtype`` is declared as its :func:`~.dtypes.storage_dtype`.
    Cached: a model commits the same shapes version after version, and numpy
    builds each header by formatting and padding a dict's repr.
    """
    header = {
        "descr": np.lib.format.dtype_to_descr(storage_dtype(dtype)),
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
    """How a dtype is recorded in the index (cached).

    The repr of its .npy descr (``"'<f4'"``, ``"[('a', '<i8')]"``), or for an
    ml_dtypes type its bare name (``bfloat16``). A bare name is no Python
    literal, so the two forms cannot be confused, and a version of ctxstore
    that predates the names refuses them as unreadable instead of misreading.
    """
    return ml_dtype_name(dtype) or repr(np.lib.format.dtype_to_descr(dtype))


@lru_cache(maxsize=4096)
def dtype_from_text(text: str) -> np.dtype[Any]:
    """Inverse of :func:`dtype_to_text`, cached: the read path sees few distinct dtypes."""
    if text in ML_DTYPE_NAMES:
        try:
            return ml_dtype(text)
        except (ImportError, LookupError) as exc:
            raise IntegrityError(
                f"index records dtype {text}, which cannot be loaded: {exc}"
            ) from exc
    try:
        descr = ast.literal_eval(text)
        dtype: np.dtype[Any] = np.lib.format.descr_to_dtype(descr)
    except (ValueError, SyntaxError, TypeError, IndexError, KeyError, RecursionError) as exc:
        raise IntegrityError(f"index records an unreadable dtype {text!r:.80}") from exc
    check_recorded_dtype(dtype, f"index records dtype {text!r:.80}")
    return dtype


#: numpy kinds a recorded dtype may have: bool, integers, floats, complex, bytes, str,
#: datetimes; and void only when structured (its fields say what the bytes are)
_RECORDED_KINDS = frozenset("biufcSUMmV")


def check_recorded_dtype(dtype: np.dtype[Any], where: str) -> None:
    """Refuse a dtype the index names but no stored tensor can have (IntegrityError).

    The index is data like any other: a tampered one could name an object dtype
    (numpy would read pointers out of the file: a crash) or raw void bytes standing
    for numbers of unknown type. Allowed: the plain kinds above, structured dtypes
    whose fields are none of those traps, never a zero-size item or a subarray.
    ``where`` says which record named it. The ml_dtypes types (bfloat16, float8...)
    are allowed: the index names them, so their void kind does not hide what they are.
    """
    if ml_dtype_name(dtype) is not None and dtype == np.dtype(dtype.type):
        return
    if dtype.hasobject:
        raise IntegrityError(f"{where}: dtype {dtype} holds Python objects; no stored tensor can")
    if dtype.kind not in _RECORDED_KINDS:
        raise IntegrityError(f"{where}: dtype {dtype} is not one ctxstore stores")
    if dtype.kind == "V" and dtype.fields is None:
        raise IntegrityError(
            f"{where}: dtype {dtype} is raw void bytes with no fields; no stored tensor has it"
        )
    if dtype.subdtype is not None or dtype.itemsize == 0:
        raise IntegrityError(f"{where}: dtype {dtype} is not the dtype of a stored array")


@lru_cache(maxsize=4096)
def dtype_name(text: str) -> str:
    """The readable name of a recorded dtype (``float32``, ``>i8``...)."""
    return str(dtype_from_text(text))


def shape_to_text(shape: tuple[int, ...]) -> str:
    return ",".join(map(str, shape))


def shape_from_text(text: str) -> tuple[int, ...]:
    return tuple(map(int, text.split(","))) if text else ()


class PrivateMap(mmap.mmap):
    """A stored tensor file mapped copy-on-write (``mmap.ACCESS_COPY``).

    Its own type so that :func:`ctxstore.context.freeze_array` can tell the
    store's maps (whose writes never leave this process, and which only a
    deliberately writable view such as the torch adapter's writes) from any
    other writable buffer, and the torch adapter can find the map to build a
    writable tensor over it.

    ``lent``: set (True) once a writable view of it was handed out, whose writes
    this process may have made: a version that shares the file maps it afresh
    instead of being served this map (:mod:`.held`).
    """

    __slots__ = ("lent",)
    lent: bool


def contiguous_bytes(array: Array) -> memoryview:
    """A flat byte view of ``array``'s data in C order (copies only if it is not C-contiguous)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return memoryview(flat.view(np.uint8).data)


NPY_MAGIC = b"\x93NUMPY"

#: one tensor of a read plan, as :func:`map_arrays` maps it: file name (under the
#: version's directory), dtype, shape, data offset, data bytes
MapSpec: TypeAlias = tuple[str, np.dtype[Any], tuple[int, ...], int, int]
#: the largest .npy header verify reads (numpy's own reader stops at 10,000 bytes unless told)
MAX_HEADER_BYTES = 16 << 20


class NpyHeader(NamedTuple):
    """What a stored file's .npy header says: numpy's descr, order and shape, and its length."""

    descr: Any
    fortran_order: bool
    shape: tuple[int, ...]
    length: int


def npy_header_length(prefix: bytes | memoryview | mmap.mmap) -> int:
    """The length of the .npy header that ``prefix`` (the file's first 12 bytes) begins.

    Raises IntegrityError when it is not a .npy file of format 1, 2 or 3.
    """
    if len(prefix) < 12 or bytes(prefix[:6]) != NPY_MAGIC or prefix[6] not in (1, 2, 3):
        raise IntegrityError("not a .npy file of format 1.0, 2.0 or 3.0")
    if prefix[6] == 1:
        return 10 + int(_U16.unpack_from(prefix, 8)[0])
    return 12 + int(_U32.unpack_from(prefix, 8)[0])


def parse_npy_header(header: bytes) -> NpyHeader:
    """Read a whole .npy header (``header``: exactly its bytes) without numpy's file reader.

    Raises IntegrityError saying what is wrong; never evaluates more than a literal.
    """
    length = npy_header_length(header[:12])
    if length != len(header):
        raise IntegrityError(f"the .npy header is {length} bytes, not {len(header)}")
    start = 10 if header[6] == 1 else 12
    try:
        text = header[start:].decode("utf-8" if header[6] == 3 else "latin-1")
        fields = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise IntegrityError("the .npy header is not a Python literal") from None
    if (
        not isinstance(fields, dict)
        or fields.keys() != {"descr", "fortran_order", "shape"}
        or not isinstance(fields["fortran_order"], bool)
        or not isinstance(fields["shape"], tuple)
        or not all(type(n) is int and n >= 0 for n in fields["shape"])
    ):
        raise IntegrityError("the .npy header is not a dict of descr, fortran_order and shape")
    return NpyHeader(fields["descr"], fields["fortran_order"], fields["shape"], length)


def check_npy_header(
    header: bytes, dtype: np.dtype[Any], shape: tuple[int, ...], offset: int
) -> None:
    """Raise IntegrityError unless ``header`` (a file's first ``offset`` bytes) is the .npy
    header of a C-ordered ``dtype`` array of ``shape`` whose data starts at ``offset``.

    Compared as numpy reads it, not byte for byte: a file written by another numpy
    version may space or pad the same header differently. An ml_dtypes ``dtype``'s
    file declares its :func:`~.dtypes.storage_dtype` (the same-width unsigned int).
    A header byte for byte as ctxstore writes it (:func:`npy_header`, cached) is
    accepted without parsing: that is one bytes comparison, not a literal_eval.
    """
    if header == npy_header(dtype, shape):
        return  # what this numpy writes for it; its length is offset (header is that long)
    parsed = parse_npy_header(header)
    if parsed.length != offset:
        raise IntegrityError(f"its data starts at byte {parsed.length}, the index says {offset}")
    if parsed.descr != np.lib.format.dtype_to_descr(storage_dtype(dtype)):
        raise IntegrityError(f"it holds {parsed.descr!r:.80}, the index says {dtype}")
    if parsed.shape != shape:
        raise IntegrityError(f"it has shape {list(parsed.shape)}, the index says {list(shape)}")
    if parsed.fortran_order:
        raise IntegrityError("it is in Fortran order; stored tensors are C-ordered")


_U16, _U32 = struct.Struct("<H"), struct.Struct("<I")
#: what map_arrays adds to its open flags: a FIFO must not block the open, a link is refused
_NO_WAIT_NO_LINK = os.O_NONBLOCK | os.O_NOFOLLOW


def map_array(
    path: str, dtype: np.dtype[Any], shape: tuple[int, ...], offset: int, nbytes: int
) -> Array:
    """Map a stored tensor (a read-only array over a :class:`PrivateMap`), checking its size.

    ``nbytes`` is the recorded data size (dtype.itemsize times the element
    count). Raises NotFoundError when the file is gone and IntegrityError when
    its size disagrees with the record: a wrong-sized array is never returned.
    """
    return map_arrays("", ((path, dtype, shape, offset, nbytes),))[0]


def _map_refused(fd: int, path: str, exc: OSError) -> PrivateMap:
    """What follows mmap's refusal ``exc`` of ``fd``: a read-only map when strict
    overcommit would not charge a writable private one (ENOMEM), IntegrityError for
    a file mmap cannot map (not a regular file), else ``exc`` itself."""
    if exc.errno == errno.ENOMEM:
        return PrivateMap(fd, 0, access=mmap.ACCESS_READ)
    if exc.errno in (errno.EINVAL, errno.ENODEV):
        raise IntegrityError(f"tensor file {path} is not a regular file") from None
    raise exc


def map_arrays(
    prefix: str,
    specs: Iterable[MapSpec],
    stats: list[os.stat_result] | None = None,
) -> list[Array]:
    """:func:`map_array` for each (file name, dtype, shape, offset, nbytes) under ``prefix``.

    One loop with everything it calls bound locally: a 300-tensor context is
    300 opens and maps, and a Python call per tensor would cost a tenth more.

    Each file is opened without following a symbolic link and without waiting (a
    FIFO planted in its place would block the open forever) and must be a regular
    file of the recorded size. Nothing here reads a page of it: the records were
    checked when the read plan was decoded, and the .npy header is compared with
    them where the file is read anyway (re-hashing, ``verify``). Each array is
    flagged read-only (a numpy write raises ValueError) over a copy-on-write map
    (see the module's docstring).

    ``stats``: append each mapped file's ``fstat`` (taken on the descriptor that
    is mapped) to this list, for the caller's identity check.
    """
    arrays: list[Array] = []
    append, open_, close, ndarray = arrays.append, os.open, os.close, np.ndarray
    new_map, flags, access = PrivateMap, os.O_RDONLY | os.O_CLOEXEC, mmap.ACCESS_COPY
    for file_name, dtype, shape, offset, nbytes in specs:
        path = prefix + file_name
        try:
            fd = open_(path, flags | _NO_WAIT_NO_LINK)
        except FileNotFoundError:
            raise NotFoundError(f"tensor file {path} does not exist") from None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise IntegrityError(
                f"tensor file {path} is a symbolic link; no stored file is"
            ) from None
        try:
            if stats is not None:
                stats.append(os.fstat(fd))
            mm = new_map(fd, 0, access=access)
        except ValueError:  # an empty file cannot be mapped
            raise IntegrityError(f"tensor file {path} is empty") from None
        except OSError as exc:
            mm = _map_refused(fd, path, exc)
        finally:
            close(fd)
        if len(mm) != offset + nbytes:
            size = len(mm)
            mm.close()
            raise IntegrityError(
                f"tensor file {path} has {size} bytes, its record says {offset + nbytes}"
            )
        try:
            array = ndarray(shape, dtype, mm, offset)
        except (TypeError, ValueError):  # the record's shape needs more bytes than it says
            mm.close()
            raise IntegrityError(
                f"tensor file {path}: record {dtype}{list(shape)} does not fit {nbytes} bytes"
            ) from None
        array.setflags(write=False)
        append(array)
    return arrays
