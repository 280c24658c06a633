"""Streaming imports: a weights file or a checkpoint directory, read into the store a chunk
at a time.

:func:`open_import` checks every header first (a bad file commits nothing) and
returns an :class:`~ctxstore.sources.Imported` whose tensors are sources over
the opened files (:mod:`ctxstore.sources`): the store copies them into its
staging directory without ever holding a tensor in memory. ``.npz`` members are
decompressed in chunks with a running count: a member yields at most the bytes
its header declares, and those are bounded by ``max_bytes`` before anything is
read. A Fortran-ordered ``.npy`` (rare: numpy writes C order unless asked) is
the one case read into memory, within ``max_bytes``, to be transposed.

Files are opened once, checked on the descriptor (``check``: the daemon's
ownership and import-roots rule) and read from that descriptor only.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator
from typing import IO, Any

from ..context import Array
from ..errors import InvalidInputError, NotFoundError
from ..sources import CHUNK, Imported, TensorSource, span_source
from .base import choice
from .files import (
    FORMATS,
    FileCheck,
    ImportLimits,
    OpenedFile,
    _check_members,
    _name_or_refuse,
    _read_member,
    _read_npy,
    detect_format,
    is_checkpoint_path,
    npy_layout,
    safetensors_layout,
)


def open_import(
    path: str | os.PathLike[str],
    *,
    format: str = "auto",
    limits: ImportLimits | None = None,
    check: FileCheck | None = None,
) -> Imported:
    """Check a .npy / .npz / .safetensors file or a checkpoint directory and return what the
    store commits from it (close it, or use it as a context manager, when done).

    A directory is read as ``save_pretrained`` writes it (:mod:`.checkpoint`).
    """
    name = os.fspath(path)
    limits = limits or ImportLimits()
    if format != "auto":
        choice(*FORMATS, "checkpoint")("format", format)
    fd = open_checked(name, None, f"weights file {name!r}", check, allow_dir=True)
    imported = Imported({})
    imported.closers.append(lambda: os.close(fd))
    try:
        _read_into(fd, name, format, imported, limits, check=check)
    except BaseException:
        imported.close()
        raise
    return imported


def _read_into(
    fd: int, name: str, format: str, imported: Imported, limits: ImportLimits,
    *, check: FileCheck | None,
) -> None:  # fmt: skip
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        if not is_checkpoint_path(name, format):
            raise InvalidInputError(f"weights file {name!r} is not a regular file")
        from .checkpoint import read_checkpoint

        read_checkpoint(fd, name, imported, limits, check)
    else:
        fmt = detect_format(name) if format in ("auto", "checkpoint") else format
        imported.metadata = {"source": read_file_into(fd, name, fmt, imported, limits)}


def open_checked(
    name: str, dir_fd: int | None, where: str, check: FileCheck | None, *, allow_dir: bool = False
) -> int:
    """Open ``name`` (relative to ``dir_fd`` without following a symlink, when given) as a
    regular file (or a directory), run ``check`` on the descriptor, return it."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
    if dir_fd is not None:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFoundError(f"{where} does not exist") from None
    except OSError as exc:
        if dir_fd is not None and exc.errno == errno.ELOOP:  # a symlink, not followed
            raise InvalidInputError(
                f"{where} is a symbolic link; a checkpoint directory is imported only from "
                "regular files inside it (copy the files in, e.g. a hub download with local_dir)"
            ) from None
        raise InvalidInputError(f"{where} cannot be opened: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InvalidInputError(f"{where} cannot be opened: {exc}") from None
    try:
        _check_opened(fd, name, where, check, allow_dir=allow_dir)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_opened(
    fd: int, name: str, where: str, check: FileCheck | None, *, allow_dir: bool
) -> None:
    status = os.fstat(fd)
    if not (stat.S_ISREG(status.st_mode) or (allow_dir and stat.S_ISDIR(status.st_mode))):
        raise InvalidInputError(f"{where} is not a regular file")
    if check is not None:
        check(OpenedFile(fd, name, status), where)


def read_file_into(
    fd: int, name: str, fmt: str, imported: Imported, limits: ImportLimits
) -> dict[str, Any]:
    """Add the tensors of one weights file open on ``fd`` to ``imported``; returns its
    description (``source`` metadata). The file's size is never echoed: the caller may
    not be able to read it."""
    where = f"weights file {name!r}"
    size = os.fstat(fd).st_size
    if fmt != "npz" and size > limits.max_bytes:
        raise InvalidInputError(f"{where} is larger than the limit of {limits.max_bytes} bytes")
    stream = os.fdopen(os.dup(fd), "rb")
    imported.closers.append(stream.close)
    try:
        if fmt == "npy":
            stem = os.path.splitext(os.path.basename(name))[0]
            tensor = _name_or_refuse(stem or "0", where)
            imported.tensors[tensor] = _npy_source(stream, fd, size, where)
        elif fmt == "npz":
            _add_npz(stream, size, where, limits.max_bytes, imported)
        else:
            spans, metadata, start = safetensors_layout(stream, size, where)
            _add_spans(imported, fd, spans, start, where)
            if metadata:
                imported.metadata = {"file_metadata": metadata}
    except OSError as exc:
        raise InvalidInputError(f"{where} cannot be read: {exc.strerror or exc}") from None
    return {"path": os.path.abspath(name), "format": fmt, "bytes": size}


def _add_spans(imported: Imported, fd: int, spans: Any, start: int, where: str) -> None:
    for span in spans:
        if span.name in imported.tensors:
            raise InvalidInputError(f"{where}: tensor {span.name!r} is already in another file")
        imported.tensors[span.name] = span_source(
            span.dtype, span.shape, fd, start + span.begin, f"{where} tensor {span.name!r:.80}"
        )


def _npy_source(stream: IO[bytes], fd: int, size: int, where: str) -> Array | TensorSource:
    layout = npy_layout(stream, size, where)
    if layout.fortran:  # the store writes C order: transpose in memory (within max_bytes)
        stream.seek(0)
        return _read_npy(stream, size, where)
    return span_source(layout.dtype, layout.shape, fd, layout.start, where)


def _add_npz(stream: IO[bytes], size: int, where: str, max_bytes: int, imported: Imported) -> None:
    try:
        archive = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, EOFError, ValueError, struct.error):
        raise InvalidInputError(f"{where} is not a valid .npz (zip) archive") from None
    imported.closers.append(archive.close)
    infos = archive.infolist()
    # declared sizes against max_bytes, member names, ratios, overlaps: before any inflating
    names = _check_members(infos, size, where, max_bytes)
    for info, name in zip(infos, names, strict=True):
        member = f"{where} member {info.filename!r:.80}"
        try:
            with archive.open(info) as member_stream:
                layout = npy_layout(member_stream, info.file_size, member)
            if layout.fortran:
                imported.tensors[name] = _read_member(archive, info, member)
                continue
        except InvalidInputError:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
                ValueError, struct.error) as exc:  # fmt: skip
            raise InvalidInputError(f"{member} cannot be read: {type(exc).__name__}") from None
        read = _member_chunks(archive, info, layout.start, layout.nbytes, member)
        imported.tensors[name] = TensorSource(layout.dtype, layout.shape, read, member)


def _member_chunks(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, start: int, nbytes: int, member: str
) -> Any:
    """A member's array data, inflated a chunk at a time and never more than ``nbytes``;
    reading on to the member's end makes zipfile check its CRC."""

    def read() -> Iterator[bytes]:
        try:
            yield from inflate()
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
                ValueError, struct.error) as exc:  # fmt: skip
            raise InvalidInputError(f"{member} cannot be read: {type(exc).__name__}") from None

    def inflate() -> Iterator[bytes]:
        with archive.open(info) as stream:
            skip = start
            while skip:
                got = len(stream.read(min(skip, CHUNK)))
                if not got:
                    return
                skip -= got
            done = 0
            while done < nbytes:
                chunk = stream.read(min(CHUNK, nbytes - done))
                if not chunk:
                    return
                done += len(chunk)
                yield chunk
            if stream.read(1):
                raise InvalidInputError(f"{member} holds more bytes than it declares")

    return read
