"""Reader: zero-copy contexts inside inference workers, kept current by the daemon.

A Reader opens the store read-only, maps contexts with
:meth:`PersistentStore.load_context` (read-only arrays over mmapped files, the
page cache shared with every other reader), and learns of new versions two
ways: the daemon's shared-memory version table, checked on every :meth:`get`
in well under a microsecond, and announcements on the daemon's socket, read by
a background thread (:mod:`ctxstore.readers.client`).

The hot path (``get(slot)``, context cached and still current) is a dict
lookup and one seqlocked read of shared memory: no lock shared with other
processes, no socket round trip, no SQL, no syscall. Everything else (a miss,
an explicit version, an alias) goes through the store.

Versions and adoption: the reader keeps, per slot, a *current pointer* to the
context it serves. It *adopts* a version when that pointer moves there: on a
``get()`` that finds a newer version in the table (or the store), or when the
daemon announces a new version of a slot the reader serves (it maps it at
once, so the next ``get()`` is a hit). Each adoption is acknowledged to the
daemon; heartbeats report every version held and the process's USS/PSS.
A superseded current version leaves the cache at once (the reader stops
holding it, so retention may reclaim it); explicitly requested versions stay
until the LRU evicts them. The pointer never moves back on the table's word
alone: the table lags the store from each commit until its publication and
freezes when its daemon dies, so an older version is adopted only when the
store names it (a rollback).

Integrity: each version is checked once in this process when it is first
mapped: hashed against its recorded checksums, unless the daemon recorded it
verified during this boot, a daemon runs, and every file still has the
identity the daemon hashed (one fstat per file; docs/reliability.md). A
version whose files do not match is never served: the reader reports it to the
daemon (logged once), goes on serving the newest intact version it holds or
can map, and follows the daemon when it moves the slot's pointer back.

Daemon down: reads go on from the store, freshness from SQL (the table may be
frozen or stale); the client reconnects with backoff, re-attaches the table if
a new daemon recreated it, resubscribes and resynchronises from the daemon's
snapshot.

Fork: a child notices (a pid stamp compared on every ``get()``, kept current
by an at-fork hook, so no syscall) and reopens its own store, table, cache and
socket; the parent's subscriptions stay with the parent.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Final, Self

from ctxstore import layout
from ctxstore.cache import CacheStats, ContextCache
from ctxstore.context import Context
from ctxstore.errors import (
    ClosedError,
    CtxStoreError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    StorageError,
    WaitTimeoutError,
)
from ctxstore.lock import writer_may_be_running
from ctxstore.messages import (
    MAX_REASON_BYTES,
    Ack,
    Announce,
    DamageReport,
    Error,
    Heartbeat,
    Message,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Welcome,
)
from ctxstore.paths import default_socket_path, default_store_dir
from ctxstore.records import FileInfo
from ctxstore.store import PersistentStore
from ctxstore.validation import check_label, check_slot, check_version
from ctxstore.versiontable import VersionTable, segment_name

from .client import Backoff, DaemonClient
from .memory import MemorySampler
from .subscriptions import (
    Callback,
    Dispatcher,
    EventSink,
    Subscription,
    VersionEvent,
    group_set,
    slot_set,
)

log = logging.getLogger("ctxstore.readers")

POLL_INTERVAL: Final = 0.05  # wait_for re-checks the table/store this often between wake-ups
CLOSE_TIMEOUT: Final = 2.0
#: get() maps the current version again at most this often when each one is superseded
#: while it is being mapped; the last is adopted regardless (it was current when chosen)
ADOPT_TRIES: Final = 4
#: damaged versions this reader remembers (it neither maps nor re-reports them)
MAX_DAMAGED: Final = 1024
#: characters of an IntegrityError's text sent in a damage report
MAX_REPORT_CHARS: Final = 500

_pid = os.getpid()
_fork_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _pid, _fork_lock  # noqa: PLW0603 - per-process state, reset in the child
    _pid = os.getpid()
    _fork_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _no_table(slot: int) -> int | None:
    """Stands in for VersionTable.get while the table is unavailable: "ask the store"."""
    return None


def _default_name() -> str:
    return f"reader-{os.getpid()}"


class _PendingLoad:
    """A version one thread is mapping; others asking for it wait on ``done``."""

    __slots__ = ("ctx", "done")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ctx: Context | None = None  # None once done: the mapping failed


@dataclass(frozen=True, slots=True)
class ReaderStats:
    """Counters of one Reader (in this process)."""

    hits: int  # get() served from memory
    misses: int  # contexts mapped from the store
    adoptions: int  # current pointers moved to a new version
    announcements: int  # announce frames received
    sessions: int  # daemon sessions established
    reconnects: int  # sessions after the first
    connected: bool
    version_table: bool  # whether get() checks freshness in shared memory right now
    following: int  # slots kept current from announcements
    subscriptions: int
    last_error: str | None
    cache: CacheStats  # the LRU's size and evictions (its hit count includes internal refreshes)
    hashed: int = 0  # versions this process hashed when it mapped them
    trusted: int = 0  # versions mapped without hashing, on the daemon's verified record
    damaged: int = 0  # versions found damaged (reported to the daemon, never served)


class Reader:
    """Maps contexts zero-copy and keeps them current; one per process (or more), thread-safe."""

    def __init__(
        self,
        store: str | os.PathLike[str] | None = None,
        socket: str | os.PathLike[str] | None = None,
        name: str | None = None,
        *,
        cache_items: int = 64,
        cache_bytes: int | None = None,
        heartbeat_interval: float = 1.0,
        connect: bool = True,
        reconnect_backoff: tuple[float, float] = (0.05, 5.0),
        follow: bool = True,
        verify_checksums: bool = True,
    ) -> None:
        """Open ``store`` read-only and (with ``connect``) start following the daemon at ``socket``.

        ``verify_checksums``: each version is checked when this process first
        maps it, so a damaged file is never served as wrong numbers: re-hashed
        against its recorded xxh3-128 (about 60 ms a GiB, once), except when a
        running daemon hashed it during this boot and its files are unchanged
        since (the daemon's record; docs/reliability.md). Cache hits cost
        nothing extra. A damaged current version is reported to the daemon and
        the newest intact one is served instead.

        ``cache_items`` / ``cache_bytes`` bound the per-process LRU (a context
        larger than ``cache_bytes`` is never cached: each get() maps it anew).
        ``follow``: slots read with ``get(slot)`` are subscribed to, so their
        new versions are mapped and acknowledged as soon as they are announced.
        ``connect=False``: no socket; freshness comes from the version table as
        attached now (or from the store when there is none). Such a reader does
        not notice a daemon restart: readers that must, connect.
        """
        if isinstance(heartbeat_interval, bool) or not isinstance(heartbeat_interval, int | float):
            raise InvalidInputError("heartbeat_interval must be a number of seconds")
        if not (0 < heartbeat_interval < math.inf):
            raise InvalidInputError(f"heartbeat_interval must be > 0, got {heartbeat_interval}")
        try:
            initial, maximum = reconnect_backoff
        except (TypeError, ValueError):
            raise InvalidInputError(
                f"reconnect_backoff must be (initial, maximum) seconds, got {reconnect_backoff!r}"
            ) from None
        self._backoff = Backoff(initial, maximum)
        ContextCache(cache_items, cache_bytes)  # validates the bounds with the cache's own words
        self._store_path = Path(store) if store is not None else default_store_dir()
        self._socket_path = Path(socket) if socket is not None else default_socket_path()
        self._name_given = name is not None
        self._name = check_label(name, "reader name") if name is not None else _default_name()
        self._cache_items = cache_items
        self._cache_bytes = cache_bytes
        self._heartbeat_interval = float(heartbeat_interval)
        self._connect = connect
        self._follow_enabled = follow
        self._verify = bool(verify_checksums)
        self._closed = False
        self._open()

    def _open(self) -> None:
        """Everything that belongs to one process: made at start and again in a forked child."""
        self._lock = threading.RLock()
        self._adopted_cond = threading.Condition(self._lock)
        self._cache = ContextCache(self._cache_items, self._cache_bytes)
        self._current: dict[int, tuple[int, Context]] = {}
        self._current_get = self._current.get
        self._adopted: dict[int, int] = {}
        self._keys: set[tuple[int, int]] = set()  # every key inserted in the cache, pruned lazily
        #: versions being mapped now, by the thread that maps them for every thread asking
        self._loading: dict[tuple[int, int], _PendingLoad] = {}
        self._explicit: set[tuple[int, int]] = set()
        self._followed: set[int] = set()
        self._subscriptions: list[Subscription] = []
        self._requests: dict[int, Subscription | None] = {}  # None: the follow subscription
        self._request_ids = itertools.count(1)
        self._adoption_listeners: list[Callable[[int, int], None]] = []
        self._dispatcher: Dispatcher | None = None
        self._memory = MemorySampler(max(5 * self._heartbeat_interval, 1.0))
        self._hits = self._misses = self._adoptions = self._announcements = 0
        #: (slot, version) -> what was wrong, for versions found damaged (oldest first)
        self._damaged: dict[tuple[int, int], str] = {}
        #: slot -> (damaged version, the version served instead of it)
        self._instead: dict[int, tuple[int, int]] = {}
        #: the pid of a daemon that refused damage_report (one from before the frame)
        self._reports_refused_by: int | None = None
        self._daemon_pid: int | None = None
        self._table_get: Callable[[int], int | None] = _no_table
        self._table: VersionTable | None = None
        self._store = PersistentStore(self._store_path, readonly=True)
        self._client: DaemonClient | None = None
        if self._connect:
            self._client = DaemonClient(
                self._socket_path,
                name=self._name,
                handler=self,
                heartbeat_interval=self._heartbeat_interval,
                backoff=self._backoff,
            )
        else:
            self._attach_table()
        self._pid = _pid  # last: another thread sees a half-built reader as "not ours yet"
        if self._client is not None:
            self._client.start()

    # -- reading ---------------------------------------------------------------------------

    def get(self, slot: int, version: int | str | None = None) -> Context:
        """The context of ``slot``: current (default), a version number, or an alias.

        The arrays are read-only views over the store's mmapped files. Raises
        NotFoundError when the slot, version or alias does not exist,
        InvalidInputError for a bad slot or version, ClosedError after close().
        """
        if version is None and type(slot) is int and self._pid == _pid:
            entry = self._current_get(slot)
            if entry is not None and entry[0] == self._table_get(slot):
                self._hits += 1
                return entry[1]
        return self._get_slow(slot, version)

    def _peek(self, slot: int) -> Context | None:
        """The hot path alone: the current context if cached and fresh, else None (no I/O)."""
        if type(slot) is int and self._pid == _pid and not self._closed:
            entry = self._current_get(slot)
            if entry is not None and entry[0] == self._table_get(slot):
                self._hits += 1
                return entry[1]
        return None

    def _get_slow(self, slot: int, version: int | str | None) -> Context:
        self._check_open()
        slot = check_slot(slot)
        if version is None:
            return self._get_current(slot)
        return self._get_version(slot, version)

    def _get_current(self, slot: int) -> Context:
        for attempt in range(ADOPT_TRIES):
            floor = self._adopted.get(slot)
            number = self._table_get(slot)
            if number is None or (floor is not None and number < floor):
                # No table, or one behind what this reader already adopted: a table lags
                # the store from each commit until its publication, and freezes when its
                # daemon dies. The store decides, and only the store moves a reader back.
                number = self._store.current_version(slot)
                if number is None:
                    raise NotFoundError(f"slot {slot} has no versions")
            entry = self._current.get(slot)
            if entry is not None and entry[0] == number:
                self._hits += 1
                return entry[1]
            if (slot, number) in self._damaged:
                return self._serve_intact(slot, number)
            try:
                try:
                    ctx = self._load(slot, number)
                except NotFoundError:
                    # The table named a version the store no longer has (retired, or a stale
                    # table): serve what the store calls current rather than fail.
                    current = self._store.current_version(slot)
                    if current is None or current == number:
                        raise
                    number = current
                    ctx = self._load(slot, current)
            except IntegrityError as exc:
                self._damage_found(slot, number, exc)
                return self._serve_intact(slot, number)
            if self._adopt(slot, ctx, trusted=attempt == ADOPT_TRIES - 1):
                break
            # superseded while we mapped it: take what is current now
        else:  # another thread adopted a version meanwhile: serve its choice
            entry = self._current.get(slot)
            if entry is not None:
                ctx = entry[1]
        self._follow(slot)
        return ctx

    def _get_version(self, slot: int, version: int | str) -> Context:
        if isinstance(version, str):
            number = self._store.resolve(slot, version)
        else:
            number = check_version(version)
        entry = self._current.get(slot)
        if entry is not None and entry[0] == number:
            self._hits += 1
            return entry[1]
        try:
            ctx = self._load(slot, number)
        except IntegrityError as exc:  # that version was asked for: no other will do
            self._damage_found(slot, number, exc)
            raise
        with self._lock:
            if (slot, number) in self._cache:
                self._explicit.add((slot, number))
        return ctx

    def files(self, slot: int, version: int | str | None = None) -> tuple[FileInfo, ...]:
        """The extra files (``config.json``, tokenizer files ...) of a version; by default of
        the version :meth:`get` serves now."""
        number = self.get(slot).version if version is None else self._store.resolve(slot, version)
        return self._store.list_files(slot, number)

    def read_file(self, slot: int, name: str, version: int | str | None = None) -> bytes:
        """The bytes of extra file ``name``, checked against its recorded checksum; by default
        of the version :meth:`get` serves now, so tokenizer and weights always match."""
        number = self.get(slot).version if version is None else self._store.resolve(slot, version)
        return self._store.read_file(slot, number, name)

    def _load(self, slot: int, version: int) -> Context:
        """``version`` of ``slot`` from the cache, else mapped (and checked) once.

        One mapping per version however many threads ask at once: a commit reaches
        the version table before its announcement, so a thread in :meth:`wait_for`
        or :meth:`get` and the socket thread adopting the announcement ask for the
        same new version together. The later ones wait for the first one's mapping
        instead of mapping and checking every file again; if it fails they try
        themselves (its error belongs to its caller).
        """
        key = (slot, version)
        ctx = self._cache.get_cached_context(key)
        if ctx is not None:
            self._hits += 1
            return ctx
        with self._lock:
            pending = self._loading.get(key)
            mine = pending is None
            if pending is None:
                pending = self._loading[key] = _PendingLoad()
        if not mine:
            pending.done.wait()
            if pending.ctx is not None:
                self._hits += 1
                return pending.ctx
            return self._map_version(key)
        try:
            pending.ctx = self._map_version(key)
        finally:
            with self._lock:
                self._loading.pop(key, None)
            pending.done.set()
        return pending.ctx

    def _map_version(self, key: tuple[int, int]) -> Context:
        ctx = self._store.load_context(
            *key, verify=self._verify, trust_verified=self._verify and self._vouched()
        )
        self._misses += 1
        self._insert(key, ctx)
        return ctx

    def _vouched(self) -> bool:
        """Whether a daemon runs now, so its verified records may spare us a hash.

        Our session is up, or the store's writer lock names a live process. With
        no daemon (a store read cold, a daemon that died), every version is hashed.
        """
        return self.connected or writer_may_be_running(layout.lock_path(self._store.root))

    # -- damage ----------------------------------------------------------------------------

    def _damage_found(self, slot: int, version: int, exc: IntegrityError) -> None:
        """Remember ``version`` as damaged, log it once and report it to the daemon."""
        key = (slot, version)
        detail = _report_detail(exc)
        with self._lock:
            if key in self._damaged or self._closed:
                return
            self._damaged[key] = detail
            while len(self._damaged) > MAX_DAMAGED:
                del self._damaged[next(iter(self._damaged))]
            client = self._client if self._reports_welcome() else None
        log.error(
            "slot %d version %d is damaged (%s)%s; this reader serves the newest intact "
            "version instead",
            slot,
            version,
            detail,
            "" if client is None else ": reported to the daemon",
        )
        if client is not None:
            client.post(DamageReport(slot=slot, version=version, detail=detail))

    def _reports_welcome(self) -> bool:
        """Whether the daemon of this session understands damage_report (a daemon from
        before the frame ends the session on it: such a daemon is not told again)."""
        return self._reports_refused_by is None or self._reports_refused_by != self._daemon_pid

    def _serve_intact(self, slot: int, damaged: int) -> Context:
        """The newest intact version of ``slot`` older than ``damaged``: the one this reader
        holds, or a newer one it can map (adopted, so the daemon hears where we are).

        IntegrityError when there is none: no damaged array is ever returned.
        """
        entry = self._current.get(slot)
        if entry is not None and self._instead.get(slot) == (damaged, entry[0]):
            self._hits += 1
            return entry[1]  # chosen before, and still served
        held = None
        if entry is not None and entry[0] < damaged and (slot, entry[0]) not in self._damaged:
            held = entry[0]
        for info in reversed(self._store.list_versions(slot)):
            number = info.version
            if number >= damaged or (slot, number) in self._damaged:
                continue
            if held is not None and number <= held:
                break
            try:
                ctx = self._load(slot, number)
            except IntegrityError as exc:
                self._damage_found(slot, number, exc)
                continue
            except NotFoundError:  # retired meanwhile
                continue
            self._adopt(slot, ctx, trusted=True)
            entry = self._current.get(slot)
            if entry is not None and entry[0] == number:
                self._instead[slot] = (damaged, number)
            self._follow(slot)
            return ctx
        if entry is not None and held is not None:
            self._instead[slot] = (damaged, held)
            self._hits += 1
            return entry[1]
        raise IntegrityError(
            f"slot {slot} version {damaged} is damaged and this reader has no intact older "
            f"version to serve: {self._damaged.get((slot, damaged), 'see the daemon log')}"
        )

    def _insert(self, key: tuple[int, int], ctx: Context) -> None:
        """Cache ``ctx``; current contexts are refreshed first, so older explicit ones go first."""
        with self._lock:
            if self._closed:
                return
            for slot, (number, _ctx) in self._current.items():
                if (slot, number) != key:
                    self._cache.get_cached_context((slot, number))
            self._cache.cache_context(key, ctx)
            self._keys.add(key)
            self._prune()

    def _prune(self) -> None:
        """Forget keys the LRU evicted; a current pointer never outlives its cache entry."""
        cache = self._cache
        self._keys = {key for key in self._keys if key in cache}
        self._explicit &= self._keys
        for slot, (number, _ctx) in list(self._current.items()):
            if (slot, number) not in self._keys:
                del self._current[slot]

    def _adopt(self, slot: int, ctx: Context, *, trusted: bool = False) -> bool:
        """Move ``slot``'s current pointer to ``ctx`` if its version is current; True if it is.

        A version is current when the table names it and it is not older than what
        this reader adopted before, or else when the store names it (the table lags
        the store and freezes with a dead daemon, so an older version is adopted only
        on the store's word: a rollback). ``trusted``: the caller chose the version
        from the table or store a moment ago; adopt it unless another adoption came
        first. Acknowledges each newly adopted version to the daemon.
        """
        number = _version_of(ctx)
        floor = self._adopted.get(slot)
        current = trusted or self._is_current(slot, number, floor)
        with self._lock:
            if self._closed:
                return False
            if not current or self._adopted.get(slot) != floor:
                # superseded while we mapped it, a late announcement, or another thread
                # adopted meanwhile: never move back on a stale word. Nor keep it cached:
                # a held version is one retention may not reclaim.
                key = (slot, number)
                pointer = self._current.get(slot)
                if key not in self._explicit and (pointer is None or pointer[0] != number):
                    self._cache.pop(key)
                    self._keys.discard(key)
                return self._adopted.get(slot) == number
            old = self._current.get(slot)
            if (slot, number) in self._cache:
                self._current[slot] = (number, ctx)
            else:
                self._current.pop(slot, None)  # too large to cache: mapped again on each get()
            if floor == number:
                return True
            self._adopted[slot] = number
            self._adoptions += 1
            if old is not None and old[0] != number and (slot, old[0]) not in self._explicit:
                self._cache.pop((slot, old[0]))
                self._keys.discard((slot, old[0]))
            self._adopted_cond.notify_all()
            listeners = list(self._adoption_listeners)
        if self._client is not None:
            self._client.post(Ack(slot=slot, version=number))
        for listener in listeners:
            try:
                listener(slot, number)
            except Exception:
                log.exception("adoption listener failed")
        return True

    def _is_current(self, slot: int, number: int, floor: int | None) -> bool:
        """Whether ``number`` may be adopted: the table's word going forward, else the store's."""
        if self._table_get(slot) == number and (floor is None or number >= floor):
            return True
        try:
            return self._store.current_version(slot) == number
        except CtxStoreError:
            return False

    def _follow(self, slot: int) -> None:
        """Subscribe to ``slot`` for our own use: its announcements are adopted at once."""
        if not self._follow_enabled or slot in self._followed:
            return
        with self._lock:
            if slot in self._followed or self._closed:
                return
            self._followed.add(slot)
            client = self._client
            if client is not None and client.connected:
                request_id = next(self._request_ids)
                self._requests[request_id] = None
                client.post(Subscribe(request_id=request_id, slots=(slot,)))

    # -- waiting ---------------------------------------------------------------------------

    def wait_for(self, slot: int, version: int, timeout: float | None = None) -> Context:
        """Block until this reader has adopted ``version`` of ``slot`` or a newer one.

        Returns the current context (its version >= ``version``). Works whether
        the announcement came before or after the call, and while the daemon
        is down (the store is polled). Raises WaitTimeoutError after ``timeout``
        seconds (None: wait forever), ClosedError if the reader is closed.
        """
        slot = check_slot(slot)
        version = check_version(version)
        deadline = _deadline(timeout)
        while True:
            ctx = self._reached(slot, version)
            if ctx is not None:
                return ctx
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeoutError(
                    f"slot {slot} did not reach version {version} within {timeout} s "
                    f"(this reader is at {self._adopted.get(slot)})"
                )
            with self._adopted_cond:
                if self._adopted.get(slot, 0) < version and not self._closed:
                    self._adopted_cond.wait(min(remaining, POLL_INTERVAL))

    def _reached(self, slot: int, version: int) -> Context | None:
        """The current context if it is at least ``version`` (adopting what is newer)."""
        self._check_open()
        self._follow(slot)
        try:
            ctx = self.get(slot)
        except NotFoundError:
            return None
        return ctx if _version_of(ctx) >= version else None

    def _add_adoption_listener(self, listener: Callable[[int, int], None]) -> None:
        with self._lock:
            self._adoption_listeners.append(listener)

    def _remove_adoption_listener(self, listener: Callable[[int, int], None]) -> None:
        with self._lock:
            if listener in self._adoption_listeners:
                self._adoption_listeners.remove(listener)

    # -- subscriptions ---------------------------------------------------------------------

    def subscribe(
        self,
        slots: int | Iterable[int] | None = None,
        groups: str | Iterable[str] | None = None,
        callback: Callback | None = None,
        all: bool = False,
    ) -> Subscription:
        """Receive a :class:`VersionEvent` for each new current version of these slots.

        ``callback(event)`` runs on the reader's callback thread, never on the
        socket thread. The first events after subscribing (and after each
        reconnect) report versions this subscription has not seen yet.
        """
        return self._subscribe(slots, groups, all, callback, None)

    def _subscribe(
        self,
        slots: int | Iterable[int] | None,
        groups: str | Iterable[str] | None,
        all_slots: bool,
        callback: Callback | None,
        sink: EventSink | None,
    ) -> Subscription:
        wanted_slots = slot_set(slots)
        wanted_groups = group_set(groups)
        if not isinstance(all_slots, bool):
            raise InvalidInputError(f"all must be True or False, got {all_slots!r:.40}")
        if not (wanted_slots or wanted_groups or all_slots):
            raise InvalidInputError("subscribe needs slots, groups or all=True")
        if callback is not None and not callable(callback):
            raise InvalidInputError(f"callback must be callable, got {type(callback).__name__}")
        subscription = Subscription(
            self,
            slots=wanted_slots,
            groups=wanted_groups,
            all_slots=all_slots,
            callback=callback,
            sink=sink,
        )
        with self._lock:
            self._check_open()
            self._subscriptions.append(subscription)
            client = self._client
            if client is not None and client.connected:
                request_id = next(self._request_ids)
                self._requests[request_id] = subscription
                client.post(subscription.request(request_id))
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """End ``subscription`` (idempotent); the daemon stops sending what nobody wants."""
        with self._lock:
            if subscription not in self._subscriptions:
                return
            self._subscriptions.remove(subscription)
            subscription.active = False
            client = self._client
            if client is not None and client.connected:
                for message in self._unsubscribe_messages(subscription):
                    client.post(message)
        if subscription._sink is not None:
            subscription._sink.close()

    def _unsubscribe_messages(self, gone: Subscription) -> list[Message]:
        rest = self._subscriptions
        slots = gone.slots - self._followed - {s for sub in rest for s in sub.slots}
        groups = gone.groups - {g for sub in rest for g in sub.groups}
        messages: list[Message] = []
        if slots or groups:
            messages.append(Unsubscribe(slots=tuple(sorted(slots)), groups=tuple(sorted(groups))))
        if gone.all and not any(sub.all for sub in rest):
            # Whether the daemon drops only the "all" flag or everything, restating the
            # rest leaves it subscribed to exactly what is still wanted.
            messages.append(Unsubscribe(all=True))
            messages.extend(self._subscribe_messages())
        return messages

    def _subscribe_messages(self) -> list[Message]:
        messages: list[Message] = []
        if self._followed:
            request_id = next(self._request_ids)
            self._requests[request_id] = None
            messages.append(Subscribe(request_id=request_id, slots=tuple(sorted(self._followed))))
        for subscription in self._subscriptions:
            request_id = next(self._request_ids)
            self._requests[request_id] = subscription
            messages.append(subscription.request(request_id))
        return messages

    # -- the client thread's side (SessionHandler) -------------------------------------------

    def session_started(self, welcome: Welcome) -> list[Message]:
        with self._lock:
            if self._closed:
                return []
            self._attach_table()
            self._requests = {}
            self._daemon_pid = welcome.daemon_pid
            messages = self._subscribe_messages()
            messages.extend(Ack(slot=s, version=v) for s, v in sorted(self._adopted.items()))
            # reports posted while no daemon listened (the daemon ignores those it knows)
            if self._reports_welcome():
                messages.extend(
                    DamageReport(slot=s, version=v, detail=detail)
                    for (s, v), detail in self._damaged.items()
                )
        for slot, number in welcome.versions.items():
            if slot in self._followed and self._adopted.get(slot) != number:
                self._adopt_announced(slot, number)
        return messages

    def session_ended(self, reason: str) -> None:
        if "damage_report" in reason:  # "unknown frame type": a daemon older than reports
            log.warning("the ctxstore daemon does not take damage reports; not sending more")
            self._reports_refused_by = self._daemon_pid
        with self._lock:
            # The table may freeze now: the store is the truth until we are back.
            self._table_get = _no_table
            self._requests = {}
            self._adopted_cond.notify_all()

    def message_received(self, message: Message) -> None:
        match message:
            case Announce():
                self._on_announce(message)
            case Subscribed():
                self._on_subscribed(message)
            case Error(request_id=request_id):
                if request_id is not None:
                    self._requests.pop(request_id, None)  # a refused subscribe gets no answer
                log.warning("ctxstore daemon reported %s: %s", message.kind, message.message)
            case _:
                log.debug("reader ignores a %r message", message.TYPE)

    def heartbeat(self) -> Heartbeat:
        uss, pss = self._memory.sample()
        return Heartbeat(
            pid=os.getpid(), name=self._name, held=tuple(self.versions_held()), uss=uss, pss=pss
        )

    def _attach_table(self) -> None:
        """Use the daemon's version table, attaching it again if a new daemon recreated it."""
        table = self._table
        try:
            if table is None or not table.is_current():
                table = VersionTable.attach(segment_name(self._store_path))
        except (NotFoundError, IntegrityError, StorageError) as exc:
            log.debug("no version table for %s (%s): freshness comes from the store", self, exc)
            table = None
        if table is not None and table.closed:
            table = None
        self._table = table
        self._table_get = table.get if table is not None else _no_table

    def _on_announce(self, announce: Announce) -> None:
        self._announcements += 1
        if announce.slot in self._followed:
            self._adopt_announced(announce.slot, announce.version)
        self._deliver(announce.slot, announce.version, "announce", announce)

    def _on_subscribed(self, answer: Subscribed) -> None:
        subscription = self._requests.pop(answer.request_id, None)
        for slot, number in answer.versions.items():
            if slot in self._followed and self._adopted.get(slot) != number:
                self._adopt_announced(slot, number)
        if subscription is not None and subscription.active:
            subscription._covered.update(answer.versions)
            for slot, number in answer.versions.items():
                self._deliver_to(subscription, slot, number, "snapshot", None)

    def _adopt_announced(self, slot: int, version: int) -> None:
        """Map and adopt an announced version now, so the next get() is a hit."""
        if self._closed or (self._adopted.get(slot) == version and slot in self._current):
            return
        truth = self._table_get(slot)
        if truth is not None and truth != version:
            return  # something newer is current already; its announcement follows
        if (slot, version) in self._damaged:
            return
        try:
            ctx = self._load(slot, version)
        except IntegrityError as exc:
            self._damage_found(slot, version, exc)
            with contextlib.suppress(CtxStoreError):  # get() tries again, and says why
                self._serve_intact(slot, version)
            return
        except (NotFoundError, StorageError, ClosedError) as exc:
            log.warning("cannot map announced slot %d version %d: %s", slot, version, exc)
            return
        self._adopt(slot, ctx)

    def _deliver(self, slot: int, version: int, source: str, announce: Announce | None) -> None:
        groups: list[Collection[str]] = []

        def groups_of(s: int) -> Collection[str]:
            if not groups:
                try:
                    groups.append(frozenset(self._store.hierarchy.get_groups(s)))
                except (NotFoundError, StorageError, ClosedError):
                    groups.append(frozenset())
            return groups[0]

        for subscription in list(self._subscriptions):
            if subscription.matches(slot, groups_of):
                self._deliver_to(subscription, slot, version, source, announce)

    def _deliver_to(
        self,
        subscription: Subscription,
        slot: int,
        version: int,
        source: str,
        announce: Announce | None,
    ) -> None:
        previous = subscription._seen.get(slot)
        if previous == version:
            return
        subscription._seen[slot] = version
        event = VersionEvent(
            slot=slot,
            version=version,
            previous=previous,
            source=source,
            committed_at=announce.committed_at if announce else None,
            model_type=announce.model_type if announce else None,
            aliases=announce.aliases if announce else MappingProxyType({}),
        )
        if subscription.callback is not None:
            self._callbacks().submit(subscription.callback, event)
        if subscription._sink is not None:
            subscription._sink.push(event)

    def _callbacks(self) -> Dispatcher:
        dispatcher = self._dispatcher
        if dispatcher is None:
            with self._lock:
                if self._dispatcher is None:
                    self._dispatcher = Dispatcher(self._name)
                dispatcher = self._dispatcher
        return dispatcher

    # -- introspection ---------------------------------------------------------------------

    def versions_held(self) -> list[tuple[int, int]]:
        """Every (slot, version) in this reader's cache (current pointers included), sorted.

        The heartbeat reports this list; the daemon's retention keeps these versions.
        """
        with self._lock:
            self._prune()
            return sorted(self._keys)

    def stats(self) -> ReaderStats:
        client = self._client
        with self._lock:
            following = len(self._followed)
            subscriptions = len(self._subscriptions)
            table = self._table_get is not _no_table
        return ReaderStats(
            hits=self._hits,
            misses=self._misses,
            adoptions=self._adoptions,
            announcements=self._announcements,
            sessions=client.sessions if client else 0,
            reconnects=client.reconnects if client else 0,
            connected=bool(client and client.connected),
            version_table=table,
            following=following,
            subscriptions=subscriptions,
            last_error=client.last_error if client else None,
            cache=self._cache.stats(),
            hashed=self._store.versions_hashed,
            trusted=self._store.versions_trusted,
            damaged=len(self._damaged),
        )

    @property
    def connected(self) -> bool:
        """Whether a daemon session is up right now."""
        client = self._client
        return bool(client and client.connected)

    @property
    def store(self) -> PersistentStore:
        """The read-only store (for listings, metadata, aliases)."""
        self._check_open()
        return self._store

    @property
    def name(self) -> str:
        return self._name

    @property
    def store_path(self) -> Path:
        return self._store_path

    @property
    def socket_path(self) -> Path:
        return self._socket_path

    # -- lifecycle -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"reader {self._name} is closed")
        if self._pid != _pid:
            self._reopen_after_fork()

    def _reopen_after_fork(self) -> None:
        """In a forked child: our own store, table, cache and socket; the parent keeps its own."""
        with _fork_lock:
            if self._pid == _pid:
                return
            if self._client is not None:
                self._client.abandon()
            self._store.close()  # only marks it closed: its connections belong to the parent
            if not self._name_given:
                self._name = _default_name()
            log.debug("reader %s reopening after fork", self._name)
            self._open()

    def close(self) -> None:
        """Say goodbye to the daemon, stop the threads, drop the cache (idempotent)."""
        if self._pid != _pid:  # a child that never used the reader: leave the parent's alone
            self._closed = True
            if self._client is not None:
                self._client.abandon()
            self._store.close()
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._table_get = _no_table
            self._current.clear()
            self._adopted_cond.notify_all()
            subscriptions, self._subscriptions = self._subscriptions, []
        if self._client is not None:
            self._client.close(CLOSE_TIMEOUT)
        for subscription in subscriptions:
            subscription.active = False
            if subscription._sink is not None:
                subscription._sink.close()
        if self._dispatcher is not None:
            self._dispatcher.close(CLOSE_TIMEOUT)
        self._cache.clear()
        self._store.close()
        if self._table is not None:
            self._table.close()

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
        state = "closed" if self._closed else ("connected" if self.connected else "offline")
        return f"<Reader {self._name} {self._store_path} {state}>"


def _report_detail(exc: IntegrityError) -> str:
    """What a damage report says: the error's text, printable, within the frame's limit."""
    text = "".join(c if c.isprintable() else "?" for c in str(exc)[:MAX_REPORT_CHARS])
    return text.encode("utf-8", "replace")[:MAX_REASON_BYTES].decode("utf-8", "ignore")


def _version_of(ctx: Context) -> int:
    version = ctx.version
    if version is None:  # pragma: no cover - the store always binds its contexts
        raise IntegrityError("the store returned a context without a version")
    return version


def _deadline(timeout: float | None) -> float:
    if timeout is None:
        return math.inf
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or math.isnan(timeout):
        raise InvalidInputError(f"timeout must be None or a number of seconds, got {timeout!r:.40}")
    return time.monotonic() + max(0.0, timeout)
