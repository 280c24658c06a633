"""The commit path of the daemon: one commit at a time, off the event loop, then announce.

Publish requests from the socket (a file path, a build by node type, tensors
in a shared-memory segment) and from the API all end here. The order is the
point: the store commits (its COMMIT is the commit point), the version table
is bumped, and only then are subscribers told. Both happen right after the
COMMIT, from the commit's own thread (the announcement on the event loop's
next turn); the store's chores (warming, retention) and the post-commit hooks
come after them, so none of those delays a reader seeing the version. Inputs named by a peer are
read only if that peer owns them: the daemon never reads on a client's
behalf what the client could not read itself. Files are read only from
under the import roots, when they are set.

A shared-memory segment is copied into the daemon's own memory with reads
that cannot fault (:mod:`.segments`), inside the commit lock so that one
publish's copy is held at a time, and the commit works from that copy: what
the hooks vet is what the store hashes and writes. A publish with a key is
committed at most once (:mod:`.idempotency`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ctxstore.context import Context
from ctxstore.errors import CtxStoreError, IntegrityError, InvalidInputError
from ctxstore.nodes import FileNode, ImportLimits, create_node, open_import
from ctxstore.nodes.files import OpenedFile
from ctxstore.records import Problem
from ctxstore.sources import Imported, follow_progress
from ctxstore.store import PersistentStore, Repair
from ctxstore.versiontable import VersionTableWriter
from ctxstore.wire import (
    MAX_RECORD_TENSORS,
    Announce,
    PublishBuild,
    PublishFile,
    PublishShm,
    VersionRecord,
)

from .idempotency import PublishKeys
from .import_roots import check_opened_file
from .segments import open_segment, read_tensors

log = logging.getLogger("ctxstore.daemon")

PublishRequest = PublishFile | PublishBuild | PublishShm
#: the default of ``max_publish_bytes`` when a Committer is built without one
UNLIMITED = 2**63 - 1
#: the longest the commit thread waits for the loop to announce a new version before it
#: goes on with its chores (seconds; the loop takes well under a millisecond, and it
#: awaits this very commit, so only a loop that stopped would make it wait this long)
HANDOFF_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class Requester:
    """Who asked: the peer's uid decides which files and segments the daemon will read.

    ``import_roots``: the directories files may be imported from (empty: anywhere);
    ``limits``: what one import may bring (the ``imports.*`` settings).
    """

    uid: int
    import_roots: tuple[Path, ...] = ()
    limits: ImportLimits = field(default_factory=ImportLimits)

    def may_read(self, owner_uid: int) -> bool:
        return self.uid in (0, os.getuid(), owner_uid)

    def check_file(self, opened: OpenedFile, where: str) -> None:
        """Refuse a file the requester does not own, or outside the roots (a FileCheck)."""
        owner = opened.status.st_uid
        if not self.may_read(owner):
            raise InvalidInputError(
                f"{where} belongs to uid {owner}, not to the requesting uid {self.uid}"
            )
        check_opened_file(self.import_roots, opened, where)


@dataclass(slots=True)
class PublishProgress:
    """What one publish in flight is doing, for its Progress frames.

    Written by the commit's worker thread (plain attribute stores), read by the loop.
    """

    stage: str = "waiting"
    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)


Announcer = Callable[[Announce], None]
#: (slot, version, bound context, model type) -> aliases the stage moved
PostCommit = Callable[[int, int, Context, str | None], Awaitable[Mapping[str, int]]]
#: called in the commit thread after each commit: (slot, version, seconds the store took)
CommitObserver = Callable[[int, int, float], None]


class Committer:
    """Serialises commits and pointer moves, and announces each one after it is durable."""

    def __init__(
        self,
        store: PersistentStore,
        table: VersionTableWriter | None,
        announce: Announcer,
        clock: Callable[[], float] = time.time,
        *,
        max_publish_bytes: int = UNLIMITED,
        remembered_keys: int = 10_000,
        verify_after_commit: bool = True,
        reread_after_commit: bool = False,
        announce_record_bytes: int = 64 << 10,
        post_commit: PostCommit | None = None,
        on_commit: CommitObserver | None = None,
    ) -> None:
        self.store = store
        self.table = table
        self._announce = announce
        self._clock = clock
        self._lock = asyncio.Lock()
        self._seq = 0
        self.commits = 0
        #: (slot, version) of the newest commit since start, for status lines
        self.last_commit: tuple[int, int] | None = None
        #: metrics hook; its failures are logged and never fail a commit
        self.on_commit = on_commit
        #: post-commit stage (hooks), run after the announcement, one commit at a time,
        #: outside the commit lock so a slow hook never delays the next commit
        self.post_commit = post_commit
        self._post_lock = asyncio.Lock()
        self._post_tasks: set[asyncio.Task[None]] = set()
        #: the most bytes one publish_shm may hand over (the daemon copies them)
        self.max_publish_bytes = max_publish_bytes
        self.keys = PublishKeys(remembered_keys)
        #: names of the segments publishes are reading now (never reclaimed)
        self.segments_in_use: set[str] = set()
        #: hash each new version before announcing it and record the outcome, so readers
        #: adopting it need not hash it (settings: verify_after_commit)
        self.verify_after_commit = verify_after_commit
        #: read each new version back and hash it before recording it verified, instead of
        #: taking the checksums the commit computed as it wrote (settings: reread_after_commit)
        self.reread_after_commit = reread_after_commit
        #: the most bytes of a new version's record (config and metadata texts, 64 a tensor)
        #: its announcement carries; 0: none (settings: announce_record_bytes)
        self.announce_record_bytes = announce_record_bytes
        #: versions hashed after their commit, by outcome ("verified", "damaged")
        self.checked_after_commit = {"verified": 0, "damaged": 0}

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def drain(self) -> None:
        """Wait for the commit in flight and its post-commit stage, if any (shutdown)."""
        async with self._lock:
            pass
        if self._post_tasks:
            await asyncio.gather(*self._post_tasks, return_exceptions=True)

    async def commit(
        self,
        slot: int,
        context: Context | Callable[[], Context] | Imported,
        *,
        model_type: str | None = None,
        alias: str | None = None,
        key: str | None = None,
        progress: PublishProgress | None = None,
        as_version: int | None = None,
    ) -> int:
        """Commit ``context`` (or what a loader returns, called in the commit's worker
        thread under the commit lock) as the next version of ``slot``, then announce it.

        An :class:`~ctxstore.sources.Imported` (an importer's checked files) is
        streamed into the store during the commit, a chunk at a time, and closed.
        ``key``: the publish key the index records with the version. ``as_version``:
        commit as exactly that number (a follower copying its origin, ctxstore.origin).
        """
        aliases = (alias,) if alias else ()
        progress = progress or PublishProgress()
        loop = asyncio.get_running_loop()
        async with self._lock:
            try:
                version, committed, problems, served, published = await asyncio.to_thread(
                    self._load_and_save, slot, context, model_type, aliases, key=key,
                    progress=progress, loop=loop, number=as_version,
                )  # fmt: skip
            finally:
                if isinstance(context, Imported):
                    context.close()
            self.commits += 1
            self.last_commit = (slot, version)
            if problems:  # committed, but not as written: current only if nothing else is
                self._publish_pointer(slot, version if served is None else served, None, {})
                raise IntegrityError(
                    f"slot {slot} version {version} was committed but its files do not "
                    f"match what was written ({problems[0]}); it is recorded damaged"
                    + (f" and slot {slot} serves version {served}" if served else "")
                )
            if not published:
                self._publish_pointer(slot, version, model_type, dict.fromkeys(aliases, version))
        if self.post_commit is not None:
            task = asyncio.ensure_future(
                self._after_commit(self.post_commit, slot, version, committed, model_type)
            )
            self._post_tasks.add(task)
            task.add_done_callback(self._post_tasks.discard)
        return version

    async def _after_commit(
        self, stage: PostCommit, slot: int, version: int, context: Context, model_type: str | None
    ) -> None:
        async with self._post_lock:
            try:
                moved = await stage(slot, version, context.bind(slot, version), model_type)
            except Exception:
                log.exception("post-commit stage failed for slot %d version %d", slot, version)
                return
        if moved:
            self.announce_aliases(slot, dict(moved))

    def _load_and_save(
        self,
        slot: int,
        source: Context | Callable[[], Context] | Imported,
        model_type: str | None,
        aliases: tuple[str, ...],
        *,
        key: str | None,
        progress: PublishProgress,
        loop: asyncio.AbstractEventLoop | None = None,
        number: int | None = None,
    ) -> tuple[int, Context, list[Problem], int | None, bool]:
        """In the commit's worker thread: read the source if it is a loader, commit, then
        (when enabled) the one hash of the new version. Returns the version, the context
        committed, what that hash found wrong, the version served instead if any, and
        whether the version is published already.

        Right after the COMMIT, still in this thread and before the store's chores
        (warming, retention), an intact version is recorded verified, written to
        the version table and handed to ``loop`` to announce: readers see it
        without waiting for the chores or for this thread's result to reach the
        loop. An import is streamed into the store, and committed is the version
        as stored (mapped, not read into memory)."""
        checked: list[tuple[list[Problem], int | None]] = []
        published: list[bool] = []

        def on_committed(version: int) -> None:
            found = self._check_new(slot, version) if self.verify_after_commit else ([], None)
            checked.append(found)
            if not found[0] and loop is not None:
                self._publish_from_thread(
                    loop, slot, version, model_type, dict.fromkeys(aliases, version)
                )
                published.append(True)

        if isinstance(source, Imported):
            progress.stage = "committing"
            progress.total = source.nbytes

            def advance(done: int) -> None:
                progress.done = done

            follow_progress(source, advance)
            version = self._save(
                slot, source, model_type, aliases, key, number, on_committed=on_committed
            )
            context = self.store.load_context(slot, version)
        else:
            if isinstance(source, Context):
                context = source
            else:
                progress.stage = "reading"
                context = source()
            progress.stage = "committing"
            version = self._save(
                slot, context, model_type, aliases, key, number, on_committed=on_committed
            )
        if not checked and self.verify_after_commit:  # on_committed failed (logged): check now
            checked.append(self._check_new(slot, version))
        problems, served = checked[0] if checked else ([], None)
        return version, context, problems, served, bool(published)

    def _save(  # noqa: PLR0917 (the commit's own arguments, passed through)
        self,
        slot: int,
        context: Context | Imported,
        model_type: str | None,
        aliases: tuple[str, ...],
        key: str | None = None,
        number: int | None = None,
        *,
        on_committed: Callable[[int], None] | None = None,
    ) -> int:
        started = time.perf_counter()
        # Without a reread, the verified record rides in the version's own COMMIT.
        record = self.verify_after_commit and not self.reread_after_commit
        if isinstance(context, Imported):
            version = self.store.save_import(
                slot, context, model_type=model_type, aliases=aliases, publish_key=key,
                on_committed=on_committed, version=number, record_verified=record,
            )  # fmt: skip
        else:
            version = self.store.save_context(
                slot, context, model_type=model_type, aliases=aliases, publish_key=key,
                on_committed=on_committed, version=number, record_verified=record,
            )  # fmt: skip
        observer = self.on_commit
        if observer is not None:
            try:
                observer(slot, version, time.perf_counter() - started)
            except Exception:
                log.exception("commit observer failed for slot %d version %d", slot, version)
        return version

    def _check_new(self, slot: int, version: int) -> tuple[list[Problem], int | None]:
        """Record a new version verified (from the checksums its commit took as it wrote,
        or, with ``reread_after_commit``, by hashing what landed: the only hash on this
        host while its files keep their identity) or damaged; a damaged one loses the
        current pointer to the slot's newest intact version. Returns the problems and
        that version.
        """
        if self.store.verified_by_commit(slot, version):  # recorded in its own transaction
            self.checked_after_commit["verified"] += 1
            return [], None
        try:
            problems = self.store.record_check(slot, version, rehash=self.reread_after_commit)
        except CtxStoreError as exc:  # unrecorded: readers hash it themselves, as before
            log.warning("slot %d version %d not recorded verified: %s", slot, version, exc)
            return [], None
        self.checked_after_commit["damaged" if problems else "verified"] += 1
        if not problems:
            return [], None
        log.error("slot %d version %d is damaged right after its commit: %s",
                  slot, version, "; ".join(map(str, problems)))  # fmt: skip
        return problems, self._fall_back(slot, version)

    def _fall_back(self, slot: int, damaged: int) -> int | None:
        """Move ``slot`` from ``damaged`` to its newest intact version (None: there is none)."""
        target = self.store.newest_intact(slot, damaged)
        if target is None:
            log.error("slot %d has no intact version older than %d: its pointer stays",
                      slot, damaged)  # fmt: skip
            return None
        self.store.rollback(slot, target)
        log.warning("slot %d: current pointer moved back from damaged version %d to %d",
                    slot, damaged, target)  # fmt: skip
        return target

    async def heal(self, slot: int, damaged: int) -> int | None:
        """If ``damaged`` is still current, move the pointer to the newest intact version and
        announce it; returns that version (None: not current any more, or none intact)."""
        async with self._lock:
            if await asyncio.to_thread(self.store.current_version, slot) != damaged:
                return None
            target = await asyncio.to_thread(self._fall_back, slot, damaged)
            if target is not None:
                self._publish_pointer(slot, target, None, {})
        return target

    async def move_pointer(self, slot: int, version: int | str | None) -> int:
        """Rollback (or roll forward) the current pointer, then announce it."""
        async with self._lock:
            number = await asyncio.to_thread(self.store.rollback, slot, version)
            self._publish_pointer(slot, number, None, {})
        return number

    async def repair(self, slot: int | None, problems: list[Problem]) -> list[Repair]:
        """Move the current versions ``problems`` (a verify's) name as damaged back to the
        newest intact ones (:meth:`PersistentStore.repair`), then announce each move."""
        async with self._lock:
            repairs = await asyncio.to_thread(self.store.repair, slot, problems=problems)
            for repair in repairs:
                if repair.to_version is not None:
                    self._publish_pointer(repair.slot, repair.to_version, None, {})
        return repairs

    def announce_aliases(self, slot: int, aliases: dict[str, int]) -> None:
        """Tell subscribers that aliases of ``slot`` moved (the current version is unchanged).

        Called after the alias change is committed. Readers adopt nothing new from
        it (the version is the one they hold); watchers and /events see the move.
        """
        current = self.store.current_version(slot)
        if current is None:
            return
        self._seq += 1
        self._announce(
            Announce(
                slot=slot,
                version=current,
                seq=self._seq,
                committed_at=self._clock(),
                aliases=aliases,
            )
        )

    def _publish_pointer(
        self, slot: int, version: int, model_type: str | None, aliases: dict[str, int]
    ) -> None:
        """On the loop: write ``version`` to the version table, then announce it."""
        committed_at = self._clock()
        if self.table is not None:
            self.table.set(slot, version, committed_at_ns=int(committed_at * 1e9))
        self._announce_pointer(slot, version, committed_at, model_type, aliases)

    def _publish_from_thread(
        self,
        loop: asyncio.AbstractEventLoop,
        slot: int,
        version: int,
        model_type: str | None,
        aliases: dict[str, int],
    ) -> None:
        """In the commit thread: write the table now, announce on ``loop`` (the next turn).

        The announcement's ``seq`` is taken on the loop, where every other
        announcement takes its own, so the counter never goes backwards on a
        connection.
        """
        committed_at = self._clock()
        if self.table is not None:
            self.table.set(slot, version, committed_at_ns=int(committed_at * 1e9))
        record = self._version_record(slot, version)
        announced = threading.Event()

        def announce() -> None:
            try:
                self._announce_pointer(slot, version, committed_at, model_type, aliases, record)
            finally:
                announced.set()

        loop.call_soon_threadsafe(announce)
        # The loop goes first: this thread's chores (warming, retention) would hold the
        # GIL until the interpreter's switch interval made them let go (~0.5 ms a
        # commit, measured), and the announcement waited for them. Blocked here, this
        # thread lets the loop take the GIL at once. Bounded: a stopping loop runs
        # nothing more, and this thread is never the loop's own.
        announced.wait(HANDOFF_WAIT)

    def _version_record(self, slot: int, version: int) -> VersionRecord | None:
        """The record a new version's announcement carries so that readers map it without
        reading the index (kept from its commit's transaction here, where reading it back
        took ~0.15 ms between the COMMIT and the announcement, instead of one read in every
        reader), or None: not recorded verified, larger than ``announce_record_bytes``,
        or unreadable."""
        limit = self.announce_record_bytes
        if limit <= 0:
            return None
        try:
            found = self.store.committed_record(slot, version)
        except Exception as exc:  # the announcement goes, without it; readers read the index
            log.warning("slot %d version %d is announced without its record: %s",
                      slot, version, exc)  # fmt: skip
            return None
        if found is None:
            return None
        config, metadata, tensors, files = found
        size = len(config) + len(metadata) + 64 * len(tensors)
        if not tensors or size > limit or len(tensors) > MAX_RECORD_TENSORS:
            return None  # a record holds 1 to MAX_RECORD_TENSORS tensors (the wire's bound)
        return VersionRecord(config, metadata, tensors, files)

    def _announce_pointer(  # noqa: PLR0917 (call_soon_threadsafe passes them positionally)
        self,
        slot: int,
        version: int,
        committed_at: float,
        model_type: str | None,
        aliases: dict[str, int],
        record: VersionRecord | None = None,
    ) -> None:
        self._seq += 1
        self._announce(
            Announce(
                slot=slot,
                version=version,
                seq=self._seq,
                committed_at=committed_at,
                model_type=model_type,
                aliases=aliases,
                record=record,
            )
        )

    # -- publish requests -------------------------------------------------------------------

    async def publish(
        self, request: PublishRequest, who: Requester, progress: PublishProgress | None = None
    ) -> int:
        """Commit a publish request; one with a key commits at most once (see PublishKeys)."""
        progress = progress or PublishProgress()
        key = request.key
        if key is None:
            return await self._publish(request, who, progress)

        async def lookup() -> tuple[int, int] | None:
            return await asyncio.to_thread(self.store.publish_key_version, key)

        def waiting() -> None:
            progress.stage = "waiting"
            log.info(
                "publish to slot %d with key %s waits for its first try, in flight",
                request.slot,
                key,
            )

        return await self.keys.run(
            key,
            request.slot,
            lookup,
            lambda: self._publish(request, who, progress),
            waiting,
        )

    async def _publish(
        self, request: PublishRequest, who: Requester, progress: PublishProgress
    ) -> int:
        match request:
            case PublishFile():
                return await self.publish_file(request, who, progress)
            case PublishBuild():
                return await self.publish_build(request, who, progress)
            case PublishShm():
                return await self.publish_shm(request, who, progress)

    async def publish_file(
        self, request: PublishFile, who: Requester, progress: PublishProgress | None = None
    ) -> int:
        """A weights file or a checkpoint directory: its headers checked first, then its
        tensors streamed into the store by the commit."""
        progress = progress or PublishProgress()
        progress.stage = "reading"
        imported = await asyncio.to_thread(
            open_import, request.path, limits=who.limits, check=who.check_file
        )
        imported.metadata = {**imported.metadata, **dict(request.metadata)}
        progress.stage = "waiting"
        return await self.commit(
            request.slot, imported, model_type=request.model_type, alias=request.alias,
            key=request.key, progress=progress,
        )  # fmt: skip

    async def publish_build(
        self, request: PublishBuild, who: Requester, progress: PublishProgress | None = None
    ) -> int:
        progress = progress or PublishProgress()
        node = create_node(request.node_type, request.slot, dict(request.config))
        progress.stage = "reading"
        context: Context | Imported
        if isinstance(node, FileNode):  # the same rule as publish_file: the peer's own files
            node.file_check = who.check_file
            node.limits_cap = who.limits
            context = await asyncio.to_thread(node.build_import)  # streamed by the commit
        else:
            context = await node.async_build_context()
        progress.stage = "waiting"
        return await self.commit(
            request.slot, context, model_type=node.model_type, alias=request.alias,
            key=request.key, progress=progress,
        )  # fmt: skip

    async def publish_shm(
        self, request: PublishShm, who: Requester, progress: PublishProgress | None = None
    ) -> int:
        """Copy the segment's tensors (under the commit lock) and commit the copy."""
        progress = progress or PublishProgress()
        progress.total = sum(spec.nbytes for spec in request.manifest)
        name = request.shm_name
        if name in self.segments_in_use:
            raise InvalidInputError(f"shared-memory segment {name!r} is already being published")
        self.segments_in_use.add(name)
        try:
            return await self.commit(
                request.slot,
                lambda: self._copy_segment(request, who, progress),
                model_type=request.model_type,
                alias=request.alias,
                key=request.key,
                progress=progress,
            )
        finally:
            self.segments_in_use.discard(name)

    def _copy_segment(
        self, request: PublishShm, who: Requester, progress: PublishProgress
    ) -> Context:
        """In the commit's worker thread: the segment's tensors, copied into our memory."""
        with open_segment(request.shm_name) as segment:
            if not who.may_read(segment.owner):
                raise InvalidInputError(
                    f"segment {segment.name!r} belongs to uid {segment.owner}, not to the "
                    f"requesting uid {who.uid}"
                )
            if segment.size == 0:
                raise InvalidInputError(f"shared-memory segment {segment.name!r} is empty")

            def advance(done: int) -> None:
                progress.done = done

            weights = read_tensors(
                segment, request.manifest, max_bytes=self.max_publish_bytes, progress=advance
            )
        return Context(weights, request.config, request.metadata)
