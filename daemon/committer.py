"""The commit path of the daemon: one commit at a time, off the event loop, then announce.

Publish requests from the socket (a file path, a build by node type, tensors
in a shared-memory segment) and from the API all end here. The order is the
point: the store commits (its COMMIT is the commit point), the version table
is bumped, and only then are subscribers told. Inputs named by a peer are
read only if that peer owns them: the daemon never reads on a client's
behalf what the client could not read itself. Files are read only from
under the import roots, when they are set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import posix_ipc

from ctxstore.context import Context
from ctxstore.errors import InvalidInputError, NotFoundError
from ctxstore.messages import Announce, PublishBuild, PublishFile, PublishShm
from ctxstore.nodes import FileNode, create_node, read_weights_file
from ctxstore.nodes.files import OpenedFile
from ctxstore.store import PersistentStore
from ctxstore.versiontable import VersionTableWriter

from .import_roots import check_opened_file

log = logging.getLogger("ctxstore.daemon")

SHM_PREFIX = "/ctxstore-pub-"


@dataclass(frozen=True, slots=True)
class Requester:
    """Who asked: the peer's uid decides which files and segments the daemon will read.

    ``import_roots``: the directories files may be imported from (empty: anywhere).
    """

    uid: int
    import_roots: tuple[Path, ...] = ()

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
        self.on_commit: CommitObserver | None = None
        #: post-commit stage (hooks), run after the announcement, one commit at a time,
        #: outside the commit lock so a slow hook never delays the next commit
        self.post_commit: PostCommit | None = None
        self._post_lock = asyncio.Lock()
        self._post_tasks: set[asyncio.Task[None]] = set()

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
        context: Context,
        *,
        model_type: str | None = None,
        alias: str | None = None,
    ) -> int:
        aliases = (alias,) if alias else ()
        async with self._lock:
            version = await asyncio.to_thread(self._save, slot, context, model_type, aliases)
            self.commits += 1
            self.last_commit = (slot, version)
            self._publish_pointer(slot, version, model_type, dict.fromkeys(aliases, version))
        if self.post_commit is not None:
            task = asyncio.ensure_future(
                self._after_commit(self.post_commit, slot, version, context, model_type)
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

    def _save(
        self, slot: int, context: Context, model_type: str | None, aliases: tuple[str, ...]
    ) -> int:
        started = time.perf_counter()
        version = self.store.save_context(slot, context, model_type=model_type, aliases=aliases)
        observer = self.on_commit
        if observer is not None:
            try:
                observer(slot, version, time.perf_counter() - started)
            except Exception:
                log.exception("commit observer failed for slot %d version %d", slot, version)
        return version

    async def move_pointer(self, slot: int, version: int | str | None) -> int:
        """Rollback (or roll forward) the current pointer, then announce it."""
        async with self._lock:
            number = await asyncio.to_thread(self.store.rollback, slot, version)
            self._publish_pointer(slot, number, None, {})
        return number

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
        committed_at = self._clock()
        if self.table is not None:
            self.table.set(slot, version, committed_at_ns=int(committed_at * 1e9))
        self._seq += 1
        self._announce(
            Announce(
                slot=slot,
                version=version,
                seq=self._seq,
                committed_at=committed_at,
                model_type=model_type,
                aliases=aliases,
            )
        )

    # -- publish requests -------------------------------------------------------------------

    async def publish_file(self, request: PublishFile, who: Requester) -> int:
        context = await asyncio.to_thread(_context_from_file, request.path, who)
        context = context.set_metadata({**context.get_metadata(), **dict(request.metadata)})
        return await self.commit(
            request.slot, context, model_type=request.model_type, alias=request.alias
        )

    async def publish_build(self, request: PublishBuild, who: Requester) -> int:
        node = create_node(request.node_type, request.slot, dict(request.config))
        if isinstance(node, FileNode):  # the same rule as publish_file: the peer's own files
            node.file_check = who.check_file
        context = await node.async_build_context()
        return await self.commit(
            request.slot, context, model_type=node.model_type, alias=request.alias
        )

    async def publish_shm(self, request: PublishShm, who: Requester) -> int:
        with _mapped_segment(request.shm_name, who) as buffer:
            weights = {
                spec.name: _array_at(buffer, spec.dtype, spec.shape, spec.offset, spec.nbytes)
                for spec in request.manifest
            }
            context = Context(weights, request.config, request.metadata)
            return await self.commit(
                request.slot, context, model_type=request.model_type, alias=request.alias
            )


def _context_from_file(path: str, who: Requester) -> Context:
    loaded = read_weights_file(path, check=who.check_file)
    source = {"path": path, "format": loaded.format, "bytes": loaded.size}
    metadata: dict[str, Any] = {"source": source}
    if loaded.metadata:
        metadata["file_metadata"] = loaded.metadata
    return Context(loaded.weights, None, metadata)


@contextlib.contextmanager
def _mapped_segment(name: str, who: Requester) -> Any:
    if not name.startswith(SHM_PREFIX):
        raise InvalidInputError(f"shared-memory segment {name!r} must be named {SHM_PREFIX}*")
    try:
        segment = posix_ipc.SharedMemory(name, read_only=True)
    except posix_ipc.ExistentialError:
        raise NotFoundError(f"shared-memory segment {name!r} does not exist") from None
    except posix_ipc.PermissionsError as exc:
        raise InvalidInputError(f"shared-memory segment {name!r} is not readable: {exc}") from exc
    try:
        owner = os.fstat(segment.fd).st_uid
        if not who.may_read(owner):
            raise InvalidInputError(
                f"segment {name!r} belongs to uid {owner}, not to the requesting uid {who.uid}"
            )
        if segment.size == 0:
            raise InvalidInputError(f"shared-memory segment {name!r} is empty")
        mm = mmap.mmap(segment.fd, segment.size, access=mmap.ACCESS_READ)
    finally:
        segment.close_fd()
    try:
        yield mm
    finally:
        with contextlib.suppress(BufferError):  # arrays still referenced keep it mapped
            mm.close()


def _array_at(
    buffer: mmap.mmap, dtype: str, shape: tuple[int, ...], offset: int, nbytes: int
) -> np.ndarray[Any, Any]:
    resolved = np.dtype(dtype)
    expected = resolved.itemsize * int(np.prod(shape, dtype=np.int64))
    if nbytes != expected or offset < 0 or offset + nbytes > len(buffer):
        raise InvalidInputError(
            f"tensor at offset {offset} with {nbytes} bytes does not fit a {len(buffer)}-byte "
            f"segment as {dtype}{list(shape)}"
        )
    if nbytes == 0:
        return np.empty(shape, resolved)
    return np.ndarray(shape, dtype=resolved, buffer=buffer, offset=offset)
