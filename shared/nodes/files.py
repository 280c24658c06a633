"""File importers: a context from a weights file that nobody vouches for.

Supported: ``.npy`` (one tensor, named by the file stem), ``.npz`` (one tensor
per ``.npy`` member) and ``.safetensors``. The files may come from anywhere, so
the readers here trust nothing in them:

- nothing is ever unpickled: object dtypes are refused from the header, before
  any data is read, and headers are parsed as literals / JSON, never executed;
- every size a header declares is checked against what the file really holds
  before memory is allocated for it: a truncated or padded file, a header that
  runs past the end, a zip member that claims more than deflate can produce, or
  members that overlap (zip bombs) are refused;
- safetensors headers must be exact: bounded length (100 MB, the format's own
  cap), known keys, offsets inside the file, contiguous, non-overlapping, and
  each span matching dtype x shape. The safetensors library writes the files
  the tests import and is the reference the tests compare against; the reader
  here parses the header itself so every refusal says precisely what was wrong,
  and reads each tensor once into immutable memory (no second copy);
- only regular files are opened (a FIFO or device would block or never end).

Every refusal is an InvalidInputError naming the file and the problem; a file
that does not exist is a NotFoundError.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import os
import stat
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import IO, Any, ClassVar, NamedTuple

import numpy as np

from ..context import Array, Context
from ..dtypes import SAFETENSORS_DTYPES, SAFETENSORS_PACKED, dtype_from_spec, dtype_problem
from ..errors import InvalidInputError, NotFoundError
from ..sources import Imported
from ..validation import MAX_TENSORS, check_label, check_shape, check_tensor_name
from ..versionfiles import MAX_FILE_BYTES, MAX_FILES
from .base import Node, Param, choice, integer

FORMATS = ("npy", "npz", "safetensors")
SUFFIXES = MappingProxyType({".npy": "npy", ".npz": "npz", ".safetensors": "safetensors"})


def machine_memory() -> int:
    """This machine's memory as this process may use it: physical RAM, or the cgroup's
    limit when that is lower (64 GiB when neither can be read)."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        memory = 64 * 2**30
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit.isdigit():
            memory = min(memory, int(limit))
    except OSError:
        pass
    return max(memory, 1)


DEFAULT_MAX_IMPORT_BYTES = machine_memory()
"""Default cap on the tensor bytes of one import: the machine's memory (:func:`machine_memory`).

Imports into the store stream to disk and need little memory, but every reader
maps the whole model, so a model larger than memory cannot be served from the
page cache; an in-memory load (:func:`load_weights_file`) needs it all at once.
"""
MAX_NPY_HEADER = 64 * 1024
MAX_SAFETENSORS_HEADER = 100_000_000
MAX_SOURCE_METADATA = 64 * 1024
MAX_PATH_BYTES = 4096
_MAX_NDIM = 64
_NPY_MAGIC = b"\x93NUMPY"
_NPY_VERSIONS = frozenset({(1, 0), (2, 0), (3, 0)})


@dataclass(frozen=True, slots=True)
class ImportLimits:
    """What one import may bring: tensor bytes in total, extra files and the size of each."""

    max_bytes: int = DEFAULT_MAX_IMPORT_BYTES
    max_files: int = MAX_FILES
    max_file_bytes: int = MAX_FILE_BYTES


class OpenedFile(NamedTuple):
    """A file an importer has opened, as a :data:`FileCheck` sees it before a byte is read."""

    fd: int
    #: the path as it was named (the file opened may no longer be there)
    path: str
    status: os.stat_result


#: called with the opened file and its description before a byte is read; raises a
#: CtxStoreError to refuse it (the daemon's checks that the requester owns it and that
#: it lies under the import roots)
FileCheck = Callable[[OpenedFile, str], None]
_DEFLATE_MAX_RATIO = 1100  # deflate cannot expand beyond ~1032:1; more is a lie or a bomb
_ZIP_LOCAL_HEADER = 30

_ST_KEYS = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True, slots=True)
class WeightsFile:
    """What an importer read: the tensors, in file order, and where they came from."""

    path: str
    format: str
    size: int
    weights: dict[str, Array]
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors __metadata__


def detect_format(path: str | os.PathLike[str]) -> str:
    """The import format named by the file's suffix, or InvalidInputError."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in SUFFIXES:
        raise InvalidInputError(
            f"weights file {os.fspath(path)!r}: unknown suffix {suffix!r}; "
            f"expected one of {', '.join(SUFFIXES)}"
        )
    return SUFFIXES[suffix]


def load_weights_file(
    path: str | os.PathLike[str],
    *,
    format: str = "auto",
    max_bytes: int = DEFAULT_MAX_IMPORT_BYTES,
) -> dict[str, Array]:
    """The named, read-only tensors of a .npy / .npz / .safetensors file."""
    return read_weights_file(path, format=format, max_bytes=max_bytes).weights


def read_weights_file(
    path: str | os.PathLike[str],
    *,
    format: str = "auto",
    max_bytes: int = DEFAULT_MAX_IMPORT_BYTES,
    check: FileCheck | None = None,
) -> WeightsFile:
    """Like :func:`load_weights_file`, also returning the format, size and file metadata.

    ``check`` sees the opened file's status first: what it vouches for is the
    file that is then read, even if the path is swapped meanwhile.
    """
    name = os.fspath(path)
    fmt = detect_format(name) if format == "auto" else choice(*FORMATS)("format", format)
    where = f"weights file {name!r}"
    with _open_regular(name, where) as f:
        status = os.fstat(f.fileno())
        if check is not None:
            check(OpenedFile(f.fileno(), name, status), where)
        size = status.st_size
        if fmt != "npz" and size > max_bytes:
            raise InvalidInputError(f"{where} is larger than the limit of {max_bytes} bytes")
        try:
            if fmt == "npy":
                stem = os.path.splitext(os.path.basename(name))[0]
                tensor = _name_or_refuse(stem or "0", where)
                return WeightsFile(name, fmt, size, {tensor: _read_npy(f, size, where)})
            if fmt == "npz":
                return WeightsFile(name, fmt, size, _read_npz(f, size, where, max_bytes))
            weights, metadata = _read_safetensors(f, size, where)
            return WeightsFile(name, fmt, size, weights, metadata)
        except OSError as exc:
            raise InvalidInputError(f"{where} cannot be read: {exc.strerror or exc}") from exc


def is_checkpoint_path(path: str, format: str) -> bool:
    """Whether ``path``, if it is a directory, is imported as a checkpoint directory: with
    format "checkpoint", or "auto" and no weights-file suffix (a directory "w.npy" is an error)."""
    suffix = os.path.splitext(path)[1].lower()
    return format == "checkpoint" or (format == "auto" and suffix not in SUFFIXES)


def _open_regular(path: str, where: str) -> IO[bytes]:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):  # (a path through a file)
        raise NotFoundError(f"{where} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{where} cannot be opened: {exc}") from None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    raise InvalidInputError(f"{where} is not a regular file")


def _read_exact(stream: IO[bytes], n: int, where: str, what: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise InvalidInputError(f"{where} ends early: it holds less than {what}")
    return data


def _name_or_refuse(name: str, where: str) -> str:
    try:
        return check_tensor_name(name)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{where}: {exc}") from None


# -- .npy ---------------------------------------------------------------------------------------


class NpyLayout(NamedTuple):
    """Where a checked .npy file's array lies: its dtype, shape, order and first data byte."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    fortran: bool
    start: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_npy(stream: IO[bytes], size: int, where: str) -> Array:
    """One array from a stream of exactly ``size`` bytes holding a .npy file."""
    dtype, shape, fortran, _ = npy_layout(stream, size, where)
    count = math.prod(shape)
    array = np.frombuffer(_read_exact(stream, count * dtype.itemsize, where, "array data"), dtype,
                          count)  # fmt: skip
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def npy_layout(stream: IO[bytes], size: int, where: str) -> NpyLayout:
    """Parse and check the header of a .npy stream of exactly ``size`` bytes, leaving the
    stream at the first data byte. Nothing of the file's bytes is echoed in an error
    until it is known to be a .npy file (the file may be a secret named by a symlink)."""
    prefix = _read_exact(stream, 8, where, "the .npy magic")
    version = (prefix[6], prefix[7])
    if prefix[:6] != _NPY_MAGIC:
        raise InvalidInputError(f"{where} is not a .npy file (bad magic)")
    if version not in _NPY_VERSIONS:
        raise InvalidInputError(f"{where}: unsupported .npy format version")
    length_size = 2 if version[0] == 1 else 4
    header_len = int.from_bytes(_read_exact(stream, length_size, where, "header length"), "little")
    start = 8 + length_size + header_len
    if header_len > MAX_NPY_HEADER:
        raise InvalidInputError(
            f"{where}: .npy header of {header_len} bytes exceeds the limit of {MAX_NPY_HEADER}"
        )
    if start > size:
        raise InvalidInputError(f"{where}: .npy header runs past the end of the data")
    raw = _read_exact(stream, header_len, where, "the .npy header")
    dtype, shape, fortran = _parse_npy_header(raw, "utf-8" if version[0] == 3 else "latin-1", where)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    available = size - start
    if nbytes > available:
        raise InvalidInputError(
            f"{where} is truncated: its header declares {nbytes} bytes of data "
            f"(dtype {dtype}, shape {shape}) but only {available} follow"
        )
    if nbytes < available:
        raise InvalidInputError(
            f"{where} has {available - nbytes} unexpected bytes after its array data"
        )
    check_shape(shape, dtype.itemsize, f"{where}: .npy")  # an empty array's can still be too big
    return NpyLayout(dtype, shape, fortran, start)


def _parse_npy_header(
    raw: bytes, encoding: str, where: str
) -> tuple[np.dtype[Any], tuple[int, ...], bool]:
    try:
        # a literal, never code; a hostile header can only fail to parse
        header = ast.literal_eval(raw.decode(encoding))
    except (UnicodeDecodeError, ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise InvalidInputError(f"{where}: .npy header is not a valid header literal") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise InvalidInputError(
            f"{where}: .npy header must be a dict with exactly the keys descr, fortran_order "
            f"and shape, got {header!r:.120}"
        )
    shape, fortran = header["shape"], header["fortran_order"]
    if not isinstance(fortran, bool):
        raise InvalidInputError(f"{where}: .npy fortran_order must be a bool, got {fortran!r:.40}")
    if not (
        isinstance(shape, tuple)
        and len(shape) <= _MAX_NDIM
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise InvalidInputError(
            f"{where}: .npy shape must be a tuple of at most {_MAX_NDIM} non-negative integers, "
            f"got {shape!r:.80}"
        )
    return _npy_dtype(header["descr"], where), shape, fortran


def _npy_dtype(descr: object, where: str) -> np.dtype[Any]:
    try:
        dtype = np.lib.format.descr_to_dtype(descr)  # type: ignore[arg-type]
    except Exception:  # numpy's descr parser may fail in many ways on hostile input
        why = _ML_DTYPES_NPY if isinstance(descr, str) and descr[-2:] in {"f1", "c4"} else ""
        raise InvalidInputError(
            f"{where}: .npy descr {descr!r:.80} is not a valid dtype{why}"
        ) from None
    if not isinstance(dtype, np.dtype):
        raise InvalidInputError(f"{where}: .npy descr {descr!r:.80} is not a valid dtype")
    if dtype.hasobject:
        raise InvalidInputError(
            f"{where}: dtype {dtype} holds Python objects (pickle); untrusted files are never "
            "unpickled, so object arrays are refused"
        )
    if dtype.subdtype is not None or dtype.itemsize == 0:
        raise InvalidInputError(f"{where}: dtype {dtype} cannot be the element type of an array")
    if dtype.kind == "V" and dtype.fields is None:
        raise InvalidInputError(f"{where}: dtype {dtype} is raw bytes (void){_ML_DTYPES_NPY}")
    problem = dtype_problem(dtype)
    if problem is not None:
        raise InvalidInputError(f"{where}: dtype {dtype}: {problem}")
    return dtype


_ML_DTYPES_NPY = (
    "; that is how np.save writes ml_dtypes arrays (bfloat16, float8...), and the file "
    "cannot say what they held: save them as .safetensors, or publish the arrays from Python"
)


# -- .npz ---------------------------------------------------------------------------------------


def _read_npz(f: IO[bytes], size: int, where: str, max_bytes: int) -> dict[str, Array]:
    try:
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, EOFError, ValueError, struct.error):
        raise InvalidInputError(f"{where} is not a valid .npz (zip) archive") from None
    with archive:
        infos = archive.infolist()
        names = _check_members(infos, size, where, max_bytes)
        weights: dict[str, Array] = {}
        for info, name in zip(infos, names, strict=True):
            member = f"{where} member {info.filename!r:.80}"
            try:
                weights[name] = _read_member(archive, info, member)
            except InvalidInputError:
                raise
            except (
                zipfile.BadZipFile,
                zlib.error,
                EOFError,
                NotImplementedError,
                RuntimeError,
                ValueError,
                struct.error,
            ) as exc:
                raise InvalidInputError(f"{member} cannot be read: {exc}") from None
        return weights


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, member: str) -> Array:
    with archive.open(info) as stream:
        array = _read_npy(stream, info.file_size, member)
        if stream.read(1):  # reading to the end also makes zipfile check the CRC
            raise InvalidInputError(f"{member} holds more bytes than it declares")
    return array


def _check_members(
    infos: list[zipfile.ZipInfo], size: int, where: str, max_bytes: int
) -> list[str]:
    """Tensor names of the members, after refusing anything but plain, honest .npy members."""
    if len(infos) > MAX_TENSORS:
        raise InvalidInputError(f"{where} has {len(infos)} members, more than {MAX_TENSORS}")
    names: list[str] = []
    seen: set[str] = set()
    total = 0
    for info in infos:
        member = f"{where} member {info.filename!r:.80}"
        if info.is_dir() or not info.filename.endswith(".npy"):
            raise InvalidInputError(f"{member} is not a .npy file; a .npz holds only .npy members")
        if info.flag_bits & 0x1:
            raise InvalidInputError(f"{member} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InvalidInputError(
                f"{member} uses compression method {info.compress_type}; "
                "only stored and deflated members (what numpy writes) are read"
            )
        _check_member_sizes(info, member, size)
        name = _name_or_refuse(info.filename[: -len(".npy")], member)
        if name in seen:
            raise InvalidInputError(f"{where} holds tensor {name!r} twice")
        seen.add(name)
        names.append(name)
        total += info.file_size
        if total > max_bytes:
            raise InvalidInputError(
                f"{where}: members declare more than the limit of {max_bytes} bytes"
            )
    _check_no_overlap(infos, where)
    return names


def _check_member_sizes(info: zipfile.ZipInfo, member: str, size: int) -> None:
    if info.header_offset + _ZIP_LOCAL_HEADER + info.compress_size > size:
        raise InvalidInputError(f"{member} runs past the end of the archive")
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise InvalidInputError(
            f"{member} is stored uncompressed but declares {info.file_size} bytes "
            f"and holds {info.compress_size}"
        )
    if info.file_size > info.compress_size * _DEFLATE_MAX_RATIO + 1024:
        raise InvalidInputError(
            f"{member} declares {info.file_size} bytes from {info.compress_size} compressed "
            "bytes, more than deflate can produce (a zip bomb?)"
        )


def _check_no_overlap(infos: list[zipfile.ZipInfo], where: str) -> None:
    """Members that share compressed bytes are how non-recursive zip bombs multiply."""
    ordered = sorted(infos, key=lambda i: i.header_offset)
    for prev, nxt in itertools.pairwise(ordered):
        if prev.header_offset + _ZIP_LOCAL_HEADER + prev.compress_size > nxt.header_offset:
            raise InvalidInputError(
                f"{where}: members {prev.filename!r:.80} and {nxt.filename!r:.80} overlap"
            )


# -- .safetensors -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Span:
    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsLayout(NamedTuple):
    """A checked safetensors file: its tensors in header order, metadata, data section start."""

    spans: list[_Span]
    metadata: dict[str, str]
    data_start: int


def _read_safetensors(
    f: IO[bytes], size: int, where: str
) -> tuple[dict[str, Array], dict[str, str]]:
    spans, metadata, data_start = safetensors_layout(f, size, where)
    arrays: dict[str, Array] = {}
    for span in sorted(spans, key=lambda s: (s.begin, s.end)):
        f.seek(data_start + span.begin)
        data = _read_exact(f, span.end - span.begin, where, f"tensor {span.name!r}")
        arrays[span.name] = np.frombuffer(data, span.dtype).reshape(span.shape)
    return {span.name: arrays[span.name] for span in spans}, metadata


def safetensors_layout(f: IO[bytes], size: int, where: str) -> SafetensorsLayout:
    """Parse and check a safetensors file's header (reading nothing else).

    Until the header parses as JSON nothing read from the file, nor its size,
    is echoed in an error: the file may be a secret the caller could not read.
    """
    if size < 8:
        raise InvalidInputError(f"{where} is too short to be a safetensors file")
    header_len = int.from_bytes(_read_exact(f, 8, where, "the header length"), "little")
    if header_len > MAX_SAFETENSORS_HEADER:
        raise InvalidInputError(
            f"{where} is not a safetensors file: its header length exceeds the format's "
            f"limit of {MAX_SAFETENSORS_HEADER} bytes"
        )
    if header_len > size - 8:
        raise InvalidInputError(
            f"{where} is not a safetensors file: its header length runs past the end of the file"
        )
    header = _parse_st_header(_read_exact(f, header_len, where, "the header"), where)
    metadata = _st_metadata(header.pop("__metadata__", None), where)
    data_len = size - 8 - header_len
    spans = [_st_span(name, spec, data_len, where) for name, spec in header.items()]
    _check_layout(spans, data_len, where)
    return SafetensorsLayout(spans, metadata, 8 + header_len)


def _parse_st_header(raw: bytes, where: str) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            raise InvalidInputError(f"{where}: safetensors header repeats a key")
        return out

    if not raw.startswith(b"{"):
        raise InvalidInputError(f"{where} is not a safetensors file: its header is not JSON")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except InvalidInputError:
        raise
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError too
        # (their messages quote the offending bytes)
        raise InvalidInputError(
            f"{where} is not a safetensors file: its header is not valid JSON"
        ) from None
    if not isinstance(header, dict):
        raise InvalidInputError(f"{where}: safetensors header is not a JSON object")
    return header


def _st_metadata(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidInputError(f"{where}: safetensors __metadata__ must map strings to strings")
    if len(json.dumps(value)) > MAX_SOURCE_METADATA:
        return {"__omitted__": f"metadata larger than {MAX_SOURCE_METADATA} bytes"}
    return value


def _st_span(name: str, spec: object, data_len: int, where: str) -> _Span:
    tensor = f"{where} tensor {name!r:.80}"
    _name_or_refuse(name, where)
    if not isinstance(spec, dict) or not spec.keys() >= _ST_KEYS:
        raise InvalidInputError(
            f"{tensor}: entry must have the keys dtype, shape and data_offsets, got {spec!r:.120}"
        )
    dtype = _st_dtype(spec["dtype"], tensor)
    shape, offsets = spec["shape"], spec["data_offsets"]
    if not (
        isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(_is_count(n) for n in shape)
    ):
        raise InvalidInputError(
            f"{tensor}: shape must be a list of non-negative ints, got {shape!r:.80}"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
        raise InvalidInputError(
            f"{tensor}: data_offsets must be [begin, end] non-negative ints, got {offsets!r:.80}"
        )
    begin, end = offsets
    if begin > end:
        raise InvalidInputError(f"{tensor}: data_offsets [{begin}, {end}] end before they begin")
    if end > data_len:
        raise InvalidInputError(
            f"{tensor}: data_offsets [{begin}, {end}] run past the end of the file "
            f"(the data section has {data_len} bytes)"
        )
    need = math.prod(shape) * dtype.itemsize
    if end - begin != need:
        raise InvalidInputError(
            f"{tensor}: data_offsets span {end - begin} bytes but dtype {spec['dtype']} "
            f"and shape {shape} need {need}"
        )
    check_shape(tuple(shape), dtype.itemsize, tensor)  # an empty tensor's can still be too big
    return _Span(name, dtype, tuple(shape), begin, end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _st_dtype(value: object, tensor: str) -> np.dtype[Any]:
    """The dtype of a safetensors dtype code: numpy's, or ml_dtypes' for BF16 and F8_*."""
    if isinstance(value, str) and value in SAFETENSORS_DTYPES:
        try:
            return dtype_from_spec(SAFETENSORS_DTYPES[value])
        except (ImportError, LookupError) as exc:
            raise InvalidInputError(f"{tensor}: dtype {value} needs ml_dtypes: {exc}") from None
    why = (
        "a packed sub-byte type; ctxstore stores one element per byte (ml_dtypes' layout) "
        "and would not keep the file's, so convert it to F8_E4M3, BF16 or wider"
        if value in SAFETENSORS_PACKED
        else f"supported: {', '.join(SAFETENSORS_DTYPES)}"
    )
    raise InvalidInputError(f"{tensor}: dtype {value!r:.40} is not supported ({why})")


def _check_layout(spans: list[_Span], data_len: int, where: str) -> None:
    """Tensors must tile the data section exactly: contiguous, no overlap, no gap, no tail."""
    covered = 0
    previous = None
    for span in sorted(spans, key=lambda s: (s.begin, s.end)):
        if span.begin < covered:
            raise InvalidInputError(
                f"{where}: tensors {previous!r:.80} and {span.name!r:.80} overlap "
                f"(bytes {span.begin} to {covered})"
            )
        if span.begin > covered:
            raise InvalidInputError(
                f"{where}: bytes {covered} to {span.begin} of the data section belong to no tensor"
            )
        covered, previous = span.end, span.name
    if covered != data_len:
        raise InvalidInputError(
            f"{where}: tensors cover {covered} bytes of a {data_len}-byte data section"
        )


# -- the node -----------------------------------------------------------------------------------


def _path(what: str, value: object) -> str:
    if value is None:
        raise InvalidInputError(f"{what} is required: the weights file to import")
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{what} must be a non-empty string, got {value!r:.80}")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise InvalidInputError(f"{what} is longer than {MAX_PATH_BYTES} bytes")
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise InvalidInputError(f"{what} {value!r:.80} contains a control character")
    return value


def _model_type(what: str, value: object) -> str:
    return check_label(value, what)


class FileNode(Node):
    """A context imported from a .npy, .npz or .safetensors file or a Hugging Face
    checkpoint directory (config ``path``)."""

    node_type: ClassVar[str] = "file"
    model_type = "file"
    params: ClassVar[Mapping[str, Param]] = MappingProxyType(
        {
            "path": Param(None, _path, "the weights file or checkpoint directory to import"),
            "format": Param(
                "auto",
                choice("auto", *FORMATS, "checkpoint"),
                "auto: a directory is a checkpoint, a file goes by its suffix",
            ),
            "max_bytes": Param(DEFAULT_MAX_IMPORT_BYTES, integer(0, 2**62), "tensor bytes cap"),
            "max_files": Param(
                MAX_FILES,
                integer(0, 100_000),
                "cap on a checkpoint's extra files (config, tokenizer ...)",
            ),
            "max_file_bytes": Param(
                MAX_FILE_BYTES, integer(0, 2**40), "cap on the bytes of each extra file"
            ),
            "model_type": Param("file", _model_type, "label stored with the slot"),
        }
    )

    def __init__(self, slot: int, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(slot, config)
        self.model_type = self.config["model_type"]
        #: set by the daemon: the peer must own the file, and it must lie under the roots
        self.file_check: FileCheck | None = None
        #: set by the daemon: its own import limits, which the config can only lower
        self.limits_cap: ImportLimits | None = None

    @classmethod
    def check_config(cls, config: dict[str, Any]) -> None:
        if config["format"] == "auto" and os.path.splitext(config["path"])[1]:
            detect_format(config["path"])  # a path without a suffix may be a directory

    @classmethod
    def check_inputs(cls, config: Mapping[str, Any]) -> None:
        """The file must exist and be a regular file (or a checkpoint directory), as the
        build will open it."""
        path = config["path"]
        if is_checkpoint_path(path, config["format"]) and os.path.isdir(path):
            return
        _open_regular(path, f"weights file {path!r}").close()

    def limits(self) -> ImportLimits:
        c, cap = self.config, self.limits_cap or ImportLimits()
        return ImportLimits(min(c["max_bytes"], cap.max_bytes), min(c["max_files"], cap.max_files),
                            min(c["max_file_bytes"], cap.max_file_bytes))  # fmt: skip

    def build_import(self) -> Imported:
        """What the store commits (``PersistentStore.save_import``), streamed from the files.

        A checkpoint directory's config is its ``config.json``; a single file's is
        this node's config. Close the result when done.
        """
        from .imports import open_import

        c = self.config
        imported = open_import(c["path"], format=c["format"], limits=self.limits(),
                               check=self.file_check)  # fmt: skip
        source = dict(imported.metadata.get("source", {}))
        checkpoint = source.get("format") == "checkpoint"
        imported.metadata = {
            **imported.metadata,
            "node_type": self.node_type,
            "model_type": self.model_type,
            "build": {"tensors": len(imported.tensors), "nbytes": imported.nbytes},
        }
        if not checkpoint:
            imported.config = self.get_config()
        return imported

    def read(self) -> WeightsFile:
        c = self.config
        if is_checkpoint_path(c["path"], c["format"]) and os.path.isdir(c["path"]):
            raise InvalidInputError(
                f"{c['path']!r} is a checkpoint directory: its files do not fit a Context; "
                "import it with build_import() and PersistentStore.save_import (the daemon "
                "does), or ctxstore publish"
            )
        return read_weights_file(
            c["path"], format=c["format"], max_bytes=c["max_bytes"], check=self.file_check
        )

    def build_weights(self) -> dict[str, Array]:
        return self.read().weights

    def build_context(self) -> Context:
        loaded = self.read()
        source: dict[str, Any] = {
            "path": os.path.abspath(loaded.path),
            "format": loaded.format,
            "size": loaded.size,
        }
        if loaded.metadata:
            source["metadata"] = loaded.metadata
        return self.make_context(loaded.weights, source=source)
