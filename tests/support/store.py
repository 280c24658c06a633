"""Looking at a store's files from the outside."""

from __future__ import annotations

import os
from pathlib import Path

from ctxstore.store import layout


def wal_leftovers(store_root: Path) -> list[str]:
    """What wal/ holds besides an empty staging directory a writer prepared ahead of time
    (one that a commit took and began to fill counts: it is a leftover)."""
    wal = layout.wal_dir(store_root)
    return sorted(
        name
        for name in os.listdir(wal)
        if not (name.startswith(layout.SPARE_PREFIX) and not os.listdir(wal / name))
    )
