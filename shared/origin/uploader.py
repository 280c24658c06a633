"""The writer's side: after each local commit or pointer move, bring the origin up to date.

For a slot in the outbox the uploader (1) uploads every tensor file and extra
file of the versions the slot's pointers name that the origin lacks, several at
once (objects are named by checksum: what any version already uploaded is not
sent again), (2) creates each such version's manifest if absent, once all its
objects are there, (3) moves the slot's head by compare-and-swap, (4) puts a
hint on the feed, then (5) takes the slot out of the outbox. A crash anywhere
repeats the steps from the start, and each is idempotent; no step makes
anything visible that a step before it did not finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial

from ..errors import ConflictError, CtxStoreError, InvalidInputError, StorageError
from ..faults import crash_point
from ..store import PersistentStore
from ..store import layout as store_layout
from .feed import Feed, Hint
from .layout import FileEntry, Head, Manifest, TensorEntry, set_aliases
from .outbox import Outbox
from .s3 import OriginClient

log = logging.getLogger(__name__)

_CAS_ATTEMPTS = 8
_RETRY_MIN, _RETRY_MAX = 0.5, 30.0
#: objects of one version uploaded at once (``cluster.upload_concurrency``)
DEFAULT_UPLOAD_CONCURRENCY = 4


@dataclass
class UploadStats:
    objects_uploaded: int = 0
    bytes_uploaded: int = 0
    manifests_written: int = 0
    heads_moved: int = 0
    #: the most objects that were being uploaded at one time
    most_in_flight: int = 0
    #: the last failure to bring the origin up to date (None once a pass succeeds)
    last_error: str | None = None
    #: slot -> (seq, version) of the last head this writer moved
    heads: dict[int, tuple[int, int]] = field(default_factory=dict)


class Uploader:
    """Runs in the writer daemon's event loop; the S3 calls run in worker threads
    (one per slot being synced, and a pool of ``upload_concurrency`` for its objects)."""

    def __init__(
        self,
        store: PersistentStore,
        client: OriginClient,
        outbox: Outbox,
        feed: Feed | None = None,
        *,
        upload_concurrency: int = DEFAULT_UPLOAD_CONCURRENCY,
    ) -> None:
        if upload_concurrency < 1:
            raise InvalidInputError(f"upload_concurrency is {upload_concurrency}, not >= 1")
        self.store = store
        self.client = client
        self.outbox = outbox
        self.feed = feed
        #: objects of one version in flight at once (each large one also in parts)
        self.upload_concurrency = upload_concurrency
        self.stats = UploadStats()
        #: guards the counters and the known objects, which the upload threads update
        self._lock = threading.Lock()
        self._in_flight = 0
        self._wake = asyncio.Event()
        #: slot -> changes noted so far: a slot leaves the outbox only if no change came
        #: in while it was being synced (else that change would be lost)
        self._changes: dict[int, int] = {}
        #: what this process knows the origin holds (manifests by slot and version, objects
        #: by checksum): asked of the origin once, not at every sync of a slot that keeps
        #: many versions (objects and manifests are never replaced or removed there)
        self._manifests_known: set[tuple[int, int]] = set()
        self._objects_known: set[str] = set()
        #: slot -> the head moved last whose hint the feed did not take (it was down or
        #: reconnecting): put again at each pass until it does, so a follower that relies
        #: on the feed hears of it once the feed is back, not at the slot's next change
        self._untold: dict[int, Head] = {}
        if feed is not None:
            feed.on_reconnect.append(self._wake.set)

    def changed(self, slot: int) -> None:
        """A commit or pointer move of ``slot`` is durable: note it, durably, and wake up."""
        self._changes[slot] = self._changes.get(slot, 0) + 1
        try:
            self.outbox.add(slot)
        except CtxStoreError as exc:  # the start-up pass still finds the slot behind
            log.error("slot %d: cannot note it in the outbox: %s", slot, exc)
        self._wake.set()

    async def run(self) -> None:
        """Forever: drain the outbox; on failure retry with a growing delay."""
        for slot in self.store.current_versions():  # whatever a crash left behind
            self.outbox.add(slot)
        delay = _RETRY_MIN
        while True:  # the origin may be down when the writer starts: commits go on locally
            try:
                await asyncio.to_thread(self.client.ensure_bucket)
                break
            except CtxStoreError as exc:
                self.stats.last_error = str(exc)
                log.warning("origin %s not reachable yet (%s); retrying in %.1fs",
                            self.client.origin, exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
        delay = _RETRY_MIN
        while True:
            self._wake.clear()
            failed = False
            for untold in list(self._untold.values()):
                failed |= not await self._announce(untold)
            for slot in self.outbox.pending():
                seen = self._changes.get(slot, 0)
                try:
                    head = await asyncio.to_thread(self.sync_slot, slot)
                except CtxStoreError as exc:
                    log.warning("slot %d: origin not updated yet: %s", slot, exc)
                    self.stats.last_error = f"slot {slot}: {exc}"
                    failed = True
                    continue
                if head is not None:
                    failed |= not await self._announce(head)
                if self._changes.get(slot, 0) == seen:
                    self.outbox.done(slot)
            if failed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                delay = min(delay * 2, _RETRY_MAX)
            else:
                delay = _RETRY_MIN
                self.stats.last_error = None
                await self._wake.wait()

    async def _announce(self, head: Head) -> bool:
        """Put ``head``'s hint on the feed; False (kept for a retry) when it cannot."""
        if self.feed is None:
            return True
        try:
            await self.feed.put(Hint(head.slot, head.current, head.seq))
        except CtxStoreError as exc:
            if head.slot not in self._untold:
                log.warning("slot %d: head moved, feed not told (%s): followers poll; "
                            "retrying", head.slot, exc)  # fmt: skip
            self._untold[head.slot] = head
            return False
        self._untold.pop(head.slot, None)
        return True

    # -- in a worker thread ---------------------------------------------------------------

    def sync_slot(self, slot: int) -> Head | None:
        """Make the origin's head of ``slot`` name what the store serves; returns the new
        head, or None when it already did. Raises StorageError while the origin is down."""
        current = self.store.current_version(slot)
        if current is None:
            return None
        aliases = set_aliases(self.store.get_aliases(slot))
        kept = tuple(sorted(info.version for info in self.store.list_versions(slot)))
        model_type = self.store.get_metadata(slot, current, tensors=False).model_type
        for version in sorted({current, *aliases.values(), *kept}):
            if (slot, version) not in self._manifests_known:
                self.upload_version(self.manifest_of(slot, version))
        key = self.client.origin.head_key(slot)
        for _ in range(_CAS_ATTEMPTS):
            found = self.client.get(key)
            old = Head.from_bytes(found.data, key) if found is not None else None
            if old is not None and old.same_pointers(current, aliases, kept):
                return None
            head = Head(slot, (old.seq if old else 0) + 1, current, aliases, model_type, kept)
            if self.client.put_if_match(key, head.to_bytes(), found.etag if found else None):
                self.stats.heads_moved += 1
                self.stats.heads[slot] = (head.seq, head.current)
                log.info("origin %s: slot %d head %d -> version %d", self.client.origin,
                         slot, head.seq, current)  # fmt: skip
                return head
        raise ConflictError(f"slot {slot}: head {key} kept moving under this writer")

    def manifest_of(self, slot: int, version: int) -> Manifest:
        """The manifest of a stored version, from the index's records."""
        rows = self.store.read_query(
            "SELECT name, dtype, shape, data_offset, nbytes, checksum FROM tensors "
            "WHERE slot = ? AND version = ? ORDER BY position",
            (slot, version),
        )
        meta = self.store.get_metadata(slot, version, tensors=False)
        files = self.store.list_files(slot, version)
        return Manifest(
            slot,
            version,
            meta.model_type,
            meta.config,
            meta.metadata,
            tuple(
                TensorEntry(name, dtype, _shape(shape), offset, nbytes, checksum)
                for name, dtype, shape, offset, nbytes, checksum in rows
            ),
            tuple(FileEntry(f.name, f.size, f.checksum) for f in files),
        )

    def upload_version(self, manifest: Manifest) -> None:
        """Objects first, then the manifest (create-only): a manifest names only
        objects that are whole at the origin.

        The objects the origin lacks go up ``upload_concurrency`` at a time; the
        manifest is written only once every one of them has arrived, and a failure
        of any leaves it unwritten (the slot stays in the outbox for the next pass;
        the objects that did arrive are content-addressed, harmless, and not sent
        again)."""
        origin = self.client.origin
        which = (manifest.slot, manifest.version)
        manifest_key = origin.manifest_key(*which)
        if which in self._manifests_known:
            return
        if self.client.exists(manifest_key):
            self._manifests_known.add(which)
            return
        root = str(self.store.root)
        sends: dict[str, Callable[[], int]] = {}
        for position, tensor in enumerate(manifest.tensors):
            path = store_layout.tensor_path_str(root, manifest.slot, manifest.version, position)
            sends.setdefault(tensor.checksum, partial(self._send_tensor, path, tensor))
        for entry in manifest.files:
            sends.setdefault(entry.checksum, partial(self._send_file, *which, entry))
        self._send_all(sends)
        if self.client.put_if_absent(manifest_key, manifest.to_bytes()):
            self.stats.manifests_written += 1
        self._manifests_known.add(which)

    def _send_all(self, sends: dict[str, Callable[[], int]]) -> None:
        """Upload each object the origin lacks (checksum -> its upload), up to
        ``upload_concurrency`` at once; returns only once none is in flight. On a
        failure those not yet begun are dropped, those in flight finish, and the
        first failure is raised."""
        missing = [(checksum, send) for checksum, send in sends.items()
                   if checksum not in self._objects_known]  # fmt: skip
        if self.upload_concurrency == 1 or len(missing) < 2:
            for checksum, send in missing:
                self._send_one(checksum, send)
            return
        width = min(self.upload_concurrency, len(missing))
        with ThreadPoolExecutor(width, thread_name_prefix="ctxstore-upload") as pool:
            futures = [pool.submit(self._send_one, checksum, send) for checksum, send in missing]
            wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:
                future.cancel()  # those not begun; the pool's exit waits for the rest
        for future in futures:
            if not future.cancelled() and (exc := future.exception()) is not None:
                raise exc

    def _send_one(self, checksum: str, send: Callable[[], int]) -> None:
        """One object, unless the origin has it: noted as known only once it is there."""
        if self._has_object(checksum):
            return
        with self._lock:
            self._in_flight += 1
            self.stats.most_in_flight = max(self.stats.most_in_flight, self._in_flight)
        try:
            size = send()
        finally:
            with self._lock:
                self._in_flight -= 1
        with self._lock:
            self._objects_known.add(checksum)
            self.stats.objects_uploaded += 1
            self.stats.bytes_uploaded += size
        crash_point("origin_object_uploaded")

    def _send_tensor(self, path: str, tensor: TensorEntry) -> int:
        self.client.upload_file(path, self.client.origin.object_key(tensor.checksum), tensor.size)
        return tensor.size

    def _send_file(self, slot: int, version: int, entry: FileEntry) -> int:
        data = self.store.read_file(slot, version, entry.name)
        self.client.put_object(self.client.origin.object_key(entry.checksum), data)
        return len(data)

    def _has_object(self, checksum: str) -> bool:
        if checksum in self._objects_known:
            return True
        if self.client.exists(self.client.origin.object_key(checksum)):
            with self._lock:
                self._objects_known.add(checksum)
            return True
        return False


def _shape(text: object) -> tuple[int, ...]:
    from ..store.npyfile import shape_from_text

    if not isinstance(text, str):
        raise StorageError(f"a recorded shape is {text!r:.40}, not text")
    return shape_from_text(text)
