"""Durable file-system primitives for the commit path.

Published files are write-once: created with O_EXCL, written fully, fsynced,
created read-only. A failed write or fsync raises StorageError and removes the
partial file; it is never retried as if it had succeeded (after a failed fsync
the kernel may already have dropped the dirty pages).

A commit writes all its files first and then syncs them together
(:func:`fsync_all`): fsyncs issued at once share the filesystem's journal
commits, where one after another each file pays for its own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from .errors import StorageError

#: what every function here takes as a path: the commit path passes plain strings
StrPath = str | os.PathLike[str]

FILE_MODE = 0o444
DIR_MODE = 0o755
WRITE_CHUNK = 64 << 20
#: fsyncs in flight at once beside the caller's own
SYNC_THREADS = 8


def write_all(fd: int, data: memoryview | bytes) -> None:
    """Write every byte of ``data``, looping over short writes."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view[:WRITE_CHUNK])
        view = view[written:]


def write_new_file(
    path: StrPath, chunks: Iterable[memoryview | bytes], *, sync: bool = True
) -> None:
    """Create ``path`` (it must not exist), write ``chunks``, leave it read-only.

    With ``sync=False`` the caller owes the file an fsync (:func:`fsync_all`)
    before anything that depends on its contents becomes durable.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise StorageError(exc.errno, f"cannot create {path}: {exc.strerror}") from exc
    try:
        for chunk in chunks:
            write_all(fd, chunk)
        if sync:
            os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        _unlink_quietly(path)
        raise StorageError(exc.errno, f"cannot write {path}: {exc.strerror}") from exc
    os.close(fd)


def fsync_dir(path: StrPath) -> None:
    """fsync a directory so the entries created or renamed in it are durable."""
    fsync_path(path)


def fsync_path(path: StrPath) -> None:
    """fsync the file or directory at ``path`` (opened read-only: Linux syncs it all the same)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(exc.errno, f"cannot fsync {path}: {exc.strerror}") from exc


def fsync_all(paths: Sequence[StrPath]) -> None:
    """fsync every path, at once; raises the first failure after all have finished.

    Nothing is retried: a path whose fsync failed is reported even if the
    others succeeded, and the caller abandons what depended on it.
    """
    if len(paths) <= 1:
        for path in paths:
            fsync_path(path)
        return
    pool = _sync_pool()
    futures: list[Future[None]] = [pool.submit(fsync_path, path) for path in paths[1:]]
    failures: list[BaseException] = []
    try:
        fsync_path(paths[0])
    except StorageError as exc:
        failures.append(exc)
    failures.extend(e for e in (f.exception() for f in futures) if e is not None)
    if failures:
        raise failures[0]


class _SyncPool:
    """The fsync threads, started on first use; a forked child starts its own."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)

    def __call__(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    SYNC_THREADS, thread_name_prefix="ctxstore-fsync"
                )
            return self._executor

    def _forget(self) -> None:
        self._executor, self._lock = None, threading.Lock()


_sync_pool = _SyncPool()


def make_dir(path: StrPath, *, durable: bool = True) -> bool:
    """Create ``path`` if missing (and fsync its parent when ``durable``); True if created."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return False
    except OSError as exc:
        raise StorageError(exc.errno, f"cannot create directory {path}: {exc.strerror}") from exc
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    return True


def hard_link(source: StrPath, target: StrPath) -> bool:
    """Link ``source`` as ``target``; False when linking is impossible (too many links, gone)."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno in (errno.EMLINK, errno.ENOENT, errno.EXDEV, errno.EPERM):
            return False
        raise StorageError(exc.errno, f"cannot link {source} to {target}: {exc.strerror}") from exc
    return True


def rename_dir(source: StrPath, target: StrPath) -> None:
    try:
        os.rename(source, target)
    except OSError as exc:
        raise StorageError(
            exc.errno, f"cannot rename {source} to {target}: {exc.strerror}"
        ) from exc


def remove_tree(path: StrPath) -> None:
    """Remove a staged or retired directory; files in it may be read-only."""
    shutil.rmtree(path, ignore_errors=True)


def _unlink_quietly(path: StrPath) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
