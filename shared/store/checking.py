"""Checking a store against its index: ``verify`` (rows against files and checksums),
one version's files hashed (``check_version``), and the recorded outcomes read back.

Reads only: a writer records what it found (``repair.py``); a read-only view can
verify a store beside a running daemon.
"""

from __future__ import annotations

import sqlite3
import time

from ..errors import (
    IntegrityError,
    NotFoundError,
)
from ..integrity import (
    DAMAGED,
    VERIFIED,
    Identity,
    boot_id,
    hash_file,
    stat_file,
)
from ..records import Problem
from ..validation import (
    check_slot,
    check_version,
)
from ..verify import verify_store
from . import layout
from .decode import read_plan, require_slot
from .lock import writer_may_be_running
from .reads import StoreReads

#: what a writer's passing states look like to verify: checked again before reporting
PASSING_KINDS = frozenset({"orphan", "missing_file", "missing_version_dir"})
#: seconds between those checks, and the most verify waits for them to clear
VERIFY_SETTLE_S, VERIFY_SETTLE_MAX_S = 0.25, 10.0


class StoreChecks(StoreReads):
    """verify, check_version and the recorded checks: reads that check the store."""

    def _wait_background(self) -> None:
        """Block until work this process has queued on the store's files is done (the
        writer's retired directories; a view queues none)."""

    def verify(self, slot_id: int | None = None, *, rehash: bool = True) -> list[Problem]:
        """Re-check rows against files and checksums; an empty list means all is well.
        NotFoundError for a slot the store knows nothing of (no row, no directory).

        A writer at work (a daemon beside a read-only verify, or this store's own
        commits) shows passing states: a version directory exists before its row
        commits and after its row is retired, until its files are deleted (about
        0.25 s per GiB). So while a writer may be at work, the problems such states
        look like (orphan, missing file or directory) are checked again every
        ``VERIFY_SETTLE_S`` for up to ``VERIFY_SETTLE_MAX_S``; those that persist are
        reported. Every other kind of damage is reported at once.
        """
        slot = None if slot_id is None else check_slot(slot_id)
        if slot is not None and not layout.slot_dir(self.root, slot).exists():
            with self._read_snapshot() as conn:  # a slot with no directory but a row is damage
                require_slot(conn, slot)
        self._wait_background()  # retired directories awaiting the reaper are not orphans
        problems = self._verify_once(slot, rehash)
        passing = [p for p in problems if p.kind in PASSING_KINDS and p.slot is not None]
        quiet = self.readonly and not writer_may_be_running(layout.lock_path(self.root))
        if not passing or quiet:
            return problems
        settled = [p for p in problems if p not in passing]
        deadline = time.monotonic() + VERIFY_SETTLE_MAX_S
        while passing and time.monotonic() < deadline:
            time.sleep(VERIFY_SETTLE_S)
            self._wait_background()
            again: dict[tuple[object, ...], Problem] = {}
            for s in sorted({p.slot for p in passing if p.slot is not None}):
                for problem in self._verify_once(s, False):  # these kinds need no hashing
                    again[_problem_key(problem)] = problem
            passing = [again[key] for p in passing if (key := _problem_key(p)) in again]
        return settled + passing

    def _verify_once(self, slot: int | None, rehash: bool) -> list[Problem]:
        try:
            with self._read_snapshot() as conn:
                return verify_store(self.root, conn, slot, rehash=rehash)
        except IntegrityError as exc:  # SQLite cannot read the index: that is the finding
            if not isinstance(exc.__cause__, sqlite3.DatabaseError):
                raise
            return [Problem("index_damaged", f"index unreadable: {exc.__cause__}")]

    def check_version(
        self, slot_id: int, version: int, *, rehash: bool = True
    ) -> tuple[list[Problem], list[Identity]]:
        """Hash one version's files against their records: the problems found, and each
        file's identity as it was hashed (position order; complete only when all is well).

        Reads with ``pread`` (a file truncated meanwhile cannot fault this process),
        refuses symlinks and non-regular files. NotFoundError for an unknown version.
        ``rehash=False`` checks each file's type and size and takes its identity
        without reading it: for a version this writer has just committed, whose
        every file it hashed as it wrote it (or compared byte for byte with the
        stored file it linked).
        """
        slot, number = check_slot(slot_id), check_version(version)
        rows = self._query(
            "SELECT manifest FROM versions WHERE slot = ? AND version = ?", (slot, number)
        )
        if not rows:
            raise NotFoundError(f"slot {slot} has no version {number}")
        blob = rows[0][0]
        problems: list[Problem] = []
        identities: list[Identity] = []
        for position, (name, _, _, offset, nbytes, checksum) in enumerate(read_plan(blob)[0]):
            path = layout.tensor_path_str(self._root_str, slot, number, position)
            try:
                digest, identity = hash_file(path) if rehash else (checksum, stat_file(path))
            except FileNotFoundError:
                found: tuple[str, str] | None = ("missing_file", f"{path} does not exist")
            except OSError as exc:
                found = ("unreadable_file", f"{path}: {exc}")
            else:
                identities.append(identity)
                found = None
                if identity[0] != offset + nbytes:
                    found = ("wrong_size", f"{path} has {identity[0]} bytes, the index says "
                             f"{offset + nbytes}")  # fmt: skip
                elif digest != checksum:
                    found = ("checksum_mismatch", f"{path} does not match its recorded xxh3-128")
            if found is not None:
                problems.append(Problem(*found, slot, number, name))
        return problems, identities

    def damaged_versions(self, slot_id: int | None = None) -> dict[tuple[int, int], str]:
        """(slot, version) -> what was found, for every version recorded damaged."""
        slot = None if slot_id is None else check_slot(slot_id)
        rows = self._query(
            "SELECT slot, version, detail FROM version_checks WHERE state = ? "
            "AND (?2 IS NULL OR slot = ?2) ORDER BY slot, version",
            (DAMAGED, slot),
        )
        return {(s, v): detail or "" for s, v, detail in rows}

    def unverified_current(self) -> list[tuple[int, int]]:
        """Each slot's current version that has no ``verified`` record of this boot (and is
        not recorded damaged): what readers would hash, unless a writer hashes it first."""
        rows = self._query(
            "SELECT s.slot, s.current_version FROM slots s LEFT JOIN version_checks c "
            "ON c.slot = s.slot AND c.version = s.current_version "
            "WHERE s.current_version IS NOT NULL AND (c.state IS NULL OR "
            "(c.state = ? AND (c.boot_id IS NULL OR c.boot_id IS NOT ?))) ORDER BY s.slot",
            (VERIFIED, boot_id()),
        )
        return [(slot, version) for slot, version in rows]


def _problem_key(problem: Problem) -> tuple[object, ...]:
    """The same problem in two passes of verify (its wording may differ)."""
    return (problem.kind, problem.slot, problem.version, problem.tensor)
