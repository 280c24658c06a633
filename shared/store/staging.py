"""Step 2 of the commit protocol: each tensor and extra file written into the staging
directory (``wal/<txid>/``), or hard-linked to an identical stored file, or (a
:class:`~ctxstore.sources.VerifiedFile`, a follower's download) moved in as it is.

Nothing here is durable or visible: the caller (``commit.py``) fsyncs, renames the
directory into place and commits the rows.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from ..checksum import checksum_parts
from ..context import Array, Context
from ..errors import (
    IntegrityError,
    StorageError,
)
from ..faults import crash_point
from ..integrity import identity_of
from ..sources import (
    TensorSource,
    VerifiedFile,
    copy_buffer,
    same_file_bytes,
    write_streamed,
)
from . import layout
from .durable import (
    FILE_MODE,
    SyncQueue,
    hard_link,
    make_dir,
    write_new_file,
)
from .npyfile import (
    contiguous_bytes,
    dtype_from_text,
    dtype_to_text,
    map_array,
    npy_header,
    shape_from_text,
    shape_to_text,
)
from .repair import StoreRepair

TensorRow = tuple[int, str, str, str, int, int, str]


class NewVersion(NamedTuple):
    """What one save_context call commits, once its version number is known."""

    slot: int
    version: int
    context: Context
    model_type: str | None
    aliases: tuple[str, ...]
    pin: bool
    publish_key: str | None = None
    #: extra files, by validated name
    files: Mapping[str, bytes] = MappingProxyType({})
    #: tensors streamed from an import's files (``context`` then holds none); the
    #: pre-commit hooks see them mapped from the staging directory
    sources: Mapping[str, Array | TensorSource] | None = None


class StoreStaging(StoreRepair):
    """Staging a version's files, deduplicated against what the store holds."""

    def _stage(
        self, staging: str, new: NewVersion, early: SyncQueue
    ) -> tuple[list[TensorRow], list[str], list[int]]:
        """Write (or link) every tensor into ``staging``: the rows, the files still to
        sync, and the positions hard-linked to a stored file. A streamed tensor's file
        goes to ``early`` instead, its fsync started as soon as it is written."""
        rows: list[TensorRow] = []
        written: list[str] = []
        linked: list[int] = []
        staged: dict[str, str] = {}
        tensors = new.context.weights if new.sources is None else new.sources
        buffer = copy_buffer() if new.sources is not None else None
        for position, (name, array) in enumerate(tensors.items()):
            if isinstance(array, TensorSource):
                assert buffer is not None
                rows.append(self._stage_source(staging, position, name, array, buffer,
                                               staged=staged, early=early,
                                               linked=linked))  # fmt: skip
                crash_point("staging")
                continue
            header = npy_header(array.dtype, array.shape)
            data = contiguous_bytes(array)
            checksum = checksum_parts((header, data))
            path = f"{staging}/{layout.tensor_file_name(position)}"
            source = staged.get(checksum) or self._stored_duplicate(checksum, header, data)
            if source is None or not hard_link(source, path):
                write_new_file(path, (header, data), sync=False)
                written.append(path)
            elif checksum not in staged:  # linked to a stored file, not to one staged here
                linked.append(position)
            staged.setdefault(checksum, path)
            rows.append(
                (
                    position,
                    name,
                    dtype_to_text(array.dtype),
                    shape_to_text(array.shape),
                    len(header),
                    data.nbytes,
                    checksum,
                )
            )
            crash_point("staging")
        return rows, written, linked

    def _stage_source(
        self,
        staging: str,
        position: int,
        name: str,
        source: TensorSource,
        buffer: memoryview,
        *,
        staged: dict[str, str],
        early: SyncQueue,
        linked: list[int],
    ) -> TensorRow:
        """Copy a streamed tensor into ``staging``, hashing it as it is written; then,
        when an identical file is staged or stored already, link that one instead
        (the copy was needed to know the checksum without holding the tensor). A source
        with a verified file is moved in instead, with the checksum its owner verified."""
        header = npy_header(source.dtype, source.shape)
        path = f"{staging}/{layout.tensor_file_name(position)}"
        adopted = source.verified
        if adopted is not None and self._adopt(adopted, header, source, path, staged):
            if adopted.checksum not in staged:
                if adopted.identity is None:
                    early.start(path)
                else:  # a stored file, durable already
                    linked.append(position)
            staged.setdefault(adopted.checksum, path)
            return (position, name, dtype_to_text(source.dtype), shape_to_text(source.shape),
                    len(header), source.nbytes, adopted.checksum)  # fmt: skip
        checksum = write_streamed(path, header, source.chunks(buffer))
        if adopted is not None and adopted.identity is not None and checksum != adopted.checksum:
            raise IntegrityError(
                f"{source.where} changed while it was reused: its bytes hash to {checksum}, "
                f"not {adopted.checksum}"
            )
        duplicate = staged.get(checksum)
        if duplicate is None or not same_file_bytes(duplicate, path):
            duplicate = self._stored_duplicate_file(checksum, path)
        if duplicate is not None and replace_with_link(duplicate, path):
            if checksum not in staged:
                linked.append(position)
        else:
            early.start(path)
        staged.setdefault(checksum, path)
        dtype = dtype_to_text(source.dtype)
        return (position, name, dtype, shape_to_text(source.shape), len(header),
                source.nbytes, checksum)  # fmt: skip

    def _adopt(
        self,
        verified: VerifiedFile,
        header: bytes,
        source: TensorSource,
        path: str,
        staged: dict[str, str],
    ) -> bool:
        """Stage a verified file as ``path`` without copying it: a link to the file staged
        already with the same checksum, else the file itself, moved. False, nothing staged,
        when it is not the store's file for ``header`` and the source's data (the caller
        then copies it) or cannot be moved here (another file system)."""
        duplicate = staged.get(verified.checksum)
        size = len(header) + source.nbytes
        if duplicate is not None:
            done = hard_link(duplicate, path)
        elif verified.identity is not None:
            done = link_verified(verified.path, path, header, size, verified.identity)
        else:
            done = move_verified(verified.path, path, header, size)
        if done and source.observe is not None:
            source.observe(source.nbytes)
        return done

    def _stored_duplicate_file(self, checksum: str, path: str) -> str | None:
        """A stored tensor file with the same bytes as the staged file at ``path``."""
        candidates = self._writer_conn().execute(
            "SELECT slot, version, position FROM tensors WHERE checksum = ? LIMIT 4", (checksum,)
        )
        for slot, version, position in candidates:
            stored = layout.tensor_path_str(self._root_str, slot, version, position)
            if same_file_bytes(stored, path):
                return stored
        return None

    def _stage_files(self, staging: str, files: Mapping[str, bytes]) -> list[str]:
        """Write (or link an identical stored one) each extra file into ``staging/files``;
        returns the paths written, which still need their fsync."""
        if not files:
            return []
        make_dir(f"{staging}/{layout.FILES_DIR}", durable=False)
        written: list[str] = []
        for name, data in files.items():
            path = f"{staging}/{layout.FILES_DIR}/{name}"
            checksum = checksum_parts((data,))
            source = self._stored_duplicate_extra(checksum, data)
            if source is None or not hard_link(source, path):
                write_new_file(path, (data,), sync=False)
                written.append(path)
        return written

    def _stored_duplicate_extra(self, checksum: str, data: bytes) -> str | None:
        rows = self._writer_conn().execute(
            "SELECT slot, version, name FROM version_files WHERE checksum = ? LIMIT 4",
            (checksum,),
        )
        for slot, version, name in rows:
            path = layout.version_file_str(self._root_str, slot, version, name)
            try:
                with open(path, "rb") as f:
                    if f.read(len(data) + 1) == data:
                        return path
            except OSError:
                continue
        return None

    def _run_hooks_on_staged(self, staging: str, new: NewVersion, rows: list[TensorRow]) -> None:
        """The pre-commit hooks, for an import: they see the staged files, mapped."""
        weights = {
            name: map_array(f"{staging}/{layout.tensor_file_name(position)}",
                            dtype_from_text(dtype), shape_from_text(shape), offset, nbytes)
            for position, name, dtype, shape, offset, nbytes, _ in rows
        }  # fmt: skip
        context = Context._trusted(MappingProxyType(weights), new.context.config,
                                   new.context.metadata)  # fmt: skip
        for hook in self.pre_commit_hooks:
            hook(new.slot, context)

    def _stored_duplicate(self, checksum: str, header: bytes, data: memoryview) -> str | None:
        """A stored file with exactly these bytes, found by checksum and confirmed byte for byte."""
        candidates = self._writer_conn().execute(
            "SELECT slot, version, position FROM tensors WHERE checksum = ? LIMIT 4", (checksum,)
        )
        for slot, version, position in candidates:
            if not type(slot) is type(version) is type(position) is int:
                continue  # a tampered row names no file to link (verify reports it)
            path = layout.tensor_path_str(self._root_str, slot, version, position)
            if same_bytes(path, header, data):
                return path
        return None


#: bytes compared at a time: a chunk and its match stay in the CPU's cache
COMPARE_CHUNK = 1 << 20


def move_verified(source: str, path: str, header: bytes, size: int) -> bool:
    """Rename ``source`` to ``path`` (a staging file) and leave it read-only, if what lands
    there is a regular file of ``size`` bytes starting with ``header``, with no other name.
    False when it is not (it is then removed from ``path``) or cannot be renamed
    (gone, another file system): the caller copies the tensor instead. Checked after the
    rename, on the file that was moved, so nothing can swap it in between."""
    try:
        os.rename(source, path)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.ENOENT, errno.EPERM, errno.EACCES):
            return False
        raise StorageError(exc.errno, f"cannot move {source} to {path}: {exc.strerror}") from exc

    def fits(fd: int, info: os.stat_result) -> bool:
        if not (stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and info.st_size == size
                and os.pread(fd, len(header), 0) == header):  # fmt: skip
            return False
        os.fchmod(fd, FILE_MODE)
        return True

    return _kept_if(path, fits)


def link_verified(
    source: str, path: str, header: bytes, size: int, identity: tuple[int, int, int, int]
) -> bool:
    """Link the stored file ``source`` as ``path`` (a staging file) if what lands there is
    the very file its reuser vouched for: a regular file with that ``identity`` (so
    unchanged since), ``size`` bytes, starting with ``header``. False when it is not
    (nothing is left at ``path``) or cannot be linked: the caller copies it instead.
    Checked after the link, on the file linked, so nothing can swap it in between."""
    if not hard_link(source, path):
        return False
    return _kept_if(
        path,
        lambda fd, info: (
            stat.S_ISREG(info.st_mode)
            and identity_of(info) == identity
            and info.st_size == size
            and os.pread(fd, len(header), 0) == header
        ),
    )


def _kept_if(path: str, fits: Callable[[int, os.stat_result], bool]) -> bool:
    """Whether the file just placed at ``path`` ``fits`` (asked on its descriptor, opened
    without following a link); removed when it does not or cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            kept = fits(fd, os.fstat(fd))
        finally:
            os.close(fd)
    except OSError:
        kept = False
    if not kept:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return kept


def replace_with_link(source: str, path: str) -> bool:
    """Replace the staged file ``path`` by a hard link to ``source``; False if it cannot be."""
    temporary = f"{path}.link"
    if not hard_link(source, temporary):
        return False
    try:
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise StorageError(exc.errno, f"cannot link {source} to {path}: {exc.strerror}") from exc
    return True


def same_bytes(path: str, header: bytes, data: memoryview) -> bool:
    """True when the regular file at ``path`` holds exactly ``header`` + ``data``.

    Read a chunk at a time with ``pread`` into one buffer, not through a map: the
    map's page faults cost several times the comparison (2 s a GiB on a first
    comparison against 0.3 s, measured), and a stored file truncated meanwhile (a
    tampered store) ends the read early rather than fault the daemon (SIGBUS).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return _holds(fd, header, data)
    except OSError:
        return False
    finally:
        os.close(fd)


def _holds(fd: int, header: bytes, data: memoryview) -> bool:
    info = os.fstat(fd)
    total = data.nbytes
    if not stat.S_ISREG(info.st_mode) or info.st_size != len(header) + total:
        return False
    if os.pread(fd, len(header), 0) != header:
        return False
    wanted = np.frombuffer(data, dtype=np.uint8)
    chunk = bytearray(min(COMPARE_CHUNK, total))
    buffer, view = np.frombuffer(chunk, dtype=np.uint8), memoryview(chunk)
    done = 0
    while done < total:
        got = os.preadv(fd, [view[: min(COMPARE_CHUNK, total - done)]], len(header) + done)
        if got <= 0 or not np.array_equal(buffer[:got], wanted[done : done + got]):
            return False
        done += got
    return True
