"""The read-only view of a store: what readers, post-commit hooks and the API's reads get.

``PersistentStore(path, readonly=True)`` returns one. It has the reads
(``reads.py``) and the checks (``checking.py``) and no write method at all.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable

from ..errors import (
    NotFoundError,
    StorageError,
)
from ..hierarchy import HierarchyView
from . import layout
from .checking import StoreChecks
from .db import (
    damaged_index,
)
from .schema import check_readable


class StoreView(StoreChecks):
    """A store opened read-only: every read, no write at all.

    What readers, hooks and the API's reads get: a write cannot even be named on it
    (the writer, :class:`ctxstore.store.PersistentStore`, adds them). It opens the
    index read-only (``mode=ro``) and changes nothing in the store directory.
    """

    hierarchy: HierarchyView

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(path, readonly=True, clock=clock)
        self._open_readonly()
        self.hierarchy = HierarchyView(self._reader)

    def _open_readonly(self) -> None:
        if not layout.index_path(self.root).exists():
            raise NotFoundError(f"no ctxstore store at {self.root} (no {layout.INDEX_NAME})")
        try:
            check_readable(self._reader())
        except sqlite3.OperationalError as exc:
            raise StorageError(
                f"cannot open store {self.root} read-only: {exc}; SQLite needs its -wal and "
                "-shm files, which only a writer can create or recover: start the daemon "
                "(or give this user write access to the store directory) and retry"
            ) from exc
        except sqlite3.DatabaseError as exc:
            raise damaged_index(layout.index_path(self.root), exc) from exc
