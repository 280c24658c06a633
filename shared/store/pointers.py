"""The writer's pointer moves: aliases, rollback of the current version, pins."""

from __future__ import annotations

from ..errors import (
    NotFoundError,
)
from ..validation import (
    check_alias,
    check_slot,
)
from ..verify import recorded_version
from .decode import VersionRef, resolve_version
from .retention import StoreRetention


class StorePointers(StoreRetention):
    """set_alias, delete_alias, rollback, pin, unpin: one small transaction each."""

    def set_alias(self, slot_id: int, name: str, version: VersionRef) -> int:
        """Point alias ``name`` at ``version``; returns the version number."""
        slot, alias = check_slot(slot_id), check_alias(name)
        with self._transaction() as conn:
            number = resolve_version(conn, slot, version)
            conn.execute(
                "INSERT INTO aliases(slot, name, version) VALUES (?, ?, ?) "
                "ON CONFLICT(slot, name) DO UPDATE SET version = excluded.version",
                (slot, alias, number),
            )
        return number

    def delete_alias(self, slot_id: int, name: str) -> None:
        slot, alias = check_slot(slot_id), check_alias(name)
        with self._transaction() as conn:
            cursor = conn.execute("DELETE FROM aliases WHERE slot = ? AND name = ?", (slot, alias))
            if cursor.rowcount == 0:
                raise NotFoundError(f"slot {slot} has no alias {alias!r}")

    def rollback(self, slot_id: int, version: VersionRef = None) -> int:
        """Move the current pointer to ``version`` (default: the one before current)."""
        slot = check_slot(slot_id)
        with self._transaction() as conn:
            if version is None:
                current = resolve_version(conn, slot, None)
                row = conn.execute(
                    "SELECT MAX(version) FROM versions WHERE slot = ? AND version < ?",
                    (slot, current),
                ).fetchone()
                if row[0] is None:
                    raise NotFoundError(f"slot {slot} has no version older than {current}")
                number = recorded_version(row[0], slot)
            else:
                number = resolve_version(conn, slot, version)
            conn.execute(
                "UPDATE slots SET current_version = ?, updated_at = ? WHERE slot = ?",
                (number, self._clock(), slot),
            )
        return number

    def pin(self, slot_id: int, version: VersionRef) -> int:
        """Keep ``version`` through retention until unpinned."""
        return self._set_pinned(slot_id, version, True)

    def unpin(self, slot_id: int, version: VersionRef) -> int:
        return self._set_pinned(slot_id, version, False)

    def _set_pinned(self, slot_id: int, version: VersionRef, pinned: bool) -> int:
        slot = check_slot(slot_id)
        with self._transaction() as conn:
            number = resolve_version(conn, slot, version)
            conn.execute(
                "UPDATE versions SET pinned = ? WHERE slot = ? AND version = ?",
                (int(pinned), slot, number),
            )
        return number
