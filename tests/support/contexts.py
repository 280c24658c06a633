"""Context and store factories shared by several test modules."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from ctxstore import Context, PersistentStore


def store_with_one_version(store_dir: Path) -> None:
    with PersistentStore(store_dir) as store:
        store.save_context(1, Context({"w": np.arange(10, dtype="<f4")}))
        store.save_context(1, Context({"w": np.arange(10, dtype="<f4") + 1}))


def tamper(store_dir: Path, manifest: dict[int, Any], rows: dict[str, Any]) -> None:
    """Change version 2 of slot 1: manifest entry fields by index, tensors row columns."""
    conn = sqlite3.connect(store_dir / "index.db")
    with conn:
        (blob,) = conn.execute(
            "SELECT manifest FROM versions WHERE slot = 1 AND version = 2"
        ).fetchone()
        entries = msgpack.unpackb(blob)
        for index, value in manifest.items():
            entries[0][index] = value
        conn.execute(
            "UPDATE versions SET manifest = ? WHERE slot = 1 AND version = 2",
            (msgpack.packb(entries),),
        )
        for column, value in rows.items():
            conn.execute(
                f"UPDATE tensors SET {column} = ? WHERE slot = 1 AND version = 2", (value,)
            )
    conn.close()


def digest(array: np.ndarray[Any, Any]) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
