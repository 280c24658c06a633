"""Reader: zero-copy contexts inside inference workers, kept current by the daemon.

A Reader opens the store read-only, maps contexts with
:meth:`PersistentStore.load_context` (read-only arrays over mmapped files, the
page cache shared with every other reader), and learns of new versions two
ways: the daemon's shared-memory version table, checked on every :meth:`get`
in well under a microsecond, and announcements on the daemon's socket, read by
a background thread (:mod:`ctxstore.readers.connection`).

The hot path (``get(slot)``, context cached and still current) is a dict
lookup and one seqlocked read of shared memory: no lock shared with other
processes, no socket round trip, no SQL, no syscall. Everything else (a miss,
an explicit version, an alias) goes through the store.

Versions and adoption: the reader keeps, per slot, a *current pointer* to the
context it serves and moves it (adopts a version) on a ``get()`` that finds a
newer version, or when the daemon announces one of a slot it serves; each
adoption is acked, heartbeats report every version held (rules in
:mod:`ctxstore.readers.adoption`). Each version is checked once in this
process when first mapped; a damaged one is never served
(:mod:`ctxstore.readers.damage`, docs/reliability.md).

Daemon down: reads go on from the store, freshness from SQL (the table may be
frozen or stale); the client reconnects with backoff, re-attaches the table if
a new daemon recreated it, resubscribes and resynchronises from the daemon's
snapshot.

Where the parts live: this module is the facade (and the hot path); the
adoption rules, single-flight loads and held versions are in
:mod:`ctxstore.readers.adoption` (damaged versions in
:mod:`ctxstore.readers.damage`), what the reader does with each message from
the daemon in :mod:`ctxstore.readers.handler`, the subscriptions and followed
slots in :mod:`ctxstore.readers.book`.

Fork: a child notices (a pid stamp compared on every ``get()``, kept current
by an at-fork hook, so no syscall) and reopens its own store, table, cache and
socket; the parent's subscriptions stay with the parent.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from ctxstore.cache import CacheStats, ContextCache
from ctxstore.context import Context
from ctxstore.errors import (
    ClosedError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    StorageError,
    WaitTimeoutError,
)
from ctxstore.locations import default_socket_path, default_store_dir
from ctxstore.records import FileInfo
from ctxstore.store import StoreView, layout
from ctxstore.store.lock import writer_may_be_running
from ctxstore.validation import check_label, check_slot, check_version
from ctxstore.versiontable import VersionTable, segment_name
from ctxstore.wire import Heartbeat, Message, Welcome

from .adoption import Adoption, version_of
from .book import SubscriptionBook
from .connection import Backoff, ReaderConnection
from .handler import ReaderSessionHandler
from .subscriptions import Callback, EventSink, Subscription, checked_subscription

log = logging.getLogger("ctxstore.readers")

POLL_INTERVAL: Final = 0.05  # wait_for re-checks the table/store this often between wake-ups
CLOSE_TIMEOUT: Final = 2.0

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
        self._cache = ContextCache(self._cache_items, self._cache_bytes)
        self._hits = 0
        self._table_get: Callable[[int], int | None] = _no_table
        self._table: VersionTable | None = None
        self._store = StoreView(self._store_path)
        self._client: ReaderConnection | None = None
        self._book = SubscriptionBook(
            self._lock, self._name, outbox=lambda: self._client, groups_of=self._groups_of
        )
        self._adoption = Adoption(
            self._store,
            self._cache,
            self._lock,
            verify=self._verify,
            table_get=self._table_version,
            vouched=self._vouched,
            follow=self._follow,
            post=self._post,
        )
        self._adopted_cond = self._adoption.adopted_cond
        self._current_get = self._adoption.current.get  # the hot path's own reference
        self._loading = self._adoption.loading
        self._handler = ReaderSessionHandler(
            self._name,
            self._adoption,
            self._book,
            attach_table=self._attach_table,
            detach_table=self._detach_table,
            heartbeat_interval=self._heartbeat_interval,
            send_now=self._send_now,
        )
        if self._connect:
            self._client = ReaderConnection(
                self._socket_path,
                name=self._name,
                handler=self,  # its own methods: the documented entry points
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
        self._check_open()
        slot = check_slot(slot)
        if version is None:
            return self._adoption.current_context(slot)
        return self._adoption.version(slot, version)

    def peek(self, slot: int) -> Context | None:
        """The current context of ``slot`` if it is in memory and still current, else None.

        The hot path of :meth:`get` alone: no I/O, no lock, never blocks (what
        :class:`~ctxstore.readers.AsyncReader` answers on the event loop).
        """
        if type(slot) is int and self._pid == _pid and not self._closed:
            entry = self._current_get(slot)
            if entry is not None and entry[0] == self._table_get(slot):
                self._hits += 1
                return entry[1]
        return None

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

    def _adopt(self, slot: int, ctx: Context, *, trusted: bool = False) -> bool:
        """Move ``slot``'s current pointer to ``ctx`` if it is current (:meth:`Adoption.adopt`)."""
        return self._adoption.adopt(slot, ctx, trusted=trusted)

    def _vouched(self) -> bool:
        """Whether a daemon runs now, so its verified records may spare us a hash.

        Our session is up, or the store's writer lock names a live process. With
        no daemon (a store read cold, a daemon that died), every version is hashed.
        """
        return self.connected or writer_may_be_running(layout.lock_path(self._store.root))

    def _follow(self, slot: int) -> None:
        """Subscribe to ``slot`` for our own use: its announcements are adopted at once."""
        if self._follow_enabled:
            self._book.follow(slot)

    def _send_now(self) -> None:
        """On the socket thread: write what was posted (an ack) before going on."""
        client = self._client
        if client is not None:
            client.send_now()

    def _post(self, message: Message) -> bool:
        """Send ``message`` to the daemon; False when this reader has no connection."""
        client = self._client
        if client is None:
            return False
        client.post(message)
        return True

    def _groups_of(self, slot: int) -> Collection[str]:
        try:
            return self._store.hierarchy.get_groups(slot)
        except (NotFoundError, StorageError, ClosedError):
            return ()

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
        until = deadline(timeout)
        while True:
            ctx = self.reached(slot, version)
            if ctx is not None:
                return ctx
            remaining = until - time.monotonic()
            if remaining <= 0:
                raise WaitTimeoutError(
                    f"slot {slot} did not reach version {version} within {timeout} s "
                    f"(this reader is at {self._adoption.adopted.get(slot)})"
                )
            with self._adopted_cond:
                adoption = self._adoption
                if adoption.adopted.get(slot, 0) < version and not self._closed:
                    adoption.waiters += 1
                    try:
                        self._adopted_cond.wait(min(remaining, POLL_INTERVAL))
                    finally:
                        adoption.waiters -= 1

    def reached(self, slot: int, version: int) -> Context | None:
        """The current context of ``slot`` if it is at least ``version``, else None.

        One check of :meth:`wait_for`, without the waiting: adopts what is newer
        (it may map files) and follows ``slot`` from now on.
        """
        self._check_open()
        self._follow(slot)
        try:
            ctx = self.get(slot)
        except NotFoundError:
            return None
        return ctx if version_of(ctx) >= version else None

    def add_adoption_listener(self, listener: Callable[[int, int], None]) -> None:
        """Call ``listener(slot, version)`` after each adoption, on the adopting thread.

        It must return quickly and not block (it runs on the socket thread for
        announced versions); an exception it raises is logged and ignored.
        """
        self._adoption.add_listener(listener)

    def remove_adoption_listener(self, listener: Callable[[int, int], None]) -> None:
        """Stop calling ``listener`` (idempotent)."""
        self._adoption.remove_listener(listener)

    # -- subscriptions ---------------------------------------------------------------------

    def subscribe(
        self,
        slots: int | Iterable[int] | None = None,
        groups: str | Iterable[str] | None = None,
        callback: Callback | None = None,
        all: bool = False,
        *,
        sink: EventSink | None = None,
    ) -> Subscription:
        """Receive a :class:`VersionEvent` for each new current version of these slots.

        ``callback(event)`` runs on the reader's callback thread, never on the
        socket thread. The first events after subscribing (and after each
        reconnect) report versions this subscription has not seen yet.
        ``sink``: also hand each event to ``sink.push`` on the socket thread
        (it must not block; ``sink.close()`` is called when the subscription
        ends), as the asyncio streams do.
        """
        subscription = checked_subscription(self, slots, groups, all, callback=callback, sink=sink)
        with self._lock:
            self._check_open()
            self._book.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """End ``subscription`` (idempotent); the daemon stops sending what nobody wants."""
        self._book.remove(subscription)

    # -- the connection's side (SessionHandler, implemented by readers/handler.py) ---------

    def session_started(self, welcome: Welcome) -> list[Message]:
        """A daemon session began: what to tell the daemon (:class:`ReaderSessionHandler`)."""
        return self._handler.session_started(welcome)

    def session_ended(self, reason: str) -> None:
        """The daemon session ended for ``reason``."""
        self._handler.session_ended(reason)

    def message_received(self, message: Message) -> None:
        """A message from the daemon (an announcement, an answer, an error)."""
        self._handler.message_received(message)

    def heartbeat(self) -> Heartbeat:
        """This process's heartbeat: every version held, and its memory."""
        return self._handler.heartbeat()

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

    def _detach_table(self) -> None:
        self._table_get = _no_table

    def _table_version(self, slot: int) -> int | None:
        """The table's word on ``slot`` (looked up anew: the table attaches and detaches)."""
        return self._table_get(slot)

    # -- introspection ---------------------------------------------------------------------

    def versions_held(self) -> list[tuple[int, int]]:
        """Every (slot, version) in this reader's cache (current pointers included), sorted.

        The heartbeat reports this list; the daemon's retention keeps these versions.
        """
        return self._adoption.held()

    def stats(self) -> ReaderStats:
        client = self._client
        adoption = self._adoption
        following, subscriptions = self._book.counts()
        return ReaderStats(
            hits=self._hits + adoption.hits,
            misses=adoption.misses,
            adoptions=adoption.adoptions,
            announcements=self._handler.announcements,
            sessions=client.sessions if client else 0,
            reconnects=client.reconnects if client else 0,
            connected=bool(client and client.connected),
            version_table=self._table_get is not _no_table,
            following=following,
            subscriptions=subscriptions,
            last_error=client.last_error if client else None,
            cache=self._cache.stats(),
            hashed=self._store.versions_hashed,
            trusted=self._store.versions_trusted,
            damaged=len(adoption.damage),
        )

    @property
    def connected(self) -> bool:
        """Whether a daemon session is up right now."""
        client = self._client
        return bool(client and client.connected)

    @property
    def store(self) -> StoreView:
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
            self._adoption.close()
        if self._client is not None:
            self._client.close(CLOSE_TIMEOUT)
        self._book.close()
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


def deadline(timeout: float | None) -> float:
    """The monotonic time ``timeout`` seconds from now (None: never), the timeout checked."""
    if timeout is None:
        return math.inf
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or math.isnan(timeout):
        raise InvalidInputError(f"timeout must be None or a number of seconds, got {timeout!r:.40}")
    return time.monotonic() + max(0.0, timeout)
