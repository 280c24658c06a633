"""The store's consistency checker: rows against files, files against rows, checksums.

Used by ``PersistentStore.verify``, ``ctxstore verify`` and the API, and by the
tests after every operation that could go wrong. It only reads, and it reads
the store as a tampered one could be: every value from the index is checked
before it names a file, no symbolic link below the store directory is
followed, and a tensor file is opened without waiting (a FIFO in its place
would block a plain open forever).

Problem kinds: ``index_damaged`` (SQLite's own checks), ``bad_record`` (a value
in the index that cannot be right: a version that is no integer, a dtype no
stored tensor has, sizes that disagree), ``manifest_mismatch``,
``missing_version_dir``, ``missing_file``, ``not_a_file`` (a recorded file that is
a link, a FIFO...), ``wrong_size``, ``header_mismatch`` (the file's .npy header
disagrees with its row), ``checksum_mismatch``, ``stray_file`` (a file in a
version directory that no row names), ``orphan`` (a version directory with no
row), ``stray_entry`` (anything else out of place: a file or link where a
directory belongs, a name that is no number), ``dangling_current``.
"""

from __future__ import annotations

import errno
import mmap
import os
import sqlite3
import stat
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import xxhash

from .errors import IntegrityError
from .records import Problem
from .store import layout
from .store.durable import describe_entry
from .store.manifest import ManifestEntry, check_layout, unpack_manifest
from .store.npyfile import MAX_HEADER_BYTES, check_npy_header, dtype_from_text, shape_from_text
from .validation import MAX_VERSION

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
#: a FIFO must not block the open, a link is not followed
_FILE_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW
_HASH_CHUNK = 16 << 20

#: one row of the tensors table as verify reads it
TensorRowIn = tuple[object, object, object, object, object, object, object, object, object]


def recorded_version(value: object, slot: object) -> int:
    """A version number read from the index, checked before it names a directory.

    IntegrityError unless it is an integer from 1 up: SQLite keeps whatever a row
    was given, and a text such as ``'../../x'`` would name a path outside the store.
    """
    if type(value) is not int or not 1 <= value <= MAX_VERSION:
        raise IntegrityError(
            f"the index records version {value!r:.80} of slot {slot!r:.20}, which is no "
            "version number (run `ctxstore verify`)"
        )
    return value


def real_dir_problem(root: Path, slot: int, version: int) -> str | None:
    """Why ``slots/<slot>/<version>`` is not a real directory (None: it is one).

    Each step is checked with lstat: a symbolic link on the way does not count.
    """
    path = root
    for part in (layout.SLOTS_DIR, str(slot), str(version)):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return f"{path} does not exist"
        if not stat.S_ISDIR(mode):
            return f"{path} is {describe_entry(mode)}, not followed"
    return None


def check_index(conn: sqlite3.Connection) -> list[Problem]:
    """SQLite's own structural check plus foreign keys."""
    problems: list[Problem] = []
    try:
        for (result,) in conn.execute("PRAGMA quick_check"):
            if result != "ok":
                problems.append(Problem("index_damaged", f"quick_check: {result}"))
        for row in conn.execute("PRAGMA foreign_key_check"):
            problems.append(Problem("index_damaged", f"foreign key violation: {tuple(row)}"))
    except sqlite3.DatabaseError as exc:
        problems.append(Problem("index_damaged", f"index unreadable: {exc}"))
    return problems


def check_versions(
    root: Path, conn: sqlite3.Connection, slot: int | None, *, rehash: bool = True
) -> list[Problem]:
    """Every recorded tensor: a sound record, a regular file of its size whose .npy header
    agrees with it, and (with rehash) its checksum; then each version: its manifest
    agrees with its rows, its directory is real and holds nothing else."""
    rows: list[TensorRowIn] = conn.execute(
        "SELECT slot, version, position, name, dtype, shape, data_offset, nbytes, checksum "
        "FROM tensors WHERE (?1 IS NULL OR slot = ?1) ORDER BY slot, version, position",
        (slot,),
    ).fetchall()
    problems: list[Problem] = []
    by_version: dict[tuple[int, int], list[ManifestEntry]] = defaultdict(list)
    files: dict[tuple[int, int], set[str]] = defaultdict(set)
    with _VersionDirs(root) as dirs:
        for row in rows:
            s, v, position, name = row[0], row[1], row[2], row[3]
            try:
                entry, key = _checked_row(row)
            except IntegrityError as exc:
                slot_of, version_of = (x if type(x) is int else None for x in (s, v))
                tensor = name if isinstance(name, str) else None
                problems.append(
                    Problem("bad_record", f"tensors row: {exc}", slot_of, version_of, tensor)
                )
                if type(s) is int and type(v) is int and type(position) is int:
                    files[(s, v)].add(layout.tensor_file_name(position))
                continue
            file_name = layout.tensor_file_name(key[2])
            by_version[key[:2]].append(entry)
            files[key[:2]].add(file_name)
            found = dirs.check_file(key[0], key[1], file_name, entry, rehash=rehash)
            if found:
                problems.append(Problem(found[0], found[1], key[0], key[1], entry[0]))
        problems += _check_version_rows(conn, slot, by_version, files, dirs)
    return problems


def _checked_row(row: TensorRowIn) -> tuple[ManifestEntry, tuple[int, int, int]]:
    """A tensors row as a manifest entry, and its (slot, version, position); every value
    checked (IntegrityError says which is wrong)."""
    s, v, position, name, dtype_text, shape_text, offset, nbytes, checksum = row
    version = recorded_version(v, s)
    if type(s) is not int or type(position) is not int or position < 0:
        raise IntegrityError(f"slot {s!r:.20} position {position!r:.20} are no numbers")
    if not isinstance(name, str) or not isinstance(checksum, str):
        raise IntegrityError(f"version {version} position {position}: name or checksum is no text")
    if not isinstance(dtype_text, str) or not isinstance(shape_text, str):
        raise IntegrityError(f"{name!r:.80}: dtype or shape is no text")
    dtype = dtype_from_text(dtype_text)
    try:
        shape = shape_from_text(shape_text)
    except ValueError:
        raise IntegrityError(
            f"{name!r:.80}: the shape {shape_text!r:.80} is no list of sizes"
        ) from None
    check_layout(shape, offset, nbytes, dtype, repr(name)[:80])
    assert type(offset) is int and type(nbytes) is int  # checked by check_layout
    return (name, dtype_text, shape, offset, nbytes, checksum), (s, version, position)


def _check_version_rows(
    conn: sqlite3.Connection,
    slot: int | None,
    by_version: dict[tuple[int, int], list[ManifestEntry]],
    files: dict[tuple[int, int], set[str]],
    dirs: _VersionDirs,
) -> list[Problem]:
    problems: list[Problem] = []
    version_rows = conn.execute(
        "SELECT slot, version, manifest FROM versions WHERE (?1 IS NULL OR slot = ?1) "
        "ORDER BY slot, version",
        (slot,),
    ).fetchall()
    for s, v, blob in version_rows:
        try:
            version = recorded_version(v, s)
        except IntegrityError as exc:
            problems.append(Problem("bad_record", f"versions row: {exc}", s))
            continue
        try:
            manifest = list(unpack_manifest(blob))
        except IntegrityError as exc:
            problems.append(Problem("bad_record", str(exc), s, version))
        else:
            if manifest != by_version.get((s, version), []):
                problems.append(
                    Problem("manifest_mismatch", "tensor manifest disagrees with tensor rows",
                            s, version)
                )  # fmt: skip
        names, why = dirs.list_version(s, version)
        if names is None:
            problems.append(Problem("missing_version_dir", why, s, version))
            continue
        directory = layout.version_dir(dirs.root, s, version)
        # files/ (a version's extra files) is check_version_files' to judge
        for name in sorted(set(names) - files.get((s, version), set()) - {layout.FILES_DIR}):
            problems.append(
                Problem("stray_file", f"{directory / name} is not in the index", s, version)
            )
    return problems


class _VersionDirs:
    """Version directories opened link by link with O_NOFOLLOW, the last one kept open
    (rows come sorted by version), so files are opened relative to it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root_str = str(root)
        self._key: tuple[int, int] | None = None
        self._fd: int | None = None
        self._why = ""

    def __enter__(self) -> _VersionDirs:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._key = None, None

    def _open(self, slot: int, version: int) -> int | None:
        if self._key == (slot, version):
            return self._fd
        self._close()
        self._key, self._why = (slot, version), ""
        path = self._root_str
        fd = None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            for part in (layout.SLOTS_DIR, str(slot), str(version)):
                path = f"{path}/{part}"
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = next_fd
        except OSError as exc:
            if fd is not None:
                os.close(fd)
            self._why = f"{path} {_open_failure(exc, Path(path))}"
            return None
        self._fd = fd
        return fd

    def list_version(self, slot: int, version: int) -> tuple[list[str] | None, str]:
        """The names in a version's directory, or None and why it cannot be listed."""
        fd = self._open(slot, version)
        if fd is None:
            return None, self._why
        return os.listdir(fd), ""

    def check_file(
        self, slot: int, version: int, name: str, entry: ManifestEntry, *, rehash: bool
    ) -> tuple[str, str] | None:
        """(kind, detail) of what is wrong with one recorded tensor file, or None."""
        path = f"{self._root_str}/{layout.SLOTS_DIR}/{slot}/{version}/{name}"
        directory = self._open(slot, version)
        if directory is None:
            return ("missing_file", f"{path} cannot be reached: {self._why}")
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=directory)
        except FileNotFoundError:
            return ("missing_file", f"{path} does not exist")
        except OSError as exc:
            return ("not_a_file", f"{path} {_open_failure(exc, Path(path))}")
        try:
            return _check_open_file(fd, path, entry, rehash)
        finally:
            os.close(fd)


def _open_failure(exc: OSError, path: Path) -> str:
    """Why an open with O_NOFOLLOW (and O_DIRECTORY) failed, in words."""
    if exc.errno == errno.ENOENT:
        return "does not exist"
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return f"cannot be opened: {exc.strerror}"
    if exc.errno in (errno.ELOOP, errno.ENOTDIR) or not stat.S_ISDIR(mode):
        return f"is {describe_entry(mode)}, not followed"
    return f"cannot be opened: {exc.strerror}"


def _check_open_file(
    fd: int, path: str, entry: ManifestEntry, rehash: bool
) -> tuple[str, str] | None:
    _, dtype_text, shape, offset, nbytes, checksum = entry
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):
        return ("not_a_file", f"{path} is {describe_entry(status.st_mode)}, not a regular file")
    if status.st_size != offset + nbytes:
        return (
            "wrong_size",
            f"{path} has {status.st_size} bytes, the index says {offset + nbytes}",
        )
    if offset > MAX_HEADER_BYTES:
        return ("header_mismatch", f"{path}: the index puts its data at byte {offset}, past "
                "any .npy header")  # fmt: skip
    header = os.pread(fd, offset, 0)
    check = _header_problem if offset <= _MEMO_HEADER_BYTES else _header_problem.__wrapped__
    wrong = check(header, dtype_text, shape, offset)
    if wrong is not None:
        return ("header_mismatch", f"{path}: its .npy header disagrees with the index: {wrong}")
    if rehash and _checksum_fd(fd, status.st_size) != checksum:
        return ("checksum_mismatch", f"{path} does not match its recorded xxh3-128")
    return None


#: headers longer than this are checked each time rather than kept
_MEMO_HEADER_BYTES = 64 << 10


@lru_cache(maxsize=1024)
def _header_problem(
    header: bytes, dtype_text: str, shape: tuple[int, ...], offset: int
) -> str | None:
    """What is wrong with a file's .npy header for its record, or None; memoized: the
    same few headers recur version after version, and parsing one costs ~50 us."""
    try:
        check_npy_header(header, dtype_from_text(dtype_text), shape, offset)
    except IntegrityError as exc:
        return str(exc)
    return None


def _checksum_fd(fd: int, size: int) -> str:
    """The hex xxh3-128 of an open file of ``size`` bytes, read through a map in chunks."""
    hasher = xxhash.xxh3_128()
    if size:
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
            for start in range(0, size, _HASH_CHUNK):
                hasher.update(view[start : start + _HASH_CHUNK])
    return str(hasher.hexdigest())


def check_pointers(conn: sqlite3.Connection, slot: int | None) -> list[Problem]:
    """Current pointers and aliases name versions that exist."""
    problems = []
    for s, v in conn.execute(
        "SELECT s.slot, s.current_version FROM slots s WHERE s.current_version IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM versions v WHERE v.slot = s.slot "
        "AND v.version = s.current_version) AND (?1 IS NULL OR s.slot = ?1)",
        (slot,),
    ):
        version = v if type(v) is int else None
        problems.append(Problem("dangling_current", f"current version {v!r:.80} has no record",
                                s, version))  # fmt: skip
    return problems


def check_marks(conn: sqlite3.Connection, slot: int | None) -> list[Problem]:
    """Versions recorded damaged (a reader reported them and the daemon's hash confirmed it,
    or the daemon's own check after commit failed): named even by a verify that does not hash."""
    return [
        Problem("marked_damaged", f"recorded damaged: {detail or 'no detail'}", s, v)
        for s, v, detail in conn.execute(
            "SELECT slot, version, detail FROM version_checks WHERE state = 'damaged' "
            "AND (?1 IS NULL OR slot = ?1) ORDER BY slot, version",
            (slot,),
        )
    ]


def find_orphans(root: Path, conn: sqlite3.Connection, slot: int | None) -> list[Problem]:
    """Version directories with no record (left by a crash before COMMIT), and stray entries.

    Only a real directory named by a number is an orphan (recovery deletes those);
    anything else out of place (a file, a FIFO, a symbolic link, a foreign name) is
    a ``stray_entry``: reported, never entered, never deleted.
    """
    problems: list[Problem] = []
    base = layout.slots_dir(root)
    try:
        mode = os.lstat(base).st_mode
    except FileNotFoundError:
        return problems
    if not stat.S_ISDIR(mode):
        return [Problem("stray_entry", f"{base} is {describe_entry(mode)}, not followed: "
                        "no slot directory was checked")]  # fmt: skip
    recorded = {
        (s, v)
        for s, v in conn.execute(
            "SELECT slot, version FROM versions WHERE (?1 IS NULL OR slot = ?1)", (slot,)
        )
    }
    with _open_dir(base) as base_fd:
        for slot_name, slot_mode in _entries(base_fd):
            s = layout.parse_int_name(slot_name)
            if slot is not None and s != slot:
                continue
            path = base / slot_name
            if s is None or not stat.S_ISDIR(slot_mode):
                what = "is not named by a slot number" if stat.S_ISDIR(slot_mode) else (
                    f"is {describe_entry(slot_mode)}, not a slot directory")  # fmt: skip
                problems.append(Problem("stray_entry", f"{path} {what}", s))
                continue
            problems += _slot_orphans(path, base_fd, slot_name, s, recorded)
    return problems


def _slot_orphans(
    path: Path, base_fd: int, name: str, slot: int, recorded: set[tuple[object, object]]
) -> list[Problem]:
    problems: list[Problem] = []
    try:
        slot_fd = os.open(name, _DIR_FLAGS, dir_fd=base_fd)
    except OSError as exc:  # replaced since it was listed
        return [Problem("stray_entry", f"{path} {_open_failure(exc, path)}", slot)]
    try:
        for version_name, mode in _entries(slot_fd):
            v = layout.parse_int_name(version_name)
            where = path / version_name
            if v is None or not stat.S_ISDIR(mode):
                what = "is not named by a version number" if stat.S_ISDIR(mode) else (
                    f"is {describe_entry(mode)}, not a version directory")  # fmt: skip
                problems.append(Problem("stray_entry", f"{where} {what}", slot, v))
            elif (slot, v) not in recorded:
                problems.append(Problem("orphan", f"{where} has no record", slot, v))
    finally:
        os.close(slot_fd)
    return problems


@contextmanager
def _open_dir(path: Path) -> Iterator[int]:
    fd = os.open(path, _DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


def _entries(dir_fd: int) -> list[tuple[str, int]]:
    """The (name, mode) of each entry of an open directory, sorted; links are not followed.

    A directory's mode is just S_IFDIR (the listing's own type, no stat); anything
    else is lstat-ed, for the message that names what it is.
    """
    entries = []
    with os.scandir(dir_fd) as listing:
        for entry in listing:
            try:
                if entry.is_dir(follow_symlinks=False):
                    entries.append((entry.name, stat.S_IFDIR))
                else:
                    entries.append((entry.name, entry.stat(follow_symlinks=False).st_mode))
            except FileNotFoundError:  # gone since it was listed (a writer at work)
                continue
    return sorted(entries)


def check_scratch(root: Path) -> list[Problem]:
    """``wal/`` is a real directory holding only directories (a writer's staging):
    anything else there is out of place (recovery unlinks it, never a link's target)."""
    wal = layout.wal_dir(root)
    try:
        mode = os.lstat(wal).st_mode
    except FileNotFoundError:
        return []
    if not stat.S_ISDIR(mode):
        return [Problem("stray_entry", f"{wal} is {describe_entry(mode)}, not a directory")]
    with _open_dir(wal) as fd:
        return [
            Problem(
                "stray_entry", f"{wal / name} is {describe_entry(mode)}, not a staging directory"
            )
            for name, mode in _entries(fd)
            if not stat.S_ISDIR(mode)
        ]


def verify_store(
    root: Path, conn: sqlite3.Connection, slot: int | None = None, *, rehash: bool = True
) -> list[Problem]:
    """Every check, for one slot or the whole store; an empty list means all is well."""
    problems = check_index(conn) if slot is None else []
    if problems:
        return problems
    problems += check_versions(root, conn, slot, rehash=rehash)
    problems += check_version_files(root, conn, slot, rehash=rehash)
    problems += check_pointers(conn, slot)
    problems += check_marks(conn, slot)
    problems += find_orphans(root, conn, slot)
    if slot is None:
        problems += check_scratch(root)
    return problems


def check_version_files(
    root: Path, conn: sqlite3.Connection, slot: int | None, *, rehash: bool = True
) -> list[Problem]:
    """Each version's extra files (``files/``, docs/huggingface.md): every recorded one
    a regular file of its recorded size and (with rehash) checksum, opened without
    following links; nothing unrecorded in ``files/``, which must be a real directory."""
    recorded: dict[tuple[int, int], dict[str, tuple[int, str]]] = defaultdict(dict)
    for s, v, name, size, checksum in conn.execute(
        "SELECT slot, version, name, size, checksum FROM version_files "
        "WHERE (?1 IS NULL OR slot = ?1) ORDER BY slot, version, name",
        (slot,),
    ):
        recorded[(s, v)][name] = (size, checksum)
    versions = conn.execute(
        "SELECT slot, version FROM versions WHERE (?1 IS NULL OR slot = ?1) ORDER BY slot, version",
        (slot,),
    ).fetchall()
    problems: list[Problem] = []
    with _VersionDirs(root) as dirs:
        for s, v in versions:
            if type(s) is not int or type(v) is not int:
                continue  # check_versions reports the row
            names, _ = dirs.list_version(s, v)
            expected = recorded.get((s, v), {})
            if names is None or (layout.FILES_DIR not in names and not expected):
                continue  # a missing version directory is check_versions' to report
            problems += _check_files_dir(dirs, s, v, expected, rehash=rehash)
    return problems


def _check_files_dir(
    dirs: _VersionDirs, slot: int, version: int, expected: dict[str, tuple[int, str]],
    *, rehash: bool,
) -> list[Problem]:  # fmt: skip
    directory = layout.version_dir(dirs.root, slot, version) / layout.FILES_DIR
    parent = dirs._open(slot, version)
    try:
        fd = os.open(layout.FILES_DIR, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        kind = "missing_file" if exc.errno == errno.ENOENT else "stray_entry"
        return [Problem(kind, f"{directory} {_open_failure(exc, directory)}", slot, version)]
    problems: list[Problem] = []
    try:
        for name, (size, checksum) in expected.items():
            path = directory / name
            try:
                file_fd = os.open(name, _FILE_FLAGS, dir_fd=fd)
            except OSError as exc:
                kind = "missing_file" if exc.errno == errno.ENOENT else "not_a_file"
                problems.append(Problem(kind, f"{path} {_open_failure(exc, path)}", slot,
                                        version, name))  # fmt: skip
                continue
            try:
                found = _check_extra_file(file_fd, str(path), size, checksum if rehash else None)
            finally:
                os.close(file_fd)
            if found:
                problems.append(Problem(found[0], found[1], slot, version, name))
        for name in sorted(set(os.listdir(fd)) - set(expected)):
            problems.append(
                Problem("stray_file", f"{directory / name} is not in the index", slot, version)
            )
    finally:
        os.close(fd)
    return problems


def _check_extra_file(
    fd: int, path: str, size: int, checksum: str | None
) -> tuple[str, str] | None:
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):
        return ("not_a_file", f"{path} is {describe_entry(status.st_mode)}, not a regular file")
    if status.st_size != size:
        return ("wrong_size", f"{path} has {status.st_size} bytes, the index says {size}")
    if checksum is not None and _checksum_fd(fd, size) != checksum:
        return ("checksum_mismatch", f"{path} does not match its recorded xxh3-128")
    return None
