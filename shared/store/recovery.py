"""Recovery at open: undo what a crash left before a commit point, report what it
cannot mend (docs/reliability.md, "Crashes"). No symbolic link inside the store is
followed and nothing outside it is deleted.
"""

from __future__ import annotations

import logging
import os
import stat

from ..errors import (
    IntegrityError,
    StorageError,
)
from ..records import Problem
from ..verify import find_orphans, real_dir_problem, recorded_version
from . import layout
from .commit import StoreCommit
from .db import (
    overwrite_stray_frames,
)
from .durable import (
    clear_scratch_dir,
    describe_entry,
    fsync_dir,
)

log = logging.getLogger("ctxstore.store")


class StoreRecovery(StoreCommit):
    """The writer's checks of the store directory and its recovery at open."""

    def _require_slots_dir(self) -> None:
        """Refuse a ``slots`` that is a symbolic link or no directory: the writer deletes
        beneath it (recovery, retention) and would follow the link out of the store."""
        slots = layout.slots_dir(self.root)
        mode = os.lstat(slots).st_mode
        if not stat.S_ISDIR(mode):
            raise StorageError(
                f"{slots} is {describe_entry(mode)}, not a directory; a writer follows no "
                f"link inside a store (it deletes beneath slots/): put the directory itself "
                f"at {slots} (the store directory {self.root} may be a link, nothing in it)"
            )

    def _recover(self) -> None:
        """Undo what a crash left before a commit point; report what it cannot mend.

        No symbolic link inside the store is followed and nothing outside it is
        deleted: ``wal/`` is emptied through a descriptor of it (a link in its place
        is unlinked, never its target), only real version directories are orphans,
        and they are removed by :func:`remove_beneath`. What it refused or found
        out of place is logged and kept in :attr:`recovery_problems`.
        """
        wal = layout.wal_dir(self.root)
        notes = clear_scratch_dir(self.root, layout.WAL_DIR)
        for note in notes:
            self._report_refusal(Problem("stray_entry", note))
        if notes:
            fsync_dir(self.root)  # a wal/ made anew
        conn = self._writer_conn()
        orphans: list[tuple[int, int]] = []
        for problem in find_orphans(self.root, conn, None):
            if (
                problem.kind == "orphan"
                and problem.slot is not None
                and problem.version is not None
            ):
                orphans.append((problem.slot, problem.version))
            else:  # not ours to delete (a foreign name): report it
                self.recovery_problems.append(problem)
        if orphans:
            # A failed COMMIT (or a kill between its frames and the index update) can
            # leave frames in the WAL behind this connection's view, replayed by a later
            # WAL recovery if another process holds the index open now: bury them first.
            overwrite_stray_frames(conn)
            still = {(p.slot, p.version) for p in find_orphans(self.root, conn, None)}
            for slot, version in orphans:
                if (slot, version) in still:
                    self._remove_version_dir(slot, version)
        fsync_dir(wal)
        for slot, version in conn.execute("SELECT slot, version FROM versions"):
            try:
                number = recorded_version(version, slot)
            except IntegrityError as exc:
                self.recovery_problems.append(Problem("bad_record", str(exc), slot))
                continue
            why = real_dir_problem(self.root, slot, number)
            if why is not None:
                self.recovery_problems.append(
                    Problem("missing_version_dir", f"recorded version has no files: {why}",
                            slot, number)
                )  # fmt: skip
