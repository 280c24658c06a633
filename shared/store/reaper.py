"""The writer's background chores: removing retired versions, preparing staging.

Unlinking a version's files needs the filesystem journal right after the
commit's fsyncs engaged it, and freeing a large version's extents and cached
pages takes time proportional to its size; a commit must not wait for the
version it replaced to disappear. Its rows are already gone, so nothing
reaches the directory, and a crash before it is deleted leaves an orphan that
recovery removes. Likewise the next commit's staging directory is created
here, after a commit, so its mkdir is not journaled by the next commit's
first fsync (measured: 0.1 ms of a 4 KiB commit's 0.33 ms file fsync).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence

from .durable import remove_beneath

log = logging.getLogger("ctxstore.store")


#: how long a chore waits before it runs: a commit's announcement and the readers that
#: map the new version come first (on 2 cores the chore otherwise ran beside them)
CHORE_DELAY = 0.01


class Reaper:
    """One background thread for the writer's chores after a commit, run in order:
    deleting retired directories, preparing the next staging directory."""

    def __init__(self, name: str = "ctxstore-reaper", delay: float = CHORE_DELAY) -> None:
        self._delay = delay
        self._queue: queue.SimpleQueue[tuple[float, Callable[[], object]] | None] = (
            queue.SimpleQueue()
        )
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def usable(self) -> bool:
        """False in a forked child, which has no copy of the thread."""
        return self._pid == os.getpid() and self._thread.is_alive()

    def remove(
        self, root: str, relatives: Sequence[str], *, then: Callable[[], object] | None = None
    ) -> None:
        """Delete the directories ``root/relative`` (that nothing reaches any more) soon,
        then run ``then``: one chore, so one wake-up of the thread.

        Nothing outside ``root`` goes: no symbolic link below it is followed
        (:func:`remove_beneath`); what is refused is logged and left for ``verify``.
        """

        def chore() -> None:
            for relative in relatives:
                refusal = remove_beneath(root, relative)
                if refusal is not None:
                    log.warning("store %s: retired version left in place: %s", root, refusal)
            if then is not None:
                then()

        self.soon(chore)

    def soon(self, chore: Callable[[], object]) -> None:
        """Run ``chore`` on the thread; its failure is logged, and nothing waits for it."""
        self._queue.put((time.monotonic() + self._delay, chore))

    def drain(self) -> None:
        """Wait until every chore handed over so far is done (not those queued later)."""
        if self.usable:
            done = threading.Event()
            self._queue.put((0.0, done.set))  # chores run in order: the ones before it ran
            done.wait()

    def close(self) -> None:
        """Finish the queued chores and stop the thread."""
        if self.usable:
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            due, chore = item
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            try:
                chore()
            except Exception:  # never let the thread die; recovery removes what stays
                log.exception("background store chore failed")
