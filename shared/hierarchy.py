"""The parent/child hierarchy and groups of slots, persisted in the index.

A node is any slot id that has been given a parent, a child or a group; it
need not have versions yet. A read-only store has a :class:`HierarchyView` (no
writes); a writer's :class:`NodeHierarchy` writes in the store's write transaction; reads
use the calling thread's read connection, so the hierarchy is safe to use
from several threads at once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from .errors import ConflictError, NotFoundError
from .validation import check_label, check_slot

ReadConn = Callable[[], sqlite3.Connection]
WriteTxn = Callable[[], AbstractContextManager[sqlite3.Connection]]

_ANCESTORS = """
WITH RECURSIVE up(slot, parent, depth) AS (
    SELECT slot, parent, 0 FROM hierarchy WHERE slot = ?
    UNION ALL
    SELECT h.slot, h.parent, up.depth + 1 FROM hierarchy h JOIN up ON h.slot = up.parent
)
SELECT slot FROM up ORDER BY depth DESC
"""

_DESCENDANTS = """
WITH RECURSIVE down(slot, depth) AS (
    SELECT slot, 0 FROM hierarchy WHERE parent = ?
    UNION ALL
    SELECT h.slot, down.depth + 1 FROM hierarchy h JOIN down ON h.parent = down.slot
)
SELECT slot FROM down ORDER BY depth, slot
"""

#: every node and its parent: the slots in the tree, and those that are only in groups (roots).
#: (_NODE_COUNTS below is built from these constants only, never from input.)
_NODES = """
SELECT slot, parent FROM hierarchy
UNION ALL
SELECT DISTINCT slot, NULL FROM group_members WHERE slot NOT IN (SELECT slot FROM hierarchy)
"""

_NODE_COUNTS = f"SELECT COUNT(*), COALESCE(SUM(parent IS NULL), 0) FROM ({_NODES})"  # noqa: S608

_MAX_DEPTH = """
WITH RECURSIVE walk(slot, depth) AS (
    SELECT slot, 0 FROM hierarchy WHERE parent IS NULL
    UNION ALL
    SELECT h.slot, walk.depth + 1 FROM hierarchy h JOIN walk ON h.parent = walk.slot
)
SELECT COALESCE(MAX(depth), 0) FROM walk
"""


@dataclass(frozen=True, slots=True)
class HierarchyStats:
    nodes: int
    roots: int
    max_depth: int
    groups: int


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """Everything about one node's place, read at one instant (``NodeHierarchy.info``)."""

    slot: int
    parent: int | None
    children: list[int]
    ancestors: list[int]
    descendants: list[int]
    root: int
    groups: list[str]


class HierarchyView:
    """Parent/child links and group membership of slots, read (what a read-only store has)."""

    def __init__(self, read: ReadConn) -> None:
        self._read = read

    def get_parent(self, slot: int) -> int | None:
        row = (
            self._read()
            .execute("SELECT parent FROM hierarchy WHERE slot = ?", (check_slot(slot),))
            .fetchone()
        )
        return None if row is None else row[0]

    def get_children(self, slot: int) -> list[int]:
        rows = self._read().execute(
            "SELECT slot FROM hierarchy WHERE parent = ? ORDER BY slot", (check_slot(slot),)
        )
        return [row[0] for row in rows]

    def get_ancestors(self, slot: int) -> list[int]:
        """Ancestors from the root down to the parent of ``slot`` (empty for a root)."""
        slot = check_slot(slot)
        chain = [row[0] for row in self._read().execute(_ANCESTORS, (slot,))]
        return chain[:-1] if chain else []

    def get_descendants(self, slot: int) -> list[int]:
        """Every node below ``slot``, breadth first."""
        return [row[0] for row in self._read().execute(_DESCENDANTS, (check_slot(slot),))]

    def get_root(self, slot: int) -> int:
        slot = check_slot(slot)
        row = self._read().execute(_ANCESTORS + " LIMIT 1", (slot,)).fetchone()
        return slot if row is None else int(row[0])

    def info(self, slot: int) -> NodeInfo:
        """Parent, children, ancestors, descendants, root and groups of ``slot``, all from
        one snapshot of the index (a change committed meanwhile is wholly in or out)."""
        slot = check_slot(slot)
        conn = self._read()
        conn.execute("BEGIN")
        try:
            return NodeInfo(
                slot=slot,
                parent=self.get_parent(slot),
                children=self.get_children(slot),
                ancestors=self.get_ancestors(slot),
                descendants=self.get_descendants(slot),
                root=self.get_root(slot),
                groups=self.get_groups(slot),
            )
        finally:
            conn.execute("COMMIT")

    def nodes(self) -> dict[int, int | None]:
        """Every node and its parent, by slot: a slot that is only in groups is a root."""
        rows = self._read().execute(_NODES + " ORDER BY slot")
        return {row[0]: row[1] for row in rows}

    def get_groups(self, slot: int) -> list[str]:
        rows = self._read().execute(
            "SELECT name FROM group_members WHERE slot = ? ORDER BY name", (check_slot(slot),)
        )
        return [row[0] for row in rows]

    def list_groups(self) -> dict[str, int]:
        """Every group and its member count."""
        rows = self._read().execute(
            "SELECT name, COUNT(*) FROM group_members GROUP BY name ORDER BY name"
        )
        return {row[0]: row[1] for row in rows}

    def list_by_group(self, group: str) -> list[int]:
        group = check_label(group, "group")
        rows = self._read().execute(
            "SELECT slot FROM group_members WHERE name = ? ORDER BY slot", (group,)
        )
        return [row[0] for row in rows]

    def stats(self) -> HierarchyStats:
        """Counts over :meth:`nodes`: every node (in the tree or in a group), the roots (nodes
        without a parent), the groups, and the depth of the deepest node below its root."""
        conn = self._read()
        nodes, roots = conn.execute(_NODE_COUNTS).fetchone()
        groups = conn.execute("SELECT COUNT(DISTINCT name) FROM group_members").fetchone()[0]
        depth = conn.execute(_MAX_DEPTH).fetchone()[0]
        return HierarchyStats(nodes=nodes, roots=roots, max_depth=depth, groups=groups)


class NodeHierarchy(HierarchyView):
    """The hierarchy of a writer: the reads, and changes in the store's write transaction."""

    def __init__(self, read: ReadConn, write: WriteTxn) -> None:
        super().__init__(read)
        self._txn = write

    def set_parent(self, child: int, parent: int | None) -> None:
        """Make ``parent`` the parent of ``child`` (None makes it a root); refuses cycles."""
        child = check_slot(child)
        if parent is not None:
            parent = check_slot(parent)
            if parent == child:
                raise ConflictError(f"slot {child} cannot be its own parent")
        with self._txn() as conn:
            if parent is not None:
                ancestors = [row[0] for row in conn.execute(_ANCESTORS, (parent,))]
                if child in ancestors:
                    raise ConflictError(
                        f"making {parent} the parent of {child} would create a cycle "
                        f"({' -> '.join(map(str, [*ancestors, child]))})"
                    )
                conn.execute(
                    "INSERT OR IGNORE INTO hierarchy(slot, parent) VALUES (?, NULL)", (parent,)
                )
            conn.execute(
                "INSERT INTO hierarchy(slot, parent) VALUES (?, ?) "
                "ON CONFLICT(slot) DO UPDATE SET parent = excluded.parent",
                (child, parent),
            )

    move_node = set_parent

    def remove_node(self, slot: int) -> None:
        """Forget ``slot``'s place in the tree; its children become roots."""
        slot = check_slot(slot)
        with self._txn() as conn:
            conn.execute("UPDATE hierarchy SET parent = NULL WHERE parent = ?", (slot,))
            conn.execute("DELETE FROM hierarchy WHERE slot = ?", (slot,))

    def add_to_group(self, slot: int, group: str) -> None:
        slot, group = check_slot(slot), check_label(group, "group")
        with self._txn() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO group_members(name, slot) VALUES (?, ?)", (group, slot)
            )

    def remove_from_group(self, slot: int, group: str) -> None:
        slot, group = check_slot(slot), check_label(group, "group")
        with self._txn() as conn:
            cursor = conn.execute(
                "DELETE FROM group_members WHERE name = ? AND slot = ?", (group, slot)
            )
            if cursor.rowcount == 0:
                raise NotFoundError(f"slot {slot} is not in group {group!r}")
