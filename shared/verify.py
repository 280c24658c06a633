"""The store's consistency checker: rows against files, files against rows, checksums.

Used by ``PersistentStore.verify``, ``ctxstore verify`` and the API, and by the
tests after every operation that could go wrong. It only reads.
"""

from __future__ import annotations

import os
import sqlite3
from collections import defaultdict
from pathlib import Path

from . import layout
from .checksum import checksum_file
from .errors import IntegrityError
from .manifest import unpack_manifest
from .records import Problem


def check_index(conn: sqlite3.Connection) -> list[Problem]:
    """SQLite's own structural check plus foreign keys."""
    problems: list[Problem] = []
    try:
        for (result,) in conn.execute("PRAGMA quick_check"):
            if result != "ok":
                problems.append(Problem("index_damaged", f"quick_check: {result}"))
        for row in conn.execute("PRAGMA foreign_key_check"):
            problems.append(Problem("index_damaged", f"foreign key violation: {tuple(row)}"))
    except sqlite3.DatabaseError as exc:
        problems.append(Problem("index_damaged", f"index unreadable: {exc}"))
    return problems


def check_versions(
    root: Path, conn: sqlite3.Connection, slot: int | None, *, rehash: bool = True
) -> list[Problem]:
    """Every recorded tensor file exists, has its recorded size and (with rehash) checksum."""
    rows = conn.execute(
        "SELECT slot, version, position, name, data_offset, nbytes, checksum FROM tensors "
        "WHERE (?1 IS NULL OR slot = ?1) ORDER BY slot, version, position",
        (slot,),
    ).fetchall()
    by_version: dict[tuple[int, int], set[str]] = defaultdict(set)
    problems: list[Problem] = []
    for s, v, position, name, offset, nbytes, checksum in rows:
        file_name = layout.tensor_file_name(position)
        by_version[(s, v)].add(file_name)
        path = layout.version_dir(root, s, v) / file_name
        problem = _check_file(str(path), offset + nbytes, checksum if rehash else None)
        if problem:
            problems.append(Problem(problem[0], problem[1], s, v, name))
    expected: dict[tuple[int, int], list[tuple[str, int, int, str]]] = defaultdict(list)
    for s, v, _, name, offset, nbytes, checksum in rows:
        expected[(s, v)].append((name, offset, nbytes, checksum))
    version_rows = conn.execute(
        "SELECT slot, version, manifest FROM versions WHERE (?1 IS NULL OR slot = ?1)", (slot,)
    ).fetchall()
    for s, v, blob in version_rows:
        if _manifest_entries(blob) != expected.get((s, v), []):
            problems.append(
                Problem("manifest_mismatch", "tensor manifest disagrees with tensor rows", s, v)
            )
        directory = layout.version_dir(root, s, v)
        if not directory.is_dir():
            problems.append(Problem("missing_version_dir", f"{directory} does not exist", s, v))
            continue
        stray = set(os.listdir(directory)) - by_version.get((s, v), set())
        for name in sorted(stray):
            problems.append(Problem("stray_file", f"{directory / name} is not in the index", s, v))
    return problems


def _manifest_entries(blob: bytes) -> list[tuple[str, int, int, str]] | None:
    try:
        return [(e[0], e[3], e[4], e[5]) for e in unpack_manifest(blob)]
    except (IntegrityError, ValueError, TypeError, IndexError):
        return None


def _check_file(path: str, size: int, checksum: str | None) -> tuple[str, str] | None:
    try:
        actual = os.stat(path).st_size
    except FileNotFoundError:
        return ("missing_file", f"{path} does not exist")
    if actual != size:
        return ("wrong_size", f"{path} has {actual} bytes, the index says {size}")
    if checksum is not None and checksum_file(path) != checksum:
        return ("checksum_mismatch", f"{path} does not match its recorded xxh3-128")
    return None


def check_pointers(conn: sqlite3.Connection, slot: int | None) -> list[Problem]:
    """Current pointers and aliases name versions that exist."""
    return [
        Problem("dangling_current", f"current version {v} has no record", s, v)
        for s, v in conn.execute(
            "SELECT s.slot, s.current_version FROM slots s WHERE s.current_version IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM versions v WHERE v.slot = s.slot "
            "AND v.version = s.current_version) AND (?1 IS NULL OR s.slot = ?1)",
            (slot,),
        )
    ]


def find_orphans(root: Path, conn: sqlite3.Connection, slot: int | None) -> list[Problem]:
    """Version directories with no record (left by a crash before COMMIT), and stray entries."""
    problems: list[Problem] = []
    base = layout.slots_dir(root)
    if not base.is_dir():
        return problems
    recorded = {
        (s, v)
        for s, v in conn.execute(
            "SELECT slot, version FROM versions WHERE (?1 IS NULL OR slot = ?1)", (slot,)
        )
    }
    for slot_name in sorted(os.listdir(base)):
        s = layout.parse_int_name(slot_name)
        if s is None:
            problems.append(Problem("stray_file", f"{base / slot_name} is not a slot directory"))
            continue
        if slot is not None and s != slot:
            continue
        for version_name in sorted(os.listdir(base / slot_name)):
            v = layout.parse_int_name(version_name)
            if v is None or (s, v) not in recorded:
                problems.append(
                    Problem("orphan", f"{base / slot_name / version_name} has no record", s, v)
                )
    return problems


def verify_store(
    root: Path, conn: sqlite3.Connection, slot: int | None = None, *, rehash: bool = True
) -> list[Problem]:
    """Every check, for one slot or the whole store; an empty list means all is well."""
    problems = check_index(conn) if slot is None else []
    if problems:
        return problems
    problems += check_versions(root, conn, slot, rehash=rehash)
    problems += check_pointers(conn, slot)
    problems += find_orphans(root, conn, slot)
    return problems
