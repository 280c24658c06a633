"""The shared-memory version table: each slot's current version, readable in ~0.2 us.

The daemon owns one POSIX shared-memory segment per store (:func:`segment_name`)
and is its only writer. Every reader maps it read-only and checks it on each
``get()`` to learn whether its cached context is still current, without a
syscall, a socket round trip or SQL. The table is a hint, never the truth: the
truth is the store's SQLite index. A reader that cannot get a consistent
answer gets ``None`` ("unknown") and asks the store.

Layout (version 1; native byte order, every field an 8-byte aligned integer so
that each one is written and read with a single aligned 8-byte memory access)::

    header, 64 bytes
      0  magic          8s   b"CTXVTAB\\0", written last when the segment is created
      8  layout version u32  LAYOUT_VERSION
     12  entry size     u32  ENTRY_SIZE
     16  capacity       u64  number of entries, a power of two
     24  incarnation    u64  random, chosen by the daemon that created the segment
     32  daemon pid     u64
     40  created at     u64  ns since the epoch
     48  used           u64  entries claimed so far (informative)
     56  closed         u64  1 once the daemon closed the table on a clean shutdown

    entries, ENTRY_SIZE = 40 bytes each, from offset 64
      0  seq end        u64  seqlock: number of the last write that finished
      8  version        u64  current version; 0 = slot removed
     16  committed at   u64  ns since the epoch when that version was published
     24  seq begin      u64  seqlock: number of the last write that started
     32  key            u64  slot + 1; 0 = empty (never freed: entries are not deleted)

The hash table uses open addressing with linear probing from a Fibonacci hash
of the slot. An entry, once claimed for a slot, stays that slot's entry for the
life of the segment, so a reader caches its offset after the first probe.

The seqlock is split into two counters so that a reader takes one snapshot of
an entry with a single ``unpack_from`` (memory order: end, version, committed
at, begin). The writer bumps ``begin``, writes the data, then sets ``end`` to
``begin``; a write in flight shows ``begin == end + 1`` (the "odd" state of a
one-counter seqlock). The reader accepts the snapshot only when the two
counters are equal: ``end`` read first proves the data of write n was complete,
``begin`` read last proves write n + 1 had not started. After a few failed
tries it reports ``None``. A new entry's key is written after its first value,
so a reader that finds the key finds a published value.

This relies on stores becoming visible in program order and loads not passing
each other, as on x86-64 (TSO). Python cannot emit memory fences; on weakly
ordered CPUs each 8-byte field is still read whole (aligned accesses are
single-copy atomic) and one field never goes back in time, so a version read
is always one the daemon wrote, only the pairing with ``committed at`` could
be off.

A crashed daemon leaves its segment behind, frozen at the versions it last
published, which the store still holds. The next daemon, holding the writer
lock, reclaims it: unlinks the name and creates a new segment with a new
incarnation. Readers still mapping the old one find out with
:meth:`VersionTable.is_current` when they reconnect.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import NamedTuple, Self

import posix_ipc

from .errors import (
    ClosedError,
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    StorageError,
)
from .validation import check_slot, check_version

__all__ = [
    "DEFAULT_CAPACITY",
    "ENTRY_SIZE",
    "HEADER_SIZE",
    "LAYOUT_VERSION",
    "MAGIC",
    "Entry",
    "VersionTable",
    "VersionTableWriter",
    "segment_name",
]

log = logging.getLogger(__name__)

MAGIC = b"CTXVTAB\x00"
LAYOUT_VERSION = 1
DEFAULT_CAPACITY = 65536
MIN_CAPACITY = 8
MAX_CAPACITY = 2**24
DEFAULT_MODE = 0o640

_HEADER = struct.Struct("=8sIIQQQQQQ")
_HEADER_TAIL = struct.Struct("=IIQQQQQQ")  # the header without the magic
HEADER_SIZE = _HEADER.size
_CLOSED_AT = 56
_USED_AT = 48

_ENTRY = struct.Struct("=QQQQQ")  # seq end, version, committed at, seq begin, key
ENTRY_SIZE = _ENTRY.size
_SNAPSHOT = struct.Struct("=QQQQ")  # seq end, version, committed at, seq begin
_WORD = struct.Struct("=Q")
_PAYLOAD = struct.Struct("=QQ")  # version, committed at
_PAYLOAD_AT = 8
_SEQ_BEGIN_AT = 24
_KEY_AT = 32

_SPIN_TRIES = 8  # re-read at once: a writer on another core finishes within a microsecond
_YIELD_TRIES = 8  # then give up the CPU between tries: it may have been preempted mid-write
_GOLDEN = 0x9E3779B97F4A7C15
_U64 = 2**64 - 1

# Module-level bound methods: the hot path avoids two attribute lookups per call.
_read_snapshot = _SNAPSHOT.unpack_from
_read_word = _WORD.unpack_from


class Entry(NamedTuple):
    """One slot's row in the table, read consistently."""

    version: int
    committed_at_ns: int


def segment_name(store_path: str | os.PathLike[str]) -> str:
    """The segment name for the store at ``store_path``: ``/ctxstore-<16 hex>``.

    Derived from the real path, so every spelling of the same directory (and
    every symlink to it) names the same segment. Short enough for every
    platform's limit on shared-memory names.
    """
    real = os.fsencode(os.path.realpath(store_path))
    return "/ctxstore-" + hashlib.blake2b(real, digest_size=8).hexdigest()


def _home(slot: int, shift: int) -> int:
    return ((slot * _GOLDEN) & _U64) >> shift


def _check_capacity(capacity: object) -> int:
    if (
        isinstance(capacity, bool)
        or not isinstance(capacity, int)
        or not MIN_CAPACITY <= capacity <= MAX_CAPACITY
        or capacity & (capacity - 1)
    ):
        raise InvalidInputError(
            f"capacity must be a power of two between {MIN_CAPACITY} and {MAX_CAPACITY}, "
            f"got {capacity!r:.40}"
        )
    return capacity


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.startswith("/") or "/" in name[1:] or len(name) < 2:
        raise InvalidInputError(
            f"shared-memory name must be '/' followed by a name without '/', got {name!r:.80}"
        )
    return name


class VersionTable:
    """A read-only view of a version table; what readers hold.

    :meth:`attach` maps an existing segment; :meth:`get` is the hot path.
    The daemon gets a :class:`VersionTableWriter` from :meth:`create`.
    """

    def __init__(
        self, name: str, shm_map: mmap.mmap, identity: tuple[int, int], capacity: int
    ) -> None:
        self._name = name
        self._map = shm_map
        self._identity = identity
        self._capacity = capacity
        self._shift = 64 - (capacity.bit_length() - 1)
        self._offsets: dict[int, int] = {}
        self._offset_of = self._offsets.get
        self._is_closed = False

    # -- opening -----------------------------------------------------------

    @classmethod
    def attach(cls, name: str) -> VersionTable:
        """Map the segment ``name`` read-only.

        Raises NotFoundError when there is no such segment, or when its daemon
        is still initialising it; IntegrityError when it is not a version table
        of this layout; StorageError when the OS refuses to open or map it.
        """
        _check_name(name)
        try:
            shm = posix_ipc.SharedMemory(name, read_only=True)
        except posix_ipc.ExistentialError:
            raise NotFoundError(f"no version table segment {name}") from None
        except (posix_ipc.Error, OSError) as exc:
            raise StorageError(f"cannot open version table segment {name}: {exc}") from exc
        try:
            stat = os.fstat(shm.fd)
            size = stat.st_size
            if size < HEADER_SIZE:
                raise NotFoundError(f"version table segment {name} is not initialised yet")
            shm_map = mmap.mmap(shm.fd, size, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise StorageError(f"cannot map version table segment {name}: {exc}") from exc
        finally:
            shm.close_fd()
        try:
            capacity = _validate_header(name, shm_map, size)
        except BaseException:
            shm_map.close()
            raise
        return VersionTable(name, shm_map, (stat.st_dev, stat.st_ino), capacity)  # read-only

    @classmethod
    def create(
        cls,
        name: str,
        capacity: int = DEFAULT_CAPACITY,
        *,
        reclaim_stale: bool = True,
        mode: int = DEFAULT_MODE,
        clock: Callable[[], int] = time.time_ns,
    ) -> VersionTableWriter:
        """Create the segment ``name``; see :meth:`VersionTableWriter.create`."""
        return VersionTableWriter.create(
            name, capacity, reclaim_stale=reclaim_stale, mode=mode, clock=clock
        )

    # -- the hot path ------------------------------------------------------

    def get(self, slot: int) -> int | None:
        """The slot's current version; None when it is not in the table or unknown.

        After the first call for a slot this is one dict lookup and one
        ``unpack_from`` on the mapping: no syscall, no lock.
        """
        offset = self._offset_of(slot)
        if offset is None:
            offset = self._find(slot)
            if offset is None:
                return None
        try:
            end, version, _committed, begin = _read_snapshot(self._map, offset)
        except ValueError:
            raise ClosedError(f"version table {self._name} is closed") from None
        if end == begin:
            return version or None
        entry = self._read_contended(offset)
        return entry.version if entry is not None else None

    def entry(self, slot: int) -> Entry | None:
        """The slot's version and when it was published; None as for :meth:`get`."""
        offset = self._offset_of(slot)
        if offset is None:
            offset = self._find(slot)
            if offset is None:
                return None
        return self._read_contended(offset)

    def _read_contended(self, offset: int) -> Entry | None:
        for attempt in range(_SPIN_TRIES + _YIELD_TRIES):
            try:
                end, version, committed, begin = _read_snapshot(self._map, offset)
            except ValueError:
                raise ClosedError(f"version table {self._name} is closed") from None
            if end == begin:
                return Entry(version, committed) if version else None
            if attempt >= _SPIN_TRIES:
                os.sched_yield()
        return None  # unknown: the caller asks the store

    def _find(self, slot: int) -> int | None:
        """Probe for ``slot``'s entry and cache its offset once found."""
        slot = check_slot(slot)
        self._check_open()
        key = slot + 1
        index = _home(slot, self._shift)
        mask = self._capacity - 1
        for _ in range(self._capacity):
            offset = HEADER_SIZE + index * ENTRY_SIZE
            (found,) = _read_word(self._map, offset + _KEY_AT)
            if found == key:
                self._offsets[slot] = offset
                return offset
            if found == 0:
                return None
            index = (index + 1) & mask
        return None

    # -- identity and lifecycle --------------------------------------------

    @property
    def name(self) -> str:
        """The segment's POSIX shared-memory name."""
        return self._name

    @property
    def capacity(self) -> int:
        """How many slots the table can hold."""
        return self._capacity

    @property
    def incarnation(self) -> int:
        """Random id chosen by the daemon that created this segment."""
        return self._header_word(24)

    @property
    def daemon_pid(self) -> int:
        """Pid of the daemon that created this segment."""
        return self._header_word(32)

    @property
    def created_at_ns(self) -> int:
        """When the segment was created, ns since the epoch."""
        return self._header_word(40)

    @property
    def used(self) -> int:
        """How many entries have been claimed (removed slots included)."""
        return self._header_word(_USED_AT)

    @property
    def closed(self) -> bool:
        """True once the daemon closed this table on a clean shutdown."""
        return self._header_word(_CLOSED_AT) != 0

    def _header_word(self, offset: int) -> int:
        self._check_open()
        (value,) = _read_word(self._map, offset)
        return int(value)

    def is_current(self) -> bool:
        """Whether the name still names this very segment and its daemon has not closed it.

        False when the segment was unlinked, or reclaimed by a new daemon (a
        new incarnation), or closed. Costs a few syscalls: call it on
        reconnect or periodically, not on every get().
        """
        if self.closed:
            return False
        try:
            shm = posix_ipc.SharedMemory(self._name, read_only=True)
        except posix_ipc.ExistentialError:
            return False
        except (posix_ipc.Error, OSError) as exc:
            raise StorageError(f"cannot open version table segment {self._name}: {exc}") from exc
        try:
            stat = os.fstat(shm.fd)
        finally:
            shm.close_fd()
        return (stat.st_dev, stat.st_ino) == self._identity

    def snapshot(self) -> dict[int, int]:
        """Every slot in the table with its current version (removed slots left out).

        Scans the whole table: for status pages and resynchronisation, not the hot path.
        """
        self._check_open()
        result: dict[int, int] = {}
        for index in range(self._capacity):
            offset = HEADER_SIZE + index * ENTRY_SIZE
            (key,) = _read_word(self._map, offset + _KEY_AT)
            if key:
                entry = self._read_contended(offset)
                if entry is not None:
                    result[key - 1] = entry.version
        return result

    def _check_open(self) -> None:
        if self._is_closed:
            raise ClosedError(f"version table {self._name} is closed")

    def close(self) -> None:
        """Unmap the segment (idempotent). Later calls raise ClosedError."""
        if not self._is_closed:
            self._is_closed = True
            self._map.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._is_closed else f"capacity={self._capacity}"
        return f"<{type(self).__name__} {self._name} {state}>"


def _validate_header(name: str, shm_map: mmap.mmap, size: int) -> int:
    """Check the header of a mapped segment and return its capacity."""
    magic, layout, entry_size, capacity, *_ = _HEADER.unpack_from(shm_map, 0)
    if magic != MAGIC:
        if magic == bytes(len(MAGIC)):
            raise NotFoundError(f"version table segment {name} is not initialised yet")
        raise IntegrityError(f"segment {name} is not a ctxstore version table (magic {magic!r})")
    if layout != LAYOUT_VERSION or entry_size != ENTRY_SIZE:
        raise IntegrityError(
            f"version table {name} has layout {layout} with {entry_size}-byte entries; "
            f"this ctxstore reads layout {LAYOUT_VERSION} with {ENTRY_SIZE}-byte entries"
        )
    if capacity < MIN_CAPACITY or capacity & (capacity - 1):
        raise IntegrityError(f"version table {name} has an invalid capacity {capacity}")
    if size < HEADER_SIZE + capacity * ENTRY_SIZE:
        raise IntegrityError(
            f"version table {name} is {size} bytes, too small for {capacity} entries"
        )
    return int(capacity)


class VersionTableWriter(VersionTable):
    """The daemon's read-write handle on its version table; the only writer.

    Writes are serialised by a lock, so the daemon may publish from any thread.
    """

    def __init__(
        self,
        name: str,
        shm_map: mmap.mmap,
        identity: tuple[int, int],
        capacity: int,
        clock: Callable[[], int],
    ) -> None:
        super().__init__(name, shm_map, identity, capacity)
        self._clock = clock
        self._lock = threading.Lock()
        self._used = 0

    @classmethod
    def create(
        cls,
        name: str,
        capacity: int = DEFAULT_CAPACITY,
        *,
        reclaim_stale: bool = True,
        mode: int = DEFAULT_MODE,
        clock: Callable[[], int] = time.time_ns,
    ) -> VersionTableWriter:
        """Create an empty table named ``name`` with ``capacity`` entries.

        Call this only while holding the store's writer lock: a segment that
        exists then was left by a dead daemon, and with ``reclaim_stale`` it is
        unlinked and replaced (readers still mapping it keep their pages and
        learn from :meth:`is_current` that it is gone). Without
        ``reclaim_stale`` an existing segment raises ConflictError.

        ``mode`` is applied exactly (umask does not narrow it): readers need
        read permission. ``clock`` returns ns since the epoch for the
        "committed at" stamps.
        """
        _check_name(name)
        capacity = _check_capacity(capacity)
        size = HEADER_SIZE + capacity * ENTRY_SIZE
        shm = _create_segment(name, reclaim_stale=reclaim_stale)
        try:
            os.fchmod(shm.fd, mode)
            _allocate(shm.fd, size)
            stat = os.fstat(shm.fd)
            shm_map = mmap.mmap(shm.fd, size, access=mmap.ACCESS_WRITE)
        except OSError as exc:
            shm.close_fd()
            _unlink_quietly(name)
            raise StorageError(f"cannot create version table segment {name}: {exc}") from exc
        shm.close_fd()
        incarnation = secrets.randbits(64) or 1
        _HEADER_TAIL.pack_into(
            shm_map, len(MAGIC), LAYOUT_VERSION, ENTRY_SIZE, capacity, incarnation,
            os.getpid(), clock(), 0, 0,
        )  # fmt: skip
        shm_map[: len(MAGIC)] = MAGIC  # last: a reader that sees the magic sees the header
        log.info("created version table %s (%d entries, incarnation %016x)", name, capacity,
                 incarnation)  # fmt: skip
        return cls(name, shm_map, (stat.st_dev, stat.st_ino), capacity, clock)

    def set(self, slot: int, version: int, *, committed_at_ns: int | None = None) -> None:
        """Publish ``version`` as ``slot``'s current version.

        Raises InvalidInputError for a bad slot or version, StorageError when
        the slot is new and the table is full.
        """
        slot = check_slot(slot)
        version = check_version(version)
        with self._lock:
            self._check_open()
            stamp = self._clock() if committed_at_ns is None else committed_at_ns
            offset = self._offsets.get(slot)
            if offset is None:
                self._check_room(1)
                self._claim(slot, version, stamp)
            else:
                self._publish(offset, version, stamp)

    def set_many(self, versions: Mapping[int, int], *, committed_at_ns: int | None = None) -> None:
        """Publish several slots' versions: all of them, or (on bad input or no room) none."""
        checked = {check_slot(slot): check_version(v) for slot, v in versions.items()}
        with self._lock:
            self._check_open()
            stamp = self._clock() if committed_at_ns is None else committed_at_ns
            self._check_room(sum(1 for slot in checked if slot not in self._offsets))
            for slot, version in checked.items():
                offset = self._offsets.get(slot)
                if offset is None:
                    self._claim(slot, version, stamp)
                else:
                    self._publish(offset, version, stamp)

    def remove(self, slot: int) -> None:
        """Mark ``slot`` as absent (version 0); its entry stays claimed. No-op if absent."""
        slot = check_slot(slot)
        with self._lock:
            self._check_open()
            offset = self._offsets.get(slot)
            if offset is not None:
                self._publish(offset, 0, self._clock())

    def _check_room(self, new_slots: int) -> None:
        if self._used + new_slots > self._capacity:
            raise StorageError(
                f"version table {self._name} is full: {self._used} of {self._capacity} entries "
                f"used, {new_slots} more needed; restart the daemon with a larger capacity"
            )

    def _claim(self, slot: int, version: int, stamp: int) -> None:
        index = _home(slot, self._shift)
        mask = self._capacity - 1
        while True:
            offset = HEADER_SIZE + index * ENTRY_SIZE
            (key,) = _read_word(self._map, offset + _KEY_AT)
            if key == 0:
                break
            index = (index + 1) & mask
        self._publish(offset, version, stamp)
        _WORD.pack_into(self._map, offset + _KEY_AT, slot + 1)  # after the value: see docstring
        self._offsets[slot] = offset
        self._used += 1
        _WORD.pack_into(self._map, _USED_AT, self._used)

    def _publish(self, offset: int, version: int, stamp: int) -> None:
        (seq,) = _read_word(self._map, offset + _SEQ_BEGIN_AT)
        seq = (seq + 1) & _U64
        _WORD.pack_into(self._map, offset + _SEQ_BEGIN_AT, seq)
        _PAYLOAD.pack_into(self._map, offset + _PAYLOAD_AT, version, stamp)
        _WORD.pack_into(self._map, offset, seq)  # seq end

    def close(self) -> None:
        """Mark the table closed for its readers, then unmap it (idempotent).

        Does not remove the name: call :meth:`unlink` for that (or leave the
        table as a ``with`` block, which does both).
        """
        with self._lock:
            if not self._is_closed:
                _WORD.pack_into(self._map, _CLOSED_AT, 1)
            super().close()

    def unlink(self) -> bool:
        """Remove the segment's name if it still names this segment; True if removed.

        Readers that map it keep their pages. Works before or after close().
        """
        try:
            shm = posix_ipc.SharedMemory(self._name, read_only=True)
        except posix_ipc.ExistentialError:
            return False
        except (posix_ipc.Error, OSError) as exc:
            raise StorageError(f"cannot open version table segment {self._name}: {exc}") from exc
        try:
            stat = os.fstat(shm.fd)
        finally:
            shm.close_fd()
        if (stat.st_dev, stat.st_ino) != self._identity:
            return False
        return _unlink_quietly(self._name)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        self.unlink()


def _create_segment(name: str, *, reclaim_stale: bool) -> posix_ipc.SharedMemory:
    """shm_open(O_CREAT | O_EXCL), replacing a stale segment when allowed."""
    for attempt in range(2):
        try:
            return posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600)
        except posix_ipc.ExistentialError:
            if not reclaim_stale or attempt:
                break
            _log_stale(name)
            _unlink_quietly(name)
        except (posix_ipc.Error, OSError) as exc:
            raise StorageError(f"cannot create version table segment {name}: {exc}") from exc
    raise ConflictError(
        f"version table segment {name} already exists"
        + ("" if reclaim_stale else " (reclaim_stale is off)")
        + "; is another daemon creating it without holding the writer lock?"
    )


def _log_stale(name: str) -> None:
    try:
        with VersionTable.attach(name) as old:
            log.warning(
                "reclaiming stale version table %s left by daemon pid %d (incarnation %016x, %s)",
                name, old.daemon_pid, old.incarnation, "closed" if old.closed else "not closed",
            )  # fmt: skip
    except (NotFoundError, IntegrityError, StorageError) as exc:
        log.warning("reclaiming stale segment %s (%s)", name, exc)


def _allocate(fd: int, size: int) -> None:
    """Size the segment and reserve its pages, so a full /dev/shm fails here, not with SIGBUS."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    else:  # pragma: no cover - macOS
        os.ftruncate(fd, size)


def _unlink_quietly(name: str) -> bool:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    return True
