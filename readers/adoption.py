"""Adoption rules: which version a Reader serves, how it maps one, and what it holds.

The reader keeps, per slot, a *current pointer* to the context it serves and
*adopts* a version when that pointer moves there (a ``get()`` that finds a newer
version, or an announcement of a followed slot), acknowledging it to the
daemon. The pointer never moves back on the version table's word alone (the
table lags the store and freezes when its daemon dies): only the store's word
moves it back (a rollback). Loads are single-flight: one thread maps (and
checks) a version however many ask. A damaged version is never served: the
newest intact older one is. Every cached key is a version *held* (heartbeats
report them, retention keeps them), so a superseded current version leaves
the cache at once; explicitly requested ones stay until the LRU evicts them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Final

from ctxstore.cache import ContextCache
from ctxstore.context import Context
from ctxstore.errors import ClosedError, CtxStoreError, IntegrityError, NotFoundError, StorageError
from ctxstore.store import StoreView
from ctxstore.validation import check_version
from ctxstore.wire import Ack, DamageReport, Message, VersionRecord

from .damage import DamageLog

log = logging.getLogger("ctxstore.readers")

#: get() maps the current version again at most this often when each one is superseded
#: while it is being mapped; the last is adopted regardless (it was current when chosen)
ADOPT_TRIES: Final = 4


class _Gate:
    """A one-shot event on a bare lock, held until :meth:`set`: a load makes one, and
    ``threading.Event`` costs a Condition and Python-level notifying on every load."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        """Open the gate (once)."""
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the gate is open (at most ``timeout`` seconds); True if it is."""
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        self._lock.release()
        return True


class _PendingLoad:
    """A version one thread is mapping; others asking for it wait on ``done``."""

    __slots__ = ("ctx", "done")

    def __init__(self) -> None:
        self.done = _Gate()
        self.ctx: Context | None = None  # None once done: the mapping failed


class Adoption:
    """The current pointers, the held versions and the rules that move them (one process)."""

    def __init__(
        self,
        store: StoreView,
        cache: ContextCache,
        lock: threading.RLock,
        *,
        verify: bool,
        table_get: Callable[[int], int | None],
        vouched: Callable[[], bool],
        follow: Callable[[int], None],
        post: Callable[[Message], bool],
    ) -> None:
        """``table_get(slot)``: the version table's word (None: ask the store);
        ``vouched()``: whether a daemon runs whose verified records spare a hash;
        ``follow(slot)``: subscribe to a slot now served; ``post(message)``: send it to the
        daemon, False when there is no connection to send it on."""
        self._store = store
        self._cache = cache
        self._lock = lock
        self.adopted_cond = threading.Condition(lock)
        #: threads waiting on ``adopted_cond`` for an adoption (under the lock): an adoption
        #: with none notifies nobody (Condition.notify_all is Python work on every adoption)
        self.waiters = 0
        self._verify = verify
        self._table_get = table_get
        self._vouched = vouched
        self._follow = follow
        self._post = post
        #: slot -> (version, context) served now; its ``get`` is the reader's hot path
        self.current: dict[int, tuple[int, Context]] = {}
        self.adopted: dict[int, int] = {}
        self._keys: set[tuple[int, int]] = set()  # every key inserted in the cache, pruned lazily
        #: versions being mapped now, by the thread that maps them for every thread asking
        self.loading: dict[tuple[int, int], _PendingLoad] = {}
        self._explicit: set[tuple[int, int]] = set()
        self._listeners: list[Callable[[int, int], None]] = []
        self.damage = DamageLog()
        self.hits = self.misses = self.adoptions = 0
        #: announced records the reader refused (it read the store instead)
        self.records_refused = 0
        self.closed = False

    # -- what get() serves -----------------------------------------------------------------

    def current_context(self, slot: int) -> Context:
        """The current context of ``slot`` (adopting what is newer), followed from now on."""
        for attempt in range(ADOPT_TRIES):
            floor = self.adopted.get(slot)
            number = self._table_get(slot)
            if number is None or (floor is not None and number < floor):
                # No table, or one behind what this reader already adopted: a table lags
                # the store from each commit until its publication, and freezes when its
                # daemon dies. The store decides, and only the store moves a reader back.
                number = self._store.current_version(slot)
                if number is None:
                    raise NotFoundError(f"slot {slot} has no versions")
            entry = self.current.get(slot)
            if entry is not None and entry[0] == number:
                self.hits += 1
                return entry[1]
            if (slot, number) in self.damage:
                return self.serve_intact(slot, number)
            try:
                try:
                    ctx = self.load(slot, number)
                except NotFoundError:
                    # The table named a version the store no longer has (retired, or a stale
                    # table): serve what the store calls current rather than fail.
                    current = self._store.current_version(slot)
                    if current is None or current == number:
                        raise
                    number = current
                    ctx = self.load(slot, current)
            except IntegrityError as exc:
                self.damage_found(slot, number, exc)
                return self.serve_intact(slot, number)
            if self.adopt(slot, ctx, trusted=attempt == ADOPT_TRIES - 1):
                break
            # superseded while we mapped it: take what is current now
        else:  # another thread adopted a version meanwhile: serve its choice
            entry = self.current.get(slot)
            if entry is not None:
                ctx = entry[1]
        self._follow(slot)
        return ctx

    def version(self, slot: int, version: int | str) -> Context:
        """An explicitly asked version (number or alias): held until the LRU evicts it."""
        if isinstance(version, str):
            number = self._store.resolve(slot, version)
        else:
            number = check_version(version)
        entry = self.current.get(slot)
        if entry is not None and entry[0] == number:
            self.hits += 1
            return entry[1]
        try:
            ctx = self.load(slot, number)
        except IntegrityError as exc:  # that version was asked for: no other will do
            self.damage_found(slot, number, exc)
            raise
        with self._lock:
            if (slot, number) in self._cache:
                self._explicit.add((slot, number))
        return ctx

    def adopt_announced(self, slot: int, version: int, record: VersionRecord | None = None) -> None:
        """Map and adopt an announced version now, so the next get() is a hit.

        ``record``: the announcement's version record, which spares the read of the
        index when it can (:meth:`StoreView.load_announced`)."""
        if self.closed or (self.adopted.get(slot) == version and slot in self.current):
            return
        truth = self._table_get(slot)
        if truth is not None and truth != version:
            return  # something newer is current already; its announcement follows
        if (slot, version) in self.damage:
            return
        try:
            ctx = self.load(slot, version, record)
        except IntegrityError as exc:
            self.damage_found(slot, version, exc)
            with contextlib.suppress(CtxStoreError):  # get() tries again, and says why
                self.serve_intact(slot, version)
            return
        except (NotFoundError, StorageError, ClosedError) as exc:
            log.warning("cannot map announced slot %d version %d: %s", slot, version, exc)
            return
        self.adopt(slot, ctx)

    # -- mapping ---------------------------------------------------------------------------

    def load(self, slot: int, version: int, record: VersionRecord | None = None) -> Context:
        """``version`` of ``slot`` from the cache, else mapped (and checked) once.

        One mapping per version however many threads ask at once: a commit reaches
        the version table before its announcement, so a thread in ``wait_for``
        or ``get`` and the socket thread adopting the announcement ask for the
        same new version together. The later ones wait for the first one's mapping
        instead of mapping and checking every file again; if it fails they try
        themselves (its error belongs to its caller). ``record``: an announcement's.
        """
        key = (slot, version)
        ctx = self._cache.get_cached_context(key)
        if ctx is not None:
            self.hits += 1
            return ctx
        with self._lock:
            pending = self.loading.get(key)
            mine = pending is None
            if pending is None:
                pending = self.loading[key] = _PendingLoad()
        if not mine:
            pending.done.wait()
            if pending.ctx is not None:
                self.hits += 1
                return pending.ctx
            return self._map_version(key)
        try:
            pending.ctx = self._map_version(key, record)
        finally:
            with self._lock:
                self.loading.pop(key, None)
            pending.done.set()
        return pending.ctx

    def _map_version(self, key: tuple[int, int], record: VersionRecord | None = None) -> Context:
        trust = self._verify and self._vouched()
        ctx = None if record is None else self._map_announced(key, record, trust)
        if ctx is None:
            ctx = self._store.load_context(*key, verify=self._verify, trust_verified=trust)
        self.misses += 1
        self._insert(key, ctx)
        return ctx

    def _map_announced(
        self, key: tuple[int, int], record: VersionRecord, trust: bool
    ) -> Context | None:
        """``key`` mapped from its announcement's record, or None: the index decides (a
        record that cannot spare it, or one refused: logged, and the reader carries on)."""
        try:
            return self._store.load_announced(
                *key, record, verify=self._verify, trust_verified=trust
            )
        except Exception as exc:  # untrusted input: whatever it raises, the store decides
            self.records_refused += 1
            log.warning(
                "slot %d version %d: the daemon's announced record is not used (%s); "
                "reading the store instead",
                *key,
                exc,
            )
            return None

    # -- damage ----------------------------------------------------------------------------

    def damage_found(self, slot: int, version: int, exc: IntegrityError) -> None:
        """Remember ``version`` as damaged, log it once and report it to the daemon."""
        with self._lock:
            if self.closed:
                return
            detail = self.damage.record(slot, version, exc)
            if detail is None:
                return
            report = self.damage.reports_welcome()
        sent = report and self._post(DamageReport(slot=slot, version=version, detail=detail))
        log.error(
            "slot %d version %d is damaged (%s)%s; this reader serves the newest intact "
            "version instead",
            slot,
            version,
            detail,
            ": reported to the daemon" if sent else "",
        )

    def serve_intact(self, slot: int, damaged: int) -> Context:
        """The newest intact version of ``slot`` older than ``damaged``: the one this reader
        holds, or a newer one it can map (adopted, so the daemon hears where we are).

        IntegrityError when there is none: no damaged array is ever returned.
        """
        instead = self.damage.instead
        entry = self.current.get(slot)
        if entry is not None and instead.get(slot) == (damaged, entry[0]):
            self.hits += 1
            return entry[1]  # chosen before, and still served
        held = None
        if entry is not None and entry[0] < damaged and (slot, entry[0]) not in self.damage:
            held = entry[0]
        for info in reversed(self._store.list_versions(slot)):
            number = info.version
            if number >= damaged or (slot, number) in self.damage:
                continue
            if held is not None and number <= held:
                break
            try:
                ctx = self.load(slot, number)
            except IntegrityError as exc:
                self.damage_found(slot, number, exc)
                continue
            except NotFoundError:  # retired meanwhile
                continue
            self.adopt(slot, ctx, trusted=True)
            entry = self.current.get(slot)
            if entry is not None and entry[0] == number:
                instead[slot] = (damaged, number)
            self._follow(slot)
            return ctx
        if entry is not None and held is not None:
            instead[slot] = (damaged, held)
            self.hits += 1
            return entry[1]
        raise IntegrityError(
            f"slot {slot} version {damaged} is damaged and this reader has no intact older "
            f"version to serve: {self.damage.detail((slot, damaged)) or 'see the daemon log'}"
        )

    # -- what is held ----------------------------------------------------------------------

    def held(self) -> list[tuple[int, int]]:
        """Every (slot, version) in the cache (current pointers included), sorted."""
        with self._lock:
            self._prune()
            return sorted(self._keys)

    def _insert(self, key: tuple[int, int], ctx: Context) -> None:
        """Cache ``ctx``; current contexts are refreshed first, so older explicit ones go first."""
        with self._lock:
            if self.closed:
                return
            for slot, (number, _ctx) in self.current.items():
                if (slot, number) != key:
                    self._cache.get_cached_context((slot, number))
            self._cache.cache_context(key, ctx)
            self._keys.add(key)
            if len(self._cache) < len(self._keys):  # only this class inserts into the cache
                self._prune()

    def _prune(self) -> None:
        """Forget keys the LRU evicted; a current pointer never outlives its cache entry."""
        cache = self._cache
        self._keys = {key for key in self._keys if key in cache}
        self._explicit &= self._keys
        for slot, (number, _ctx) in list(self.current.items()):
            if (slot, number) not in self._keys:
                del self.current[slot]

    # -- adoption --------------------------------------------------------------------------

    def adopt(self, slot: int, ctx: Context, *, trusted: bool = False) -> bool:
        """Move ``slot``'s current pointer to ``ctx`` if its version is current; True if it is.

        A version is current when the table names it and it is not older than what
        this reader adopted before, or else when the store names it (the table lags
        the store and freezes with a dead daemon, so an older version is adopted only
        on the store's word: a rollback). ``trusted``: the caller chose the version
        from the table or store a moment ago; adopt it unless another adoption came
        first. Acknowledges each newly adopted version to the daemon.
        """
        number = version_of(ctx)
        floor = self.adopted.get(slot)
        current = trusted or self._is_current(slot, number, floor)
        with self._lock:
            if self.closed:
                return False
            if not current or self.adopted.get(slot) != floor:
                # superseded while we mapped it, a late announcement, or another thread
                # adopted meanwhile: never move back on a stale word. Nor keep it cached:
                # a held version is one retention may not reclaim.
                key = (slot, number)
                pointer = self.current.get(slot)
                if key not in self._explicit and (pointer is None or pointer[0] != number):
                    self._cache.pop(key)
                    self._keys.discard(key)
                return self.adopted.get(slot) == number
            old = self.current.get(slot)
            if (slot, number) in self._cache:
                self.current[slot] = (number, ctx)
            else:
                self.current.pop(slot, None)  # too large to cache: mapped again on each get()
            if floor == number:
                return True
            self.adopted[slot] = number
            self.adoptions += 1
            if old is not None and old[0] != number and (slot, old[0]) not in self._explicit:
                self._cache.pop((slot, old[0]))
                self._keys.discard((slot, old[0]))
            if self.waiters:
                self.adopted_cond.notify_all()
            listeners = list(self._listeners) if self._listeners else None
        self._post(Ack(slot=slot, version=number))
        if listeners:
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

    def acks(self) -> list[Ack]:
        """An ack of every adopted version (restated to a new session)."""
        with self._lock:
            return [Ack(slot=s, version=v) for s, v in sorted(self.adopted.items())]

    def add_listener(self, listener: Callable[[int, int], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[int, int], None]) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def close(self) -> None:
        """Stop adopting, drop every pointer and wake the waiters (under the reader's lock)."""
        with self._lock:
            self.closed = True
            self.current.clear()
            self.adopted_cond.notify_all()


def version_of(ctx: Context) -> int:
    version = ctx.version
    if version is None:  # pragma: no cover - the store always binds its contexts
        raise IntegrityError("the store returned a context without a version")
    return version
