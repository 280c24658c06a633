"""The writer's integrity records and repair: a version's check recorded (verified with
its files' identities, or damaged), the newest intact version found, and every slot
whose current version is damaged moved back to its newest intact one.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import (
    IntegrityError,
    NotFoundError,
)
from ..integrity import (
    DAMAGED,
    VERIFIED,
    Identity,
    boot_id,
    pack_identities,
    stat_file,
)
from ..records import Problem
from ..validation import (
    check_slot,
    check_version,
)
from . import layout
from .pointers import StorePointers

log = logging.getLogger("ctxstore.store")


class StoreRepair(StorePointers):
    """record_check, mark_damaged, newest_intact, repair."""

    def record_check(self, slot_id: int, version: int, *, rehash: bool = True) -> list[Problem]:
        """Hash one version (:meth:`check_version`; ``rehash=False``: a version this
        writer just committed, see there) and record the outcome in the index:
        ``verified`` with its files' identities and this boot, or ``damaged``.

        Writer only. The row is written without an fsync of its own (the next
        durable commit carries it): lost in a crash, it only makes readers hash.
        """
        problems, identities = self.check_version(slot_id, version, rehash=rehash)
        if problems:
            self.mark_damaged(slot_id, version, "; ".join(map(str, problems)))
        else:
            files = pack_identities(identities)
            self._write_check(check_slot(slot_id), version, VERIFIED, (boot_id(), files, None))
        return problems

    def _insert_verified(
        self, conn: sqlite3.Connection, slot: int, version: int, files: Sequence[tuple[int, int]]
    ) -> tuple[list[Identity], str | None] | None:
        """Inside a new version's transaction, once its files are in place: record it
        verified with each tensor file's identity, as ``record_check(rehash=False)``
        would after the COMMIT (one transaction fewer, and the record is durable with
        the version). ``files``: (position, size) of each tensor file. Returns the
        identities and the boot id recorded; None, nothing recorded, when a file is
        not as staged: the check after the COMMIT then says what is wrong."""
        identities: list[Identity] = []
        for position, size in files:
            path = layout.tensor_path_str(self._root_str, slot, version, position)
            try:
                identity = stat_file(path)
            except OSError:
                return None
            if identity[0] != size:
                return None
            identities.append(identity)
        boot = boot_id()
        conn.execute(
            "INSERT OR REPLACE INTO version_checks(slot, version, state, checked_at, boot_id, "
            "files, detail) VALUES (?, ?, ?, ?, ?, ?, NULL)",
            (slot, version, VERIFIED, self._clock(), boot, pack_identities(identities)),
        )
        return identities, boot

    def mark_damaged(self, slot_id: int, version: int, detail: str) -> None:
        """Record ``version`` damaged: readers refuse it without hashing, verify names it.

        Writer only; the mark goes when retention removes the version.
        """
        number = check_version(version)
        self._write_check(check_slot(slot_id), number, DAMAGED, (None, None, detail[:2000]))

    def _write_check(
        self,
        slot: int,
        version: int,
        state: str,
        found: tuple[str | None, bytes | None, str | None],
    ) -> None:
        """Write one version_checks row: ``found`` is (boot id, file identities, detail)."""
        with self._write_lock:
            conn = self._settled_writer_conn()
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: no fsync for this COMMIT
            try:
                with self._settling_transaction(conn):
                    if not self._version_recorded(conn, slot, version):
                        raise NotFoundError(f"slot {slot} has no version {version}")
                    conn.execute(
                        "INSERT OR REPLACE INTO version_checks(slot, version, state, checked_at, "
                        "boot_id, files, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (slot, version, state, self._clock(), *found),
                    )
            finally:
                conn.execute("PRAGMA synchronous = FULL")

    def newest_intact(self, slot_id: int, below: int) -> int | None:
        """The newest version of the slot older than ``below`` whose files hash right
        (recorded ``verified`` as it is checked; a damaged one is recorded so). Writer only."""
        slot = check_slot(slot_id)
        damaged = self.damaged_versions(slot)
        for info in reversed(self.list_versions(slot)):
            if info.version >= below or (slot, info.version) in damaged:
                continue
            try:
                if not self.record_check(slot, info.version):
                    return info.version
            except NotFoundError:  # retired meanwhile
                continue
        return None

    def repair(
        self, slot_id: int | None = None, *, problems: list[Problem] | None = None
    ) -> list[Repair]:
        """Move every slot whose current version is damaged back to its newest intact one.

        Damaged versions stay where they are (``verify`` keeps naming them) but
        stop being served. A slot with no intact version is reported and left.
        ``problems``: what a ``verify(slot_id)`` just found (default: verify now);
        a slot whose current version changed since is left as it is. Nothing is
        deleted. The caller announces the moves (the daemon does; see ``ctxstore
        verify``).
        """
        if problems is None:
            problems = self.verify(slot_id)
        damaged: dict[int, set[int]] = {}
        for problem in problems:
            if problem.slot is not None and problem.version is not None:
                damaged.setdefault(problem.slot, set()).add(problem.version)
        repairs: list[Repair] = []
        for slot, bad in sorted(damaged.items()):
            if slot_id is not None and slot != slot_id:
                continue
            try:
                current = self.current_version(slot)
            except IntegrityError as exc:  # not even a number: verify says so, a human decides
                log.warning("repair leaves slot %d: %s", slot, exc)
                continue
            if current is None or current not in bad:
                continue
            numbers = self._query(
                "SELECT version FROM versions WHERE slot = ? AND typeof(version) = 'integer' "
                "AND version < ? ORDER BY version",
                (slot, current),
            )
            target = max((v for (v,) in numbers if v not in bad), default=None)
            if target is None:
                repairs.append(Repair(slot, current, None, sorted(bad)))
                continue
            self.rollback(slot, target)
            repairs.append(Repair(slot, current, target, sorted(bad)))
        return repairs


@dataclass(frozen=True, slots=True)
class Repair:
    """What ``repair`` did to one slot: its pointer moved (or could not), and why."""

    slot: int
    from_version: int
    to_version: int | None
    damaged: list[int]
