"""Removes retired version directories off the commit path.

Unlinking a large version's files (freeing its extents, dropping its cached
pages) costs time proportional to its size; a commit must not wait for the
version it replaced to disappear. The writer first moves a retired directory
into ``wal/`` (one rename, so its old path can be reused at once and a crash
leaves it where recovery deletes leftovers), then hands it to this thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path

from .durable import remove_tree

log = logging.getLogger("ctxstore.store")


class Reaper:
    """One background thread that deletes the directories it is given, in order."""

    def __init__(self, name: str = "ctxstore-reaper") -> None:
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def usable(self) -> bool:
        """False in a forked child, which has no copy of the thread."""
        return self._pid == os.getpid() and self._thread.is_alive()

    def remove(self, path: Path) -> None:
        """Delete ``path`` (a directory that nothing reaches any more) soon."""
        self._queue.put(path)

    def drain(self) -> None:
        """Wait until every directory handed over so far is gone."""
        if self.usable:
            self._queue.join()

    def close(self) -> None:
        """Finish the queued removals and stop the thread."""
        if self.usable:
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            path = self._queue.get()
            try:
                if path is None:
                    return
                remove_tree(path)
            except Exception:  # never let the thread die; recovery removes what stays
                log.exception("could not remove retired directory %s", path)
            finally:
                self._queue.task_done()
