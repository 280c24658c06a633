"""The follower's side: adopt the versions the origin's heads name, whole and verified.

A slot is checked when the feed hints that its head moved, and by a poll of all
heads (a listing of ``heads/`` compared by ETag) every ``poll_interval`` seconds,
jittered and backed off after failures (:class:`PollPolicy`), which converges with
the feed down. Checking a slot reads its head; a head whose
``seq`` is not above the one last applied is ignored (never backwards, each
entry applied once). A version the store lacks is pulled: each tensor the store
already holds (same checksum) is mapped from the store, every other one is
downloaded into ``incoming/`` and hashed; a file whose bytes do not hash to its
name is refused (IntegrityError, logged, retried at the next check) and nothing
is committed. The pulled version goes through the daemon's commit path
(:class:`Adopter`, the committer), so local readers see an ordinary version;
each verified download is handed to it as a
:class:`~ctxstore.sources.VerifiedFile`, which the store's commit moves into
the version (written and hashed once, not copied again).

State (``follower.json`` in the state directory, :mod:`.state`): the ``seq``
applied per slot and transfer counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from ..checksum import checksum_file, checksum_parts
from ..errors import CtxStoreError, IntegrityError, NotFoundError
from ..faults import crash_point
from ..integrity import Identity, stat_file
from ..sources import Imported, TensorSource, VerifiedFile, verified_source
from ..store import PersistentStore
from ..store.durable import clear_scratch_dir, make_dir
from ..store.npyfile import check_npy_header, dtype_from_text
from .feed import Feed
from .layout import Head, Manifest, TensorEntry, set_aliases
from .polling import DEFAULT_POLL_INTERVAL, PollPolicy
from .reuse import reusable_copy
from .s3 import OriginClient
from .state import STATE_NAME, FollowState

log = logging.getLogger(__name__)

INCOMING_NAME = "incoming"


class Adopter(Protocol):
    """What the follower needs of the daemon's committer (daemon/committer.py)."""

    async def commit(
        self, slot: int, context: Imported, *, model_type: str | None = ..., as_version: int | None
    ) -> int: ...

    async def move_pointer(self, slot: int, version: int | str | None) -> int: ...

    def announce_aliases(self, slot: int, aliases: dict[str, int]) -> None: ...


class Follower:
    """Runs in the follower daemon's event loop; S3 reads and hashing run in threads."""

    def __init__(
        self,
        store: PersistentStore,
        adopter: Adopter,
        client: OriginClient,
        state_dir: str | os.PathLike[str],
        feed: Feed | None = None,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        policy: PollPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.adopter = adopter
        self.client = client
        self.feed = feed
        self.policy = policy if policy is not None else PollPolicy(poll_interval)
        self._rng = rng if rng is not None else random.Random()  # spreading waits, not secrets
        #: polls in a row that failed (the backoff's exponent)
        self.poll_failures = 0
        #: slot -> the version its last applied head names (status, metrics)
        self.applied: dict[int, int] = {}
        self.state_dir = Path(state_dir)
        make_dir(self.state_dir)
        self.incoming = self.state_dir / INCOMING_NAME
        make_dir(self.incoming)
        clear_scratch_dir(self.state_dir, INCOMING_NAME)  # a download a crash cut short
        self.state_path = self.state_dir / STATE_NAME
        self.state = FollowState.load(self.state_path)
        self.stats = self.state.stats
        self._queue: asyncio.Queue[int] = asyncio.Queue()
        self._queued: set[int] = set()
        #: slot -> ETag of the head last applied (or found not newer)
        self._etags: dict[int, str] = {}
        #: slot -> (checks in a row that failed, when the next may run): a slot refused
        #: (a corrupt object) or unreachable is retried by the poll with the same backoff
        #: as a failed poll, not at every poll (each retry may download the version again)
        self._failed: dict[int, tuple[int, float, str | None]] = {}
        self._clock = time.monotonic
        #: slot -> its head's ETag in the last listing; the slot being checked now
        self._listed: dict[int, str] = {}
        self._checking: int | None = None
        #: checksum -> identity of a verified download left in incoming/ by the last pull
        self._kept: dict[str, Identity] = {}
        #: checksum -> its file in incoming/, for the pull in progress
        self._fetched: dict[str, Path] = {}

    async def run(self) -> None:
        """Forever: poll the heads, follow the feed, apply one slot at a time."""
        tasks = [asyncio.ensure_future(self._poll_loop()),
                 asyncio.ensure_future(self._apply_loop())]  # fmt: skip
        if self.feed is not None:
            tasks.append(asyncio.ensure_future(self._feed_loop()))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _enqueue(self, slot: int) -> None:
        if slot not in self._queued:
            self._queued.add(slot)
            self._queue.put_nowait(slot)

    async def _poll_loop(self) -> None:
        while True:
            try:
                etags = await asyncio.to_thread(
                    self.client.list_etags, self.client.origin.heads_prefix
                )
            except CtxStoreError as exc:
                self.poll_failures += 1
                self.stats.last_error = str(exc)
                log.warning("head poll failed (local reads go on; next in %.1fs): %s",
                            self.policy.wait(self.poll_failures, self._rng), exc)  # fmt: skip
            else:
                self.poll_failures = 0
                self.stats.polls += 1
                for key, etag in etags.items():
                    slot = self.client.origin.slot_of_head(key)
                    if slot is not None and self._due(slot, etag) and slot != self._checking:
                        self._enqueue(slot)
            await asyncio.sleep(self.policy.wait(self.poll_failures, self._rng))

    async def _feed_loop(self) -> None:
        assert self.feed is not None
        async for hint in self.feed.hints():
            self.stats.hints += 1
            if hint.seq > self.state.heads.get(hint.slot, 0):
                delay = self.policy.hint_delay(self._rng)
                if delay > 0:
                    asyncio.get_running_loop().call_later(delay, self._enqueue, hint.slot)
                else:
                    self._enqueue(hint.slot)

    async def _apply_loop(self) -> None:
        while True:
            slot = await self._queue.get()
            self._queued.discard(slot)
            self._checking = slot
            try:
                await self.check_slot(slot)
                self._failed.pop(slot, None)
            except CtxStoreError as exc:
                failures = self._failed.get(slot, (0, 0.0, None))[0] + 1
                retry = self._clock() + self.policy.wait(failures, self._rng)
                self._failed[slot] = (failures, retry, self._listed.get(slot))
                self.stats.last_error = f"slot {slot}: {exc}"
                if isinstance(exc, IntegrityError):
                    self.stats.refused += 1
                    log.error("slot %d: refused what the origin holds: %s", slot, exc)
                else:
                    log.warning("slot %d: not followed yet: %s", slot, exc)
                self._save_state()
            finally:
                self._checking = None

    def _due(self, slot: int, etag: str) -> bool:
        """Whether the poll, listing ``slot``'s head with ``etag``, should check the slot:
        its head changed since it was applied; or, after a failed check, its head changed
        since (the origin was mended) or the backoff's wait is over."""
        self._listed[slot] = etag
        failed = self._failed.get(slot)
        if failed is None:
            return self._etags.get(slot) != etag
        return etag != failed[2] or self._clock() >= failed[1]

    async def check_slot(self, slot: int) -> bool:
        """Apply the slot's head if it is newer than the one applied; True if it was."""
        key = self.client.origin.head_key(slot)
        found = await asyncio.to_thread(self.client.get, key)
        if found is None:
            return False
        self.stats.record_bytes += len(found.data)
        head = Head.from_bytes(found.data, key)
        if head.slot != slot:
            raise IntegrityError(f"{key} names slot {head.slot}")
        applied = self.state.heads.get(slot, 0)
        if head.seq <= applied:
            if head.seq < applied:
                log.warning("slot %d: origin head %d is behind the %d applied: ignored",
                            slot, head.seq, applied)  # fmt: skip
            self._etags[slot] = found.etag
            self.applied.setdefault(slot, head.current)
            return False
        await self._adopt(head)
        self.applied[slot] = head.current
        self.state.heads[slot] = head.seq
        self._etags[slot] = found.etag
        self._save_state()
        return True

    def _save_state(self) -> None:
        try:
            self.state.save(self.state_path)
        except OSError as exc:
            log.error("cannot save %s: %s", self.state_path, exc)

    async def _adopt(self, head: Head) -> None:
        """Pull the versions the head keeps that this store lacks, up to its current one,
        oldest first (numbers only go up: a later rollback may name any of them), then
        move the pointer and the aliases as the head says."""
        slot = head.slot
        versions = set(await asyncio.to_thread(self._local_versions, slot))
        following = await asyncio.to_thread(self._next_version, slot)
        wanted = sorted({v for v in head.versions if v <= head.current} | {head.current})
        for version in wanted:
            if version in versions or version < following:
                continue
            await self.pull(slot, version)
            versions.add(version)
            following = version + 1
        if head.current not in versions:
            log.error("slot %d: version %d cannot be adopted: this store's numbers are "
                      "past it (next %d)", slot, head.current, following)  # fmt: skip
        elif await asyncio.to_thread(self.store.current_version, slot) != head.current:
            await self.adopter.move_pointer(slot, head.current)
            self.stats.pointer_moves += 1
        moved = await asyncio.to_thread(self._follow_aliases, slot, head.aliases, versions)
        if moved:
            self.adopter.announce_aliases(slot, moved)

    def _local_versions(self, slot: int) -> list[int]:
        return [row[0] for row in self.store.read_query(
            "SELECT version FROM versions WHERE slot = ?", (slot,))]  # fmt: skip

    def _next_version(self, slot: int) -> int:
        rows = self.store.read_query("SELECT next_version FROM slots WHERE slot = ?", (slot,))
        return int(rows[0][0]) if rows else 1

    def _follow_aliases(
        self, slot: int, aliases: Mapping[str, int], versions: set[int]
    ) -> dict[str, int]:
        local = set_aliases(self.store.get_aliases(slot))
        moved: dict[str, int] = {}
        for name, version in aliases.items():
            if local.get(name) != version and version in versions:
                self.store.set_alias(slot, name, version)
                moved[name] = version
        for name in set(local) - set(aliases):
            with contextlib.suppress(NotFoundError):
                self.store.delete_alias(slot, name)
        return moved

    async def pull(self, slot: int, version: int) -> int:
        """Download (what the store lacks of) a version, verify it, commit it as ``version``."""
        key = self.client.origin.manifest_key(slot, version)
        found = await asyncio.to_thread(self.client.get, key)
        if found is None:
            raise IntegrityError(f"the origin's head names version {version}, with no {key}")
        self.stats.record_bytes += len(found.data)
        manifest = Manifest.from_bytes(found.data, key)
        if (manifest.slot, manifest.version) != (slot, version):
            raise IntegrityError(f"{key} describes slot {manifest.slot} version {manifest.version}")
        before = (self.stats.objects_downloaded, self.stats.bytes_downloaded,
                  self.stats.tensors_reused)  # fmt: skip
        imported = await asyncio.to_thread(self.fetch, manifest)
        log.info("slot %d version %d: %d objects (%d bytes) downloaded, %d tensors from the "
                 "store", slot, version, self.stats.objects_downloaded - before[0],
                 self.stats.bytes_downloaded - before[1],
                 self.stats.tensors_reused - before[2])  # fmt: skip
        committed = await self.adopter.commit(
            slot, imported, model_type=manifest.model_type, as_version=version
        )
        self.stats.versions_pulled += 1
        self._save_state()
        log.info("slot %d: adopted version %d from %s", slot, committed, self.client.origin)
        return committed

    # -- in a worker thread ---------------------------------------------------------------

    def fetch(self, manifest: Manifest) -> Imported:
        """Every tensor of ``manifest`` mapped, from the store or downloaded and verified,
        and its files. A download the commit did not take (the pull failed) stays in
        ``incoming/`` for the next pull, which takes it instead of downloading it again:
        a pull refused for one corrupt object fetches that object alone the next time.
        What was kept for another version is removed first (one version's at most)."""
        wanted = {t.checksum for t in manifest.tensors} | {f.checksum for f in manifest.files}
        for checksum in [c for c in self._kept if c not in wanted]:
            del self._kept[checksum]
            with contextlib.suppress(OSError):
                (self.incoming / checksum).unlink()
        self._fetched = {}
        imported = Imported({}, manifest.config, manifest.metadata)
        try:
            for tensor in manifest.tensors:
                imported.tensors[tensor.name] = self._tensor(tensor, imported)
            for entry in manifest.files:
                path = self._download(entry.checksum, entry.size, imported)
                with open(path, "rb") as source:
                    data = source.read(entry.size + 1)
                _check_file(entry.name, data, entry.size, entry.checksum)
                imported.files[entry.name] = data
        except BaseException:
            imported.close()
            raise
        return imported

    def _tensor(self, tensor: TensorEntry, imported: Imported) -> TensorSource:
        """The tensor as a :class:`VerifiedFile` the commit takes without copying or hashing
        it again: a stored copy it links, or a download, verified, that it moves into the
        version (it is the writer's ``.npy`` file, byte-exact)."""
        dtype = dtype_from_text(tensor.dtype)
        reused = reusable_copy(self.store, tensor, dtype, imported)
        if reused is not None:
            self.stats.tensors_reused += 1
            return reused
        path = self._download(tensor.checksum, tensor.size, imported)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        imported.closers.append(lambda: os.close(fd))
        try:
            check_npy_header(os.pread(fd, tensor.offset, 0), dtype, tensor.shape, tensor.offset)
        except IntegrityError as exc:
            raise IntegrityError(f"tensor {tensor.name}: {exc}") from None
        verified = VerifiedFile(str(path), tensor.checksum)
        return verified_source(dtype, tensor.shape, fd, tensor.offset, verified)

    def _download(self, checksum: str, size: int, imported: Imported) -> Path:
        """``incoming/<checksum>``: kept from a failed pull, downloaded once per pull, or
        downloaded now and hashed; IntegrityError (file removed) unless it is named by its
        own checksum."""
        path = self._fetched.get(checksum)
        if path is not None:
            return path  # a second tensor with the same bytes: the commit links them
        key = self.client.origin.object_key(checksum)
        path = self.incoming / checksum  # 32 hex digits, checked when the manifest was read
        self._fetched[checksum] = path
        imported.closers.append(lambda: self._keep(checksum, path))
        kept = self._kept.pop(checksum, None)
        with contextlib.suppress(OSError):
            if kept is not None and stat_file(str(path)) == kept:
                return path  # hashed by this process, untouched since (ours alone)
        self.client.download_file(key, str(path), size)
        actual = checksum_file(str(path))
        if actual != checksum:
            path.unlink(missing_ok=True)
            raise IntegrityError(
                f"origin object {key} is corrupt: its bytes hash to {actual}, not to its name"
            )
        self.stats.objects_downloaded += 1
        self.stats.bytes_downloaded += path.stat().st_size
        crash_point("origin_object_downloaded")
        return path

    def _keep(self, checksum: str, path: Path) -> None:
        """When a pull is over: a verified download still in ``incoming/`` (its commit
        failed, or copied it) is kept, by identity, for the next pull."""
        try:
            self._kept[checksum] = stat_file(str(path))
        except OSError:
            self._kept.pop(checksum, None)


def _check_file(name: str, data: bytes, size: int, checksum: str) -> None:
    if len(data) != size or checksum_parts((data,)) != checksum:
        raise IntegrityError(f"file {name}: not what the manifest records")
