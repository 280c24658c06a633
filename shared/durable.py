"""Durable file-system primitives for the commit path.

Published files are write-once: created with O_EXCL, written fully, fsynced,
created read-only. A failed write or fsync raises StorageError and removes the
partial file; it is never retried as if it had succeeded (after a failed fsync
the kernel may already have dropped the dirty pages).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from .errors import StorageError

FILE_MODE = 0o444
DIR_MODE = 0o755
WRITE_CHUNK = 64 << 20


def write_all(fd: int, data: memoryview | bytes) -> None:
    """Write every byte of ``data``, looping over short writes."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view[:WRITE_CHUNK])
        view = view[written:]


def write_new_file(path: Path, chunks: Iterable[memoryview | bytes]) -> None:
    """Create ``path`` (it must not exist), write ``chunks``, fsync, leave it read-only."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise StorageError(exc.errno, f"cannot create {path}: {exc.strerror}") from exc
    try:
        for chunk in chunks:
            write_all(fd, chunk)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        _unlink_quietly(path)
        raise StorageError(exc.errno, f"cannot write {path}: {exc.strerror}") from exc
    os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so the entries created or renamed in it are durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(exc.errno, f"cannot fsync directory {path}: {exc.strerror}") from exc


def make_dir(path: Path, *, durable: bool = True) -> bool:
    """Create ``path`` if missing (and fsync its parent when ``durable``); True if created."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return False
    except OSError as exc:
        raise StorageError(exc.errno, f"cannot create directory {path}: {exc.strerror}") from exc
    if durable:
        fsync_dir(path.parent)
    return True


def hard_link(source: Path, target: Path) -> bool:
    """Link ``source`` as ``target``; False when linking is impossible (too many links, gone)."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno in (errno.EMLINK, errno.ENOENT, errno.EXDEV, errno.EPERM):
            return False
        raise StorageError(exc.errno, f"cannot link {source} to {target}: {exc.strerror}") from exc
    return True


def rename_dir(source: Path, target: Path) -> None:
    try:
        os.rename(source, target)
    except OSError as exc:
        raise StorageError(
            exc.errno, f"cannot rename {source} to {target}: {exc.strerror}"
        ) from exc


def remove_tree(path: Path) -> None:
    """Remove a staged or retired directory; files in it may be read-only."""
    shutil.rmtree(path, ignore_errors=True)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
