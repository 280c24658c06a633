"""The writer's durable outbox: the slots whose head the origin has not caught up with.

One empty file per slot, ``<dir>/<slot>``, created (and its directory entry
synced) before the uploader is woken, removed once the slot's head at the origin
names what the store serves. A writer killed in between, or an origin down for a
day, leaves the file: the next start uploads what is pending.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import StorageError
from ..store.durable import fsync_dir, make_dir, write_new_file


class Outbox:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        make_dir(self.path.parent)
        make_dir(self.path)

    def add(self, slot: int) -> None:
        """Record ``slot`` as pending, durably; a slot already pending stays once."""
        entry = self.path / str(slot)
        if entry.exists():
            return
        try:
            write_new_file(entry, ())
        except StorageError:
            if not entry.exists():
                raise
            return
        fsync_dir(self.path)

    def done(self, slot: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / str(slot)).unlink()
            fsync_dir(self.path)

    def pending(self) -> list[int]:
        return sorted(int(p.name) for p in self.path.iterdir() if p.name.isdigit())
