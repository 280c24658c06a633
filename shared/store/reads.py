"""The store's reads: resolve, load_context (mapped zero-copy), metadata, files, listings.

:class:`StoreReads` is what every store answers, the read-only view and the writer
alike; it writes nothing (docs/architecture.md, "What a reader may touch").
"""

from __future__ import annotations

import os
from types import MappingProxyType
from typing import Any

from ..checksum import checksum_parts
from ..context import Array, Context
from ..errors import (
    IntegrityError,
    NotFoundError,
)
from ..integrity import (
    DAMAGED,
    VERIFIED,
    boot_id,
    unpack_identities,
)
from ..records import ContextMetadata, FileInfo, SlotInfo, VersionInfo
from ..validation import (
    check_label,
    check_slot,
    check_version,
)
from ..verify import real_dir_problem, recorded_version
from ..versionfiles import check_file_name
from . import layout
from .connections import StoreConnections
from .decode import (
    METADATA_SQL,
    RECORD_MEMO_MAX_LEN,
    RECORD_SQL,
    AnnouncedRecord,
    ReadPlan,
    VersionRef,
    announced_plan,
    check_mapped_headers,
    load_json,
    mapped_identities,
    read_extra_file,
    read_plan,
    require_slot,
    resolve_version,
    same_identities,
    tensor_table,
    verify_mapped,
)
from .manifest import layout_entries
from .npyfile import (
    map_arrays,
)

#: how often load_context resolves a moving reference again after losing a race with retention
_LOAD_ATTEMPTS = 8
#: the version committed with a publish key (the writer asks on its own connection)
PUBLISH_KEY_SQL = "SELECT slot, version FROM versions WHERE publish_key = ?"


class StoreReads(StoreConnections):
    """Reads of one store: versions, their contexts, metadata, files and listings."""

    def resolve(self, slot_id: int, version: VersionRef = None) -> int:
        """The version number ``version`` names: None = current, 'latest', an alias or an int."""
        slot = check_slot(slot_id)
        with self._read_snapshot() as conn:
            return resolve_version(conn, slot, version)

    def load_context(
        self,
        slot_id: int,
        version: VersionRef = None,
        *,
        verify: bool = False,
        trust_verified: bool = False,
    ) -> Context:
        """The context at ``version`` (default: current), its arrays mapped read-only.

        File sizes are always checked against the record. With ``verify`` every
        file is also re-hashed against its recorded xxh3-128 (about 60 ms a GiB,
        and it reads the pages in), so a flipped byte is an IntegrityError, never
        wrong numbers: readers verify each version once, when they adopt it. A
        version recorded damaged (:meth:`mark_damaged`) is then an IntegrityError
        without hashing. ``trust_verified`` (with ``verify``): skip the hash when a
        writer recorded, during this boot, that it hashed these very files, and
        each mapped file's identity (size, mtime_ns, inode, device; one ``fstat``)
        is still the recorded one; the caller says whether a daemon vouches now.

        Retention may retire the version between the index read and the mapping of
        its files. A reference that moves (current, latest, an alias) is then
        resolved again; a numbered version that was retired is NotFoundError.
        """
        slot = check_slot(slot_id)
        moving = not isinstance(version, int) and not (
            isinstance(version, str) and version.isdigit()
        )
        for _ in range(_LOAD_ATTEMPTS if moving else 1):
            number, context = self._load_once(slot, version, verify, trust_verified)
            if context is not None:
                return context
        raise NotFoundError(f"slot {slot} version {number} was retired")

    def _load_once(
        self, slot: int, version: VersionRef, verify: bool, trust_verified: bool = False
    ) -> tuple[int, Context | None]:
        """The resolved version number and its context, or None when it was retired meanwhile."""
        row_number, *record = self._version_row(RECORD_SQL, slot, version)
        number = recorded_version(row_number, slot)  # it names the directory to read
        manifest, plan = read_plan(record[2])
        state, recorded_boot, recorded_files = record[3], record[4], record[5]
        if verify and state == DAMAGED:
            raise IntegrityError(
                f"slot {slot} version {number} is recorded damaged: {record[6]} "
                "(run `ctxstore verify`)"
            )
        vouched = (
            verify
            and trust_verified
            and state == VERIFIED
            and recorded_boot is not None
            and recorded_boot == boot_id()
        )
        stats: list[os.stat_result] | None = [] if vouched else None
        try:
            weights = self._map_tensors(slot, number, plan, stats)
        except NotFoundError:
            if self._version_exists(slot, number):
                raise IntegrityError(
                    f"slot {slot} version {number} is recorded but its files are missing"
                ) from None
            return number, None
        if verify:
            identities = None if stats is None else mapped_identities(stats)
            if identities is not None and same_identities(identities, recorded_files):
                check_mapped_headers(slot, number, manifest, weights, identities)
                self.versions_trusted += 1
            else:
                self.versions_hashed += 1
                verify_mapped(slot, number, manifest, weights)
        return number, Context._trusted(
            MappingProxyType(weights),
            load_json(record[0], "config"),
            load_json(record[1], "metadata"),
            slot,
            number,
        )

    def announced_record(self, slot: int, version: int) -> AnnouncedRecord | None:
        """What the writer tells readers with its announcement of ``version`` so that they
        map it without reading the index: its config and metadata texts, its tensors
        ``(name, dtype, shape, offset, nbytes)`` and its files' identities, flat (four
        integers each), as recorded verified during this boot; None unless so recorded."""
        rows = self._query(RECORD_SQL + "?2", (slot, version))
        if not rows:
            return None
        _, config, metadata, manifest, state, recorded_boot, files, _ = rows[0]
        identities = unpack_identities(files)
        if (
            state != VERIFIED
            or recorded_boot is None
            or recorded_boot != boot_id()
            or identities is None
            or type(manifest) is not bytes
        ):
            return None
        tensors = layout_entries(manifest)
        if len(identities) != len(tensors):
            return None
        return config, metadata, tensors, tuple(n for identity in identities for n in identity)

    def load_announced(
        self,
        slot: int,
        version: int,
        record: tuple[str, str, Any, Any],
        *,
        verify: bool = False,
        trust_verified: bool = False,
    ) -> Context | None:
        """``version`` of ``slot`` mapped from its announcement's record (see
        :meth:`announced_record`) without reading the index; None when the record
        cannot spare the index (unless the caller verifies and a daemon vouches,
        ``verify`` and ``trust_verified``, the record is nobody's word; or a mapped
        file's identity is not the one the writer vouched for): the caller loads it
        from the index, which hashes what it must.

        The record is the daemon's word, checked as strictly as the index's: every
        tensor entry as a stored manifest's (IntegrityError otherwise), the files
        are the store's own (named by position under the version's directory, opened
        as :meth:`load_context` opens them), each mapped file's ``fstat`` (or, for a
        file served from a map already held, its path's ``lstat``: :mod:`.held`) must
        be the identity vouched for, and the .npy headers are compared with the entries.
        NotFoundError when the version's files are gone (retired).
        """
        if not (verify and trust_verified):
            return None  # unvouched, the record's texts and layout would be nobody's word
        config, metadata, tensors, files = record
        manifest, plan = announced_plan(tensors)
        prefix = layout.version_prefix_str(self._root_str, slot, version)
        held = self.held_maps
        mapped = held.map_vouched(prefix, plan.specs, files)
        if mapped is None:
            return None
        arrays, identities, new = mapped
        weights = dict(zip(plan.names, arrays, strict=True))
        check_mapped_headers(slot, version, manifest, weights, identities)
        for key, index in new:
            held.keep(key, arrays[index])
        self.versions_trusted += 1
        return Context._trusted(
            MappingProxyType(weights),
            load_json(config, "config", RECORD_MEMO_MAX_LEN),
            load_json(metadata, "metadata", RECORD_MEMO_MAX_LEN),
            slot,
            version,
        )

    def _map_tensors(
        self,
        slot: int,
        version: int,
        plan: ReadPlan,
        stats: list[os.stat_result] | None = None,
    ) -> dict[str, Array]:
        prefix = layout.version_prefix_str(self._root_str, slot, version)
        return dict(zip(plan.names, map_arrays(prefix, plan.specs, stats), strict=True))

    def _version_exists(self, slot: int, version: int) -> bool:
        row = (
            self._reader()
            .execute("SELECT 1 FROM versions WHERE slot = ? AND version = ?", (slot, version))
            .fetchone()
        )
        return row is not None

    def publish_key_version(self, key: str) -> tuple[int, int] | None:
        """(slot, version) committed with publish key ``key``, while retention keeps it."""
        rows = self._query(PUBLISH_KEY_SQL, (key,))
        return (rows[0][0], rows[0][1]) if rows else None

    def current_version(self, slot_id: int) -> int | None:
        """The slot's current version, or None when the slot has none."""
        row = (
            self._reader()
            .execute("SELECT current_version FROM slots WHERE slot = ?", (check_slot(slot_id),))
            .fetchone()
        )
        return None if row is None or row[0] is None else recorded_version(row[0], slot_id)

    def current_versions(self) -> dict[int, int]:
        """Every slot's current version (the daemon's snapshot for the version table)."""
        rows = self._query(
            "SELECT slot, current_version FROM slots WHERE current_version IS NOT NULL"
        )
        return {slot: recorded_version(version, slot) for slot, version in rows}

    def _version_row(self, sql: str, slot: int, version: VersionRef) -> tuple[Any, ...]:
        """The row ``sql`` (ending in "v.version = ") selects for ``version`` of ``slot``.

        The current or a numbered version is one statement, consistent without a
        snapshot; aliases and ``latest`` resolve first, in the same read snapshot.
        """
        if isinstance(version, str) and version.isdigit():
            version = int(version)
        if version is None or version == "current":
            rows = self._query(sql + "s.current_version", (slot,))
        elif isinstance(version, int):
            rows = self._query(sql + "?2", (slot, check_version(version)))
        else:
            with self._read_snapshot() as conn:
                number = resolve_version(conn, slot, version)
                rows = conn.execute(sql + "?2", (slot, number)).fetchall()
        if not rows:
            with self._read_snapshot() as conn:  # say precisely what is missing
                number = resolve_version(conn, slot, version)
            raise NotFoundError(f"slot {slot} has no version {number}")
        row: tuple[Any, ...] = rows[0]
        return row

    def get_metadata(
        self, slot_id: int, version: VersionRef = None, *, tensors: bool = True
    ) -> ContextMetadata:
        """A version's model type, config, metadata and tensor table; opens no array file.

        The current version or a numbered one is one SQL statement; aliases and
        ``latest`` resolve first, in the same read snapshot.
        """
        slot = check_slot(slot_id)
        row = self._version_row(METADATA_SQL, slot, version)
        number, model_type, current, created, config, metadata, pinned, aliases, blob = row
        number = recorded_version(number, slot)
        current = None if current is None else recorded_version(current, slot)
        return ContextMetadata(
            slot=slot,
            version=number,
            model_type=model_type,
            current_version=current,
            created_at=created,
            config=load_json(config, "config"),
            metadata=load_json(metadata, "metadata"),
            pinned=bool(pinned),
            aliases=tuple(aliases.split(",")) if aliases else (),
            tensors=tensor_table(blob) if tensors else None,
        )

    def list_files(self, slot_id: int, version: VersionRef = None) -> tuple[FileInfo, ...]:
        """The extra files of a version (default: current), by name."""
        slot = check_slot(slot_id)
        with self._read_snapshot() as conn:
            number = resolve_version(conn, slot, version)
            rows = conn.execute(
                "SELECT name, size, checksum FROM version_files WHERE slot = ? AND version = ? "
                "ORDER BY name",
                (slot, number),
            ).fetchall()
        return tuple(FileInfo(*row) for row in rows)

    def read_file(self, slot_id: int, version: VersionRef, name: str) -> bytes:
        """The bytes of extra file ``name`` of a version (None: current), checked against its
        recorded size and xxh3-128: damage is an IntegrityError, never wrong bytes."""
        slot = check_slot(slot_id)
        check_file_name(name)
        with self._read_snapshot() as conn:
            number = resolve_version(conn, slot, version)
            row = conn.execute(
                "SELECT size, checksum FROM version_files WHERE slot = ? AND version = ? "
                "AND name = ?",
                (slot, number, name),
            ).fetchone()
        if row is None:
            raise NotFoundError(f"slot {slot} version {number} has no file {name!r}")
        size, checksum = row
        number = recorded_version(number, slot)
        where = f"slot {slot} version {number} file {name!r}"
        why = real_dir_problem(self.root, slot, number)
        if why is not None:
            raise IntegrityError(f"{where}: {why} (run `ctxstore verify`)")
        data = read_extra_file(layout.version_dir_str(self._root_str, slot, number), name,
                                size, where)  # fmt: skip
        if len(data) != size or checksum_parts((data,)) != checksum:
            raise IntegrityError(
                f"{where} does not match its recorded size and checksum (run `ctxstore verify`)"
            )
        return data

    def list_slots(self, model_type: str | None = None, group: str | None = None) -> list[SlotInfo]:
        """Every slot with versions, optionally only one model type and/or one group."""
        if model_type is not None:
            check_label(model_type, "model type")
        if group is not None:
            check_label(group, "group")
        rows = self._query(
            "SELECT s.slot, s.model_type, s.current_version, "
            "(SELECT MAX(version) FROM versions v WHERE v.slot = s.slot), "
            "(SELECT COUNT(*) FROM versions v WHERE v.slot = s.slot), s.created_at, s.updated_at "
            "FROM slots s WHERE (?1 IS NULL OR s.model_type = ?1) AND (?2 IS NULL OR EXISTS "
            "(SELECT 1 FROM group_members g WHERE g.name = ?2 AND g.slot = s.slot)) "
            "ORDER BY s.slot",
            (model_type, group),
        )
        return [SlotInfo(*row) for row in rows]

    def list_versions(self, slot_id: int) -> list[VersionInfo]:
        """The slot's stored versions, oldest first; NotFoundError for an unknown slot."""
        slot = check_slot(slot_id)
        with self._read_snapshot() as conn:
            require_slot(conn, slot)
            aliases: dict[int, list[str]] = {}
            for name, version in conn.execute(
                "SELECT name, version FROM aliases WHERE slot = ? ORDER BY name", (slot,)
            ):
                aliases.setdefault(version, []).append(name)
            rows = conn.execute(
                "SELECT version, created_at, n_tensors, nbytes, pinned FROM versions "
                "WHERE slot = ? ORDER BY version",
                (slot,),
            ).fetchall()
        return [
            VersionInfo(slot, v, created, n, size, bool(pinned), tuple(aliases.get(v, ())))
            for v, created, n, size, pinned in rows
        ]

    def get_aliases(self, slot_id: int) -> dict[str, int]:
        """The slot's aliases (``latest`` included) and the versions they name."""
        slot = check_slot(slot_id)
        with self._read_snapshot() as conn:
            require_slot(conn, slot)
            aliases = dict(
                conn.execute(
                    "SELECT name, version FROM aliases WHERE slot = ? ORDER BY name", (slot,)
                )
            )
            aliases["latest"] = resolve_version(conn, slot, "latest")
        return aliases
