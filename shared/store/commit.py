"""The commit path: a context or a streamed import committed as the next version of a slot.

The commit protocol, in this order and only here (docs/reliability.md, "The commit path"):

1. validate the context;
2. write each new tensor into ``wal/<txid>/`` (or hard-link an identical stored
   one, or move in a file its caller verified, ``sources.VerifiedFile``), and the
   version's extra files into ``wal/<txid>/files/``; fsync each file and the
   directories (their entries);
3. rename ``wal/<txid>`` to ``slots/<slot>/<version>``, fsync ``slots/<slot>``;
4. one SQLite transaction inserts the version, its tensors and files and moves the
   slot's current pointer: its COMMIT is the commit point (its statements run
   right after staging, while the CPU is warm; nothing of them is visible or
   durable before this COMMIT). A daemon that records its new versions verified
   has the record ride in the same transaction (``record_verified``);
5. call the caller's ``on_committed`` (the daemon bumps its version table and
   announces there), then warm the files, apply retention (rows first, then unlink).

A crash before 4 leaves a directory with no row, which recovery deletes; a crash
after 4 leaves a whole version. A failed COMMIT keeps the files until a durable
write has buried its WAL frames (:meth:`PersistentStore._settle`). Readers only
ever follow rows, so they see whole versions or nothing.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import stat
from collections.abc import Callable, Mapping

from ..checksum import checksum_parts
from ..context import Array, Context
from ..errors import (
    ConflictError,
    InvalidInputError,
    StorageError,
)
from ..faults import crash_point
from ..integrity import Identity
from ..sources import Imported, TensorSource
from ..validation import (
    MAX_TENSORS,
    check_alias,
    check_label,
    check_slot,
    check_tensor_name,
    check_version,
)
from ..versionfiles import check_file_name, check_files
from ..wire.fields import MAX_RECORD_TENSORS
from . import layout
from .decode import AnnouncedRecord, RecordParts, dump_json
from .durable import (
    SyncQueue,
    describe_entry,
    fsync_all,
    fsync_dir,
    make_dir,
    remove_tree,
    rename_dir,
)
from .manifest import layout_entries, pack_manifest
from .retention import DELETE_VERSION_SQL
from .staging import NewVersion, StoreStaging, TensorRow

log = logging.getLogger("ctxstore.store")


class StoreCommit(StoreStaging):
    """save_context and save_import: steps 2 to 5 of the commit protocol above."""

    def save_context(
        self,
        slot_id: int,
        context: Context,
        *,
        model_type: str | None = None,
        aliases: tuple[str, ...] = (),
        pin: bool = False,
        publish_key: str | None = None,
        files: Mapping[str, bytes] | None = None,
        on_committed: Callable[[int], None] | None = None,
        version: int | None = None,
        record_verified: bool = False,
    ) -> int:
        """Commit ``context`` as the next version of ``slot_id`` and make it current.

        ``publish_key``: a publisher's idempotency key, recorded with the version in
        the same COMMIT (see :meth:`publish_key_version`); no two versions share one.
        ``files``: extra files that travel with the version byte-exact (a
        checkpoint's ``config.json``, tokenizer files ...), by plain name; read
        back with :meth:`read_file` (docs/huggingface.md).
        ``on_committed(version)``: called in this thread right after the COMMIT,
        before the chores that may follow it (warming, retention), so a daemon
        publishes the version first; what it raises is logged, never raised.
        ``version``: commit as exactly this number rather than the next one (a
        follower keeping its origin's numbering, docs/scale-out.md); a number below
        the slot's next is a ConflictError, so a slot never moves backwards.
        ``record_verified``: record the version verified (its files' identities,
        this boot) in its own transaction, as :meth:`record_check` with
        ``rehash=False`` would after it: every file was hashed as it was written,
        compared byte for byte with the stored file it links, or moved in with the
        checksum its owner verified (``save_import``'s verified files). Whether it was
        (a file not as staged is left to the caller's check) is
        :meth:`verified_by_commit`.
        """
        slot = check_slot(slot_id)
        if not isinstance(context, Context):
            raise InvalidInputError(f"expected a Context, got {type(context).__name__}")
        checked = check_files(files)
        for hook in self.pre_commit_hooks:
            hook(slot, context)
        return self._save(slot, context, model_type=model_type, aliases=aliases, pin=pin,
                          publish_key=publish_key, files=checked, sources=None,
                          on_committed=on_committed, number=version,
                          record_verified=record_verified)  # fmt: skip

    def save_import(
        self,
        slot_id: int,
        imported: Imported,
        *,
        model_type: str | None = None,
        aliases: tuple[str, ...] = (),
        pin: bool = False,
        publish_key: str | None = None,
        on_committed: Callable[[int], None] | None = None,
        version: int | None = None,
        record_verified: bool = False,
    ) -> int:
        """Commit what an importer read (``ctxstore.nodes.open_import``) as the next version.

        Tensors given as sources are copied from their files into the staging
        directory a chunk at a time and hashed as they are written: the memory
        this takes does not grow with the checkpoint. A source that carries a
        :class:`~ctxstore.sources.VerifiedFile` (a follower's checked download) is
        moved into the version instead, when it is exactly the file the store would
        write (size, ctxstore's header) and on this file system, and recorded with
        the checksum its owner verified: neither copied nor hashed again. The
        importer already checked the limits on its files; the names are checked
        again here.
        ``on_committed``, ``version``, ``record_verified``: as for :meth:`save_context`.
        """
        slot = check_slot(slot_id)
        context = Context(None, imported.config, imported.metadata)
        checked = {check_file_name(name): data for name, data in imported.files.items()}
        if len(imported.tensors) > MAX_TENSORS:
            raise InvalidInputError(f"a context holds at most {MAX_TENSORS} tensors")
        for name in imported.tensors:
            check_tensor_name(name)
        return self._save(slot, context, model_type=model_type, aliases=aliases, pin=pin,
                          publish_key=publish_key, files=checked,
                          sources=imported.tensors, on_committed=on_committed,
                          number=version, record_verified=record_verified)  # fmt: skip

    def _save(
        self,
        slot: int,
        context: Context,
        *,
        model_type: str | None,
        aliases: tuple[str, ...],
        pin: bool,
        publish_key: str | None,
        files: Mapping[str, bytes],
        sources: Mapping[str, Array | TensorSource] | None,
        on_committed: Callable[[int], None] | None = None,
        number: int | None = None,
        record_verified: bool = False,
    ) -> int:
        if number is not None:
            number = check_version(number)
        if model_type is not None:
            check_label(model_type, "model type")
        aliases = tuple(check_alias(a) for a in aliases)
        with self._write_lock:
            conn = self._settled_writer_conn()
            stored_type, version = self._slot_head(conn, slot)
            if model_type and stored_type and stored_type != model_type:
                raise ConflictError(
                    f"slot {slot} holds model type {stored_type!r}, not {model_type!r}"
                )
            if number is not None:
                if number < version:
                    raise ConflictError(
                        f"slot {slot} cannot take version {number}: its next version is "
                        f"{version} (a slot's numbers only go up)"
                    )
                version = number
            new = NewVersion(slot, version, context, model_type, aliases, pin, publish_key,
                              files, sources)  # fmt: skip
            # Forgotten until this commit returns: whatever interrupts it (a failed
            # COMMIT that was durable after all, a KeyboardInterrupt after it) leaves
            # the next commit to read the number from the index.
            self._slot_heads.pop(slot, None)
            self._committed = None
            retired, linked, record = self._commit(conn, new, record_verified)
            self._slot_heads[slot] = (model_type or stored_type, version + 1)
            if record is not None:  # one attribute: no thread pairs a version with another's
                self._committed = (slot, version, record)
            crash_point("committed")
            try:  # the version is committed: what follows must not make this call fail
                if on_committed is not None:
                    on_committed(version)
            except Exception:
                log.exception("slot %d version %d committed; on_committed failed", slot, version)
            try:
                self._warm(slot, version, linked)
                self._retire_files(retired, then=self._prepare_spare_staging)
            except Exception:
                log.exception("slot %d version %d committed; a later chore failed", slot, version)
        return version

    def verified_by_commit(self, slot: int, version: int) -> bool:
        """Whether the last commit, ``version`` of ``slot``, recorded itself verified in its
        own transaction (``record_verified``). Meant for its ``on_committed``."""
        committed = self._committed
        return committed is not None and committed[:2] == (slot, version)

    def committed_record(self, slot: int, version: int) -> AnnouncedRecord | None:
        """:meth:`announced_record` for ``version`` of ``slot``, from what the last commit's
        own transaction wrote when that is the version (no read of the index), else
        read from the index. Meant for its ``on_committed``, which announces it.

        None for a version of more tensors than an announcement's record may describe
        (``MAX_RECORD_TENSORS``): its layout is not decoded only to be dropped."""
        committed = self._committed
        if committed is None or committed[:2] != (slot, version):
            return self.announced_record(slot, version)
        parts = committed[2]
        return None if len(parts[1]) > MAX_RECORD_TENSORS else _announced_record(*parts)

    def _slot_head(self, conn: sqlite3.Connection, slot: int) -> tuple[str | None, int]:
        """The slot's model type and the number its next version gets (1 for a new slot)."""
        head = self._slot_heads.get(slot)
        if head is None:
            row = conn.execute(
                "SELECT model_type, next_version FROM slots WHERE slot = ?", (slot,)
            ).fetchone()
            head = (row[0], row[1]) if row else (None, 1)
        return head

    def _take_spare_staging(self) -> str | None:
        """The empty staging directory prepared after the last commit, if it is ready."""
        with self._spare_lock:
            spare, self._spare_staging = self._spare_staging, None
        return spare

    def _prepare_spare_staging(self) -> None:
        """Create the next commit's staging directory in wal/ (recovery removes a leftover)."""
        with self._spare_lock:
            if self._spare_staging is not None or self._closed:
                return
            spare = str(
                layout.spare_staging_dir(self.root, f"{os.getpid()}-{secrets.token_hex(6)}")
            )
            make_dir(spare, durable=False)
            self._spare_staging = spare

    def _commit(
        self, conn: sqlite3.Connection, new: NewVersion, record_verified: bool = False
    ) -> tuple[list[tuple[int, int]], list[int], RecordParts | None]:
        """Steps 2 to 4 of the commit protocol; returns the versions retention retired,
        the positions of the tensors that were hard-linked rather than written, and,
        when the version's verified record went in with it (``record_verified``), what
        its announcement's record is made of (None otherwise).

        A failure before COMMIT leaves no directory behind and no row. A failed
        COMMIT leaves the version's files in place: its frames may sit in the WAL
        with a commit marker that the next WAL recovery would replay, so they go
        only once a durable write has buried those frames (:meth:`_settle`).
        """
        staging = self._take_spare_staging()
        if staging is None:
            staging = str(layout.wal_dir(self.root) / f"{os.getpid()}-{secrets.token_hex(6)}")
            make_dir(staging, durable=False)
        placed = reached_commit = False
        early = SyncQueue()  # an import's files, each fsynced as soon as it is written
        try:
            with self._settling_transaction(conn, (new.slot, new.version)):
                # Staged inside the transaction, so dedup's lookups share its snapshot
                # instead of each opening one (only this writer takes the write lock).
                tensors, written, linked = self._stage(staging, new, early)
                written += self._stage_files(staging, new.files)
                if new.sources is not None and self.pre_commit_hooks:
                    self._run_hooks_on_staged(staging, new, tensors)
                # The rows go in while the CPU is still warm from staging (after an
                # fsync's sleep the same statements took several times longer); none
                # of them is visible, or durable, before the COMMIT after the fsyncs.
                retired, texts = self._insert_version(conn, new, tensors)
                fsync_all(written, nbytes=staged_bytes(new, tensors))
                early.wait()
                if new.files:
                    fsync_dir(f"{staging}/{layout.FILES_DIR}")
                # The directory's entries, after the files: their journal commit already
                # carries most of it (measured 0.06 ms here, where syncing the version
                # directory beside the slot directory after the rename added 0.08 ms).
                fsync_dir(staging)
                crash_point("staged")
                slot_dir = self._place(staging, new.slot, new.version)
                placed = True
                crash_point("renamed")
                fsync_dir(slot_dir)  # the version directory's entry in it
                recorded = record_verified and self._insert_verified(
                    conn, new.slot, new.version, [(row[0], row[4] + row[5]) for row in tensors]
                )
                record = (texts, *recorded) if recorded else None
                crash_point("in_transaction")
                reached_commit = True
        except BaseException:
            early.abandon()
            self._slot_dirs.discard(new.slot)  # the next commit makes sure it exists again
            if not reached_commit:  # no COMMIT ran: nothing of this version can come back
                # Only what this call made: a directory of that number that it did not
                # rename into place belongs to a version committed before it.
                remove_tree(layout.version_dir(self.root, new.slot, new.version)
                            if placed else staging)  # fmt: skip
            raise
        return retired, linked, record

    def _place(self, staging: str, slot: int, version: int) -> str:
        """Step 3: rename the staging directory (its files and entries already
        durable) into place; returns the slot directory, whose new entry the
        caller makes durable.

        The staging directory's own creation and its removal from wal/ need not
        be durable: recovery deletes whatever wal/ holds.
        """
        slot_dir = layout.slot_dir_str(self._root_str, slot)
        if slot not in self._slot_dirs:
            # Its entry in slots/ is made durable once per writer, not only when this
            # mkdir creates it: a writer killed between a mkdir and its fsync leaves a
            # directory whose entry nothing else would ever sync.
            make_dir(slot_dir, durable=False)
            mode = os.lstat(slot_dir).st_mode
            if not stat.S_ISDIR(mode):  # a link would take this version out of the store
                raise StorageError(
                    f"{slot_dir} is {describe_entry(mode)}, not a directory: slot {slot} "
                    "cannot be written until it is removed (see `ctxstore verify`)"
                )
            fsync_dir(os.path.dirname(slot_dir))
            self._slot_dirs.add(slot)
        rename_dir(staging, layout.version_dir_str(self._root_str, slot, version))
        return slot_dir

    def _insert_version(
        self, conn: sqlite3.Connection, new: NewVersion, tensors: list[TensorRow]
    ) -> tuple[list[tuple[int, int]], tuple[str, str, bytes]]:
        """Step 4's rows, inside the caller's transaction: the version, its tensors, the
        slot's current pointer and aliases, and retention's deletions (one synchronous
        COMMIT per commit; their files are unlinked after it). Returns those retired,
        and the config text, metadata text and manifest the version's row holds.
        """
        slot, version, context, model_type, aliases, pin, publish_key, files, _ = new
        now = self._clock()
        conn.execute(
            "INSERT INTO slots(slot, model_type, current_version, next_version, "
            "created_at, updated_at) VALUES (?1, ?2, ?3, ?3 + 1, ?4, ?4) "
            "ON CONFLICT(slot) DO UPDATE SET current_version = ?3, next_version = ?3 + 1, "
            "model_type = COALESCE(?2, model_type), updated_at = ?4",
            (slot, model_type, version, now),
        )
        texts = (dump_json(context.config), dump_json(context.metadata), pack_manifest(tensors))
        conn.execute(
            "INSERT INTO versions(slot, version, created_at, config, metadata, "
            "n_tensors, nbytes, pinned, manifest, publish_key) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                slot,
                version,
                now,
                texts[0],
                texts[1],
                len(tensors),
                sum(row[5] for row in tensors),
                int(pin),
                texts[2],
                publish_key,
            ),
        )
        conn.executemany(
            "INSERT INTO tensors(slot, version, position, name, dtype, shape, "
            "data_offset, nbytes, checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(slot, version, *row) for row in tensors],
        )
        if files:
            conn.executemany(
                "INSERT INTO version_files(slot, version, name, size, checksum) "
                "VALUES (?, ?, ?, ?, ?)",
                [(slot, version, n, len(d), checksum_parts((d,))) for n, d in files.items()],
            )
        if aliases:
            conn.executemany(
                "INSERT INTO aliases(slot, name, version) VALUES (?, ?, ?) "
                "ON CONFLICT(slot, name) DO UPDATE SET version = excluded.version",
                [(slot, alias, version) for alias in aliases],
            )
        retired = self._retain(slot)
        if retired:
            conn.executemany(DELETE_VERSION_SQL, retired)
        return retired, texts

    def _warm(self, slot: int, version: int, positions: list[int]) -> None:
        """Ask the kernel to read these files of the new version ahead, so readers map warm
        pages: the hard-linked ones, whose pages may have left the cache since they were
        written (a file this commit wrote went through the page cache)."""
        for position in positions:
            path = layout.tensor_path_str(self._root_str, slot, version, position)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # advisory only; verify reports missing files
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)


def _announced_record(
    texts: tuple[str, str, bytes], identities: list[Identity], boot: str | None
) -> AnnouncedRecord | None:
    """What :meth:`~.reads.StoreReads.announced_record` reads back for a version whose row
    holds ``texts`` (config, metadata, manifest) and whose verified record holds
    ``identities`` and ``boot``, made from them without a read of the index."""
    if boot is None:
        return None
    config, metadata, manifest = texts
    return config, metadata, layout_entries(manifest), tuple(n for i in identities for n in i)


def staged_bytes(new: NewVersion, tensors: list[TensorRow]) -> int:
    """The bytes a version's staged files hold (tensors with their headers, extra files):
    what :func:`~.durable.fsync_all` weighs to sync them in this thread or on its pool."""
    return sum(row[4] + row[5] for row in tensors) + sum(len(d) for d in new.files.values())
