"""Durable file-system primitives for the commit path.

Published files are write-once: created with O_EXCL, written fully, fsynced,
created read-only. A failed write or fsync raises StorageError and removes the
partial file; it is never retried as if it had succeeded (after a failed fsync
the kernel may already have dropped the dirty pages).

A commit writes all its files first and then syncs them together
(:func:`fsync_all`): fsyncs issued at once share the filesystem's journal
commits, where one after another each file pays for its own. A small version's
files (:data:`SERIAL_SYNC_BYTES` in all) are the exception: handing each fsync
to a pool thread cost more CPU than the fsync itself, so each small file's
writeback is started as it is written (:func:`start_writeback`, the kernel's
``sync_file_range``) and the fsyncs then run one after another in the caller's
thread, each mostly waiting for I/O already under way. Every file still gets
its own fsync before anything depends on it. A large import
starts each file's fsync as soon as the file is written (:class:`SyncQueue`),
so the disk writes one tensor while the next is copied instead of all of them
after the last; the commit waits for every one before its rename, as before.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from ..errors import StorageError

#: what every function here takes as a path: the commit path passes plain strings
StrPath = str | os.PathLike[str]

FILE_MODE = 0o444
DIR_MODE = 0o755
WRITE_CHUNK = 64 << 20
#: fsyncs in flight at once beside the caller's own
SYNC_THREADS = 8
#: files of at most this many bytes in all are fsynced in the caller's thread, one
#: after another (their writeback started as each was written), not by the pool
SERIAL_SYNC_BYTES = 1 << 20


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
    before anything that depends on its contents becomes durable; a small file's
    writeback is started here (:func:`start_writeback`), so that fsync mostly waits.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise StorageError(exc.errno, f"cannot create {path}: {exc.strerror}") from exc
    try:
        written = 0
        for chunk in chunks:
            write_all(fd, chunk)
            written += memoryview(chunk).nbytes
        if sync:
            os.fsync(fd)
        elif written <= SERIAL_SYNC_BYTES:
            start_writeback(fd)
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


def fsync_all(paths: Sequence[StrPath], *, nbytes: int | None = None) -> None:
    """fsync every path; raises the first failure after all have been tried.

    Concurrently on the pool, or, when the caller says they hold ``nbytes`` <=
    :data:`SERIAL_SYNC_BYTES` in all (or there is one path), one after another in
    this thread. Nothing is retried: a path whose fsync failed is reported even if
    the others succeeded, and the caller abandons what depended on it.
    """
    failures: list[BaseException] = []
    if len(paths) <= 1 or (nbytes is not None and nbytes <= SERIAL_SYNC_BYTES):
        for path in paths:
            try:
                fsync_path(path)
            except StorageError as exc:
                failures.append(exc)
    else:
        pool = _sync_pool()
        futures: list[Future[None]] = [pool.submit(fsync_path, path) for path in paths[1:]]
        try:
            fsync_path(paths[0])
        except StorageError as exc:
            failures.append(exc)
        failures.extend(e for e in (f.exception() for f in futures) if e is not None)
    if failures:
        raise failures[0]


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages now, without waiting
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``). Only a head start for the
    fsync that must still follow: it makes nothing durable, and where the call is
    missing or fails nothing happens."""
    call = _sync_file_range()
    if call is not None:
        call(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


_SYNC_FILE_RANGE_WRITE = 2
_SyncFileRange = Callable[[int, int, int, int], int]
_sync_file_range_fn: list[_SyncFileRange | None] = []


def _sync_file_range() -> _SyncFileRange | None:
    """libc's sync_file_range, looked up once (None off Linux or without it)."""
    if not _sync_file_range_fn:
        import ctypes  # only a writer needs it, once

        function: _SyncFileRange | None = None
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            found = libc.sync_file_range
            found.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            found.restype = ctypes.c_int
            function = found
        _sync_file_range_fn.append(function)
    return _sync_file_range_fn[0]


class SyncQueue:
    """fsyncs started one file at a time as the files are written, waited for together.

    :meth:`wait` returns once every fsync has finished and raises the first
    failure (a failed fsync is never retried: the caller abandons the commit).
    :meth:`abandon` waits for them too and ignores what they found (the commit
    failed anyway; its files are about to be removed).
    """

    def __init__(self) -> None:
        self._futures: list[Future[None]] = []
        #: the paths whose fsync was started, in order
        self.paths: list[str] = []

    def start(self, path: str) -> None:
        """Start fsyncing ``path`` in the background."""
        self._futures.append(_sync_pool().submit(fsync_path, path))
        self.paths.append(path)

    def wait(self) -> None:
        futures, self._futures = self._futures, []
        failures = [e for e in (f.exception() for f in futures) if e is not None]
        if failures:
            raise failures[0]

    def abandon(self) -> None:
        futures, self._futures = self._futures, []
        for future in futures:
            future.exception()


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


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NO_LINK_DIR_FLAGS = _DIR_FLAGS | os.O_NOFOLLOW


def describe_entry(mode: int) -> str:
    """What a directory entry is, for messages: ``a symbolic link``, ``a FIFO``..."""
    for test, what in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return what
    return "an unknown kind of file"


def remove_beneath(root: StrPath, relative: str) -> str | None:
    """Remove the directory ``root/relative`` and all it holds, never leaving ``root``.

    ``root`` (the store directory) is trusted as it is; below it no symbolic link
    is followed: each directory on the way is opened with O_NOFOLLOW relative to
    the one before, and the removal itself works on directory descriptors
    (``shutil.rmtree(dir_fd=...)`` unlinks a link it meets, never its target).
    ``relative`` must be plain names joined by ``/`` (no ``..``). Returns None when
    the directory is gone (or never was), else why it was left alone: a link or
    something else than a directory on the way, or a name that is not plain.
    """
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return f"{relative!r:.200} is not a plain path inside the store: not removed"
    fd, refusal = _open_parent(root, parts)
    if fd is None:
        return refusal and f"{refusal}: {relative} not removed"
    try:
        mode = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False).st_mode
        if not stat.S_ISDIR(mode):
            return f"{relative} is {describe_entry(mode)}, not a directory: not removed"
        shutil.rmtree(parts[-1], dir_fd=fd, ignore_errors=True)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)
    return None


def _open_parent(root: StrPath, parts: list[str]) -> tuple[int | None, str | None]:
    """A descriptor of ``root/parts[:-1]`` opened link by link with O_NOFOLLOW, or None
    and why not (None, None: something on the way does not exist)."""
    try:
        fd = os.open(root, _DIR_FLAGS)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot open {root}: {exc.strerror}"
    for depth, part in enumerate(parts[:-1]):
        where = "/".join(parts[: depth + 1])
        try:
            mode = os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode
            refusal = None if stat.S_ISDIR(mode) else f"{where} is {describe_entry(mode)}"
            next_fd = None if refusal else os.open(part, _NO_LINK_DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            next_fd, refusal = None, None
        except OSError as exc:  # replaced since the stat: refused all the same
            next_fd, refusal = None, f"cannot open {where}: {exc.strerror}"
        os.close(fd)
        if next_fd is None:
            return None, refusal
        fd = next_fd
    return fd, None


def clear_scratch_dir(root: StrPath, name: str) -> list[str]:
    """Make ``root/name`` an empty real directory (the store's ``wal/``); say what was odd.

    Everything in it is scratch (staging for commits that never reached their
    commit point). Directories are removed as :func:`remove_beneath` does; any
    other entry (a file, a FIFO, a symbolic link) is unlinked, which never
    touches a link's target. If ``root/name`` itself is a symbolic link or no
    directory, that entry is unlinked (again: never what it points to) and a new
    directory made. The returned notes say each such thing that should not
    have been there.
    """
    notes: list[str] = []
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        try:
            mode = os.stat(name, dir_fd=root_fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and not stat.S_ISDIR(mode):
            target = _link_target(name, root_fd) if stat.S_ISLNK(mode) else ""
            os.unlink(name, dir_fd=root_fd)
            notes.append(
                f"{name} was {describe_entry(mode)}{target}, not a directory: that entry was "
                f"removed (never what it points to) and a new {name}/ made"
            )
            mode = None
        if mode is None:
            os.mkdir(name, DIR_MODE, dir_fd=root_fd)
        fd = os.open(name, _NO_LINK_DIR_FLAGS, dir_fd=root_fd)
    except OSError as exc:
        raise StorageError(exc.errno, f"cannot prepare {root}/{name}: {exc.strerror}") from exc
    finally:
        os.close(root_fd)
    try:
        for entry in os.listdir(fd):
            mode = os.stat(entry, dir_fd=fd, follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                shutil.rmtree(entry, dir_fd=fd, ignore_errors=True)
                continue
            target = _link_target(entry, fd) if stat.S_ISLNK(mode) else ""
            os.unlink(entry, dir_fd=fd)
            notes.append(f"{name}/{entry} was {describe_entry(mode)}{target}: removed that entry")
    except OSError as exc:
        raise StorageError(exc.errno, f"cannot empty {root}/{name}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    return notes


def _link_target(name: str, dir_fd: int) -> str:
    try:
        return f" (to {os.readlink(name, dir_fd=dir_fd)!r:.200})"
    except OSError:
        return ""


def _unlink_quietly(path: StrPath) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
