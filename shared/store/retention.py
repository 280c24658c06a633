"""Retention: which versions go (the newest ``retention``, the current, pinned, aliased
and reader-held ones stay), their rows deleted in a COMMIT, their files handed to the
reaper thread after it.
"""

from __future__ import annotations

from collections.abc import Callable

from ..faults import crash_point
from ..validation import (
    check_slot,
)
from . import layout
from .reaper import Reaper
from .writing import StoreWriting


class StoreRetention(StoreWriting):
    """apply_retention, and the retirement of versions a commit or retention removed."""

    def apply_retention(self, slot_id: int | None = None) -> list[tuple[int, int]]:
        """Remove versions beyond the newest ``retention`` that nothing else keeps."""
        with self._write_lock:
            conn = self._settled_writer_conn()
            if slot_id is None:
                slots = [row[0] for row in conn.execute("SELECT slot FROM slots")]
            else:
                slots = [check_slot(slot_id)]
            with self._settling_transaction(conn):
                doomed = [pair for slot in slots for pair in self._retain(slot)]
                conn.executemany(DELETE_VERSION_SQL, doomed)
            self._retire_files(doomed)
        return doomed

    def _retain(self, slot: int) -> list[tuple[int, int]]:
        """The versions of ``slot`` retention removes now (a query; the caller deletes them).

        Kept: the newest ``retention``, the current one, pinned and aliased ones,
        and whatever a connected reader holds. One query: the cutoff is the
        ``retention``-th newest version (none while the slot has fewer), found
        in O(retention) on the primary key. A version number that is no integer (a
        tampered index) is neither counted nor retired: ``verify`` names it.
        """
        candidates = [
            version
            for (version,) in self._writer_conn().execute(
                "SELECT v.version FROM versions v JOIN slots s ON s.slot = v.slot "
                "WHERE v.slot = ?1 AND typeof(v.version) = 'integer' AND v.version < ("
                "SELECT version FROM versions WHERE slot = ?1 AND typeof(version) = 'integer' "
                "ORDER BY version DESC LIMIT 1 OFFSET ?2) "
                "AND v.pinned = 0 AND v.version != s.current_version AND NOT EXISTS ("
                "SELECT 1 FROM aliases a WHERE a.slot = ?1 AND a.version = v.version)",
                (slot, self.retention - 1),
            )
            if type(version) is int  # what names a directory to delete is checked twice
        ]
        if candidates and self.protected_versions:  # asked only when something would go
            protected = self.protected_versions(slot)
            candidates = [version for version in candidates if version not in protected]
        return [(slot, version) for version in candidates]

    def _retire_files(
        self, doomed: list[tuple[int, int]], *, then: Callable[[], object] | None = None
    ) -> None:
        """After the COMMIT that removed their rows: hand their directories to the reaper,
        with ``then`` to run after them (one handover: each wakes the reaper thread).

        Deleting them here would make every commit wait: an unlink needs the
        filesystem journal that the commit's own fsyncs just engaged (0.2 ms for
        a 4 KiB version here), and freeing a large version's blocks and cached
        pages takes 0.25 s per GiB. A committed version's number is never reused, so the
        directories can wait where they are; a crash before the reaper gets to
        them leaves orphans that recovery deletes, and a reader still mapping
        the files keeps its pages.
        """
        if doomed:
            crash_point("retiring")
        if doomed or then is not None:
            dirs = [f"{layout.SLOTS_DIR}/{slot}/{v}" for slot, v in doomed]
            self._reaper_thread().remove(self._root_str, dirs, then=then)

    def _reaper_thread(self) -> Reaper:
        reaper = self._reaper
        if reaper is None or not reaper.usable:
            reaper = self._reaper = Reaper()
        return reaper

    def wait_background(self) -> None:
        """Block until the writer's background chores are done: deleting the files of the
        versions retired so far, preparing the next staging directory."""
        if self._reaper is not None:
            self._reaper.drain()

    def _wait_background(self) -> None:
        self.wait_background()


DELETE_VERSION_SQL = "DELETE FROM versions WHERE slot = ? AND version = ?"
