"""Imports that stream: tensors read from their file at commit time, in bounded chunks.

A checkpoint can be larger than the memory of the process that imports it. An
importer therefore parses and checks every header first (nothing is committed
if any of them is wrong) and hands the store an :class:`Imported`: per tensor a
:class:`TensorSource` that yields its bytes from the opened file, at most
:data:`CHUNK` at a time. The store copies each chunk into the tensor's staging
file and hashes it as it is written (:func:`write_streamed`), so the importing
process holds one chunk, never a tensor or a shard. Sources read with
``pread`` on a descriptor the importer opened (and checked): nothing of the
caller's file is mapped, so a file truncated during the import is an error
("ended early"), never a SIGBUS.

A tensor that lies in its file as it is stored (a safetensors span, a C-order
``.npy``'s data: :func:`span_source`) is read into one buffer the store reuses
for the whole commit (:meth:`TensorSource.chunks` with ``buffer``): each byte
is read once, hashed while it is still in the CPU's cache, and written once,
with no allocation per chunk (a fresh multi-MiB ``bytes`` per read costs page
faults and zeroing on every chunk).

A tensor whose whole file is already what the store would write (ctxstore's
``.npy`` header, then the data) and whose bytes its caller hashed can carry that
file and checksum (:class:`VerifiedFile`, :func:`verified_source`): the store
then moves the file into the version instead of copying and hashing it again
(a follower's download, ``ctxstore.origin.follower``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import xxhash

from .context import Array
from .errors import CtxStoreError, InvalidInputError, StorageError
from .store.durable import FILE_MODE, write_all

#: the most bytes of a tensor an import holds in memory at once
CHUNK = 4 << 20

Chunks = Callable[[], Iterator[bytes]]


class VerifiedFile(NamedTuple):
    """A file holding a tensor exactly as the store writes it, and the xxh3-128 of its
    whole content as its owner verified it. The store moves such a file into a version
    and records ``checksum`` without reading it (it checks only the size and header):
    the owner guarantees the file is not written again and has no other name.

    With ``identity`` (size, mtime, inode, device) it is a stored version's file
    instead, whose checksum its reuser knows (the index vouches for that identity
    during this boot, or the reuser hashed the file): the store links it, never
    moves it, and only when the link is that very file unchanged. Copied instead
    (the link failed), its bytes must hash to ``checksum``.
    """

    path: str
    checksum: str
    identity: tuple[int, int, int, int] | None = None


class TensorSource:
    """One tensor of an import: its dtype and shape, and its data read on demand.

    ``read`` yields the data in chunks; a tensor whose bytes lie as stored at
    ``span`` (a descriptor and an offset) of an opened file can also be read
    straight into the caller's buffer (:func:`span_source`).
    """

    __slots__ = ("_read", "dtype", "nbytes", "observe", "shape", "span", "verified", "where")

    def __init__(
        self,
        dtype: np.dtype[Any],
        shape: tuple[int, ...],
        read: Chunks,
        where: str,
        *,
        span: tuple[int, int] | None = None,
    ) -> None:
        self.dtype = dtype
        self.shape = shape
        self.nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        self._read = read
        #: (descriptor, offset) of the data in a file where it lies as stored
        self.span = span
        #: names the tensor and its file in errors
        self.where = where
        #: called with each chunk's length as it is read (the daemon's Progress frames)
        self.observe: Callable[[int], None] | None = None
        #: the file the store may move into the version instead of a copy, if any
        self.verified: VerifiedFile | None = None

    def chunks(self, buffer: memoryview | None = None) -> Iterator[memoryview | bytes]:
        """The data, exactly ``nbytes`` of it, at most :data:`CHUNK` bytes a piece.

        With ``buffer`` (a writable byte view), a span source reads into it and
        yields views of it, each valid until the next chunk is asked for.
        InvalidInputError when the file gives fewer or more bytes than its header
        declared (it changed since it was checked, or a zip member lied).
        """
        done = 0
        observe = self.observe
        read = self._read if buffer is None or self.span is None else self._into(buffer)
        try:
            for chunk in read():
                done += len(chunk)
                if done > self.nbytes:
                    break
                if observe is not None:
                    observe(len(chunk))
                yield chunk
        except CtxStoreError:
            raise
        except (OSError, EOFError, ValueError) as exc:  # zlib and zipfile errors are these too
            raise InvalidInputError(f"{self.where} cannot be read: {type(exc).__name__}") from None
        if done != self.nbytes:
            raise InvalidInputError(
                f"{self.where} does not hold the bytes its header declares "
                "(the file changed while it was imported, or it lies)"
            )

    def _into(self, buffer: memoryview) -> Callable[[], Iterator[memoryview]]:
        """The span's data read into ``buffer``, a view of it per chunk."""
        fd, offset = self.span or (-1, 0)
        nbytes, size = self.nbytes, min(len(buffer), CHUNK)

        def read() -> Iterator[memoryview]:
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [buffer[: min(size, nbytes - done)]], offset + done)
                if not got:
                    return  # ended early: chunks() says so
                done += got
                yield buffer[:got]

        return read


def span_source(
    dtype: np.dtype[Any], shape: tuple[int, ...], fd: int, offset: int, where: str
) -> TensorSource:
    """A tensor whose data lies as stored at ``offset`` of the open file ``fd``."""
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    return TensorSource(dtype, shape, file_span(fd, offset, nbytes), where, span=(fd, offset))


def verified_source(
    dtype: np.dtype[Any], shape: tuple[int, ...], fd: int, offset: int, verified: VerifiedFile
) -> TensorSource:
    """A tensor whose file ``verified`` the store may adopt; ``fd`` (that file, open, data
    at ``offset``) is read only if it cannot be (another file system, another header)."""
    source = span_source(dtype, shape, fd, offset, verified.path)
    source.verified = verified
    return source


def copy_buffer() -> memoryview:
    """The buffer one commit reads every span source through (:data:`CHUNK` bytes)."""
    return memoryview(bytearray(CHUNK))


def file_span(fd: int, offset: int, nbytes: int) -> Chunks:
    """Chunks of ``nbytes`` at ``offset`` of the open file ``fd``, read with ``pread``."""

    def read() -> Iterator[bytes]:
        done = 0
        while done < nbytes:
            chunk = os.pread(fd, min(CHUNK, nbytes - done), offset + done)
            if not chunk:
                return  # ended early: TensorSource.chunks says so
            done += len(chunk)
            yield chunk

    return read


@dataclass(slots=True)
class Imported:
    """What an importer hands the store: tensors (arrays or sources), config, metadata, files.

    Holds the importer's open files until :meth:`close` (a context manager).
    """

    tensors: dict[str, Array | TensorSource]
    config: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    #: extra files that travel with the version byte-exact, by name
    files: dict[str, bytes] = field(default_factory=dict)
    closers: list[Callable[[], object]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(int(t.nbytes) for t in self.tensors.values())

    def close(self) -> None:
        closers, self.closers = self.closers, []
        for close in reversed(closers):
            with contextlib.suppress(OSError):
                close()

    def __enter__(self) -> Imported:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def follow_progress(imported: Imported, advance: Callable[[int], None]) -> None:
    """Make ``advance(bytes copied so far)`` follow the reads of ``imported``'s sources
    (the daemon's Progress frames for a long import)."""
    done = 0

    def counted(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        advance(done)

    for tensor in imported.tensors.values():
        if isinstance(tensor, TensorSource):
            tensor.observe = counted


def write_streamed(path: str, header: bytes, chunks: Iterator[memoryview | bytes]) -> str:
    """Create ``path`` (it must not exist) from ``header`` and ``chunks``; its xxh3-128.

    The file is hashed as it is written and left read-only; the caller owes it
    an fsync. On any failure the partial file is removed.
    """
    hasher = xxhash.xxh3_128()
    hasher.update(header)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise StorageError(exc.errno, f"cannot create {path}: {exc.strerror}") from exc
    try:
        write_all(fd, header)
        for chunk in chunks:
            hasher.update(chunk)
            write_all(fd, chunk)
    except BaseException as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        if isinstance(exc, OSError):
            raise StorageError(exc.errno, f"cannot write {path}: {exc.strerror}") from exc
        raise
    os.close(fd)
    return str(hasher.hexdigest())


def same_file_bytes(a: str, b: str) -> bool:
    """True when the files at ``a`` and ``b`` hold the same bytes (compared a chunk at a time)."""
    try:
        fa = os.open(a, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fb = os.open(b, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        os.close(fa)
        return False
    try:
        size = os.fstat(fa).st_size
        if os.fstat(fb).st_size != size:
            return False
        return all(
            os.pread(fa, CHUNK, offset) == os.pread(fb, CHUNK, offset)
            for offset in range(0, size, CHUNK)
        )
    except OSError:
        return False
    finally:
        os.close(fa)
        os.close(fb)
