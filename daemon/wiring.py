"""The daemon's writer graph, built in one place: each part gets what it needs when it is made.

:func:`build_writer` is called once the store is open and the version table
made: the committer (with its settings, post-commit stage and commit
observer), the integrity desk on top of it and the job queue whose runner
commits through it. A setting that may change on SIGHUP is handed over as a
function reading the configuration in force (``config()``), never a copy.
Read it to see what depends on what; daemon/server.py only starts and stops
what it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ctxstore.store import PersistentStore
from ctxstore.versiontable import VersionTableWriter

from .committer import Announcer, CommitObserver, Committer
from .config import DaemonConfig
from .hooks import Hooks
from .integrity import DamageDesk
from .jobs import JobQueue
from .pipeline import job_runner, post_commit_stage


@dataclass(frozen=True, slots=True)
class Writer:
    """What commits: the committer, the desk that heals damage through it, the job queue."""

    committer: Committer
    damage: DamageDesk
    jobs: JobQueue


def build_writer(
    store: PersistentStore,
    table: VersionTableWriter | None,
    *,
    config: Callable[[], DaemonConfig],
    announce: Announcer,
    hooks: Callable[[], Hooks],
    on_commit: CommitObserver | None = None,
) -> Writer:
    """The committer, integrity desk and job queue of ``store``, wired to each other."""
    settings = config()
    committer = Committer(
        store,
        table,
        announce,
        max_publish_bytes=settings.max_publish_bytes,
        remembered_keys=settings.publish_keys,
        verify_after_commit=settings.verify_after_commit,
        reread_after_commit=settings.reread_after_commit,
        announce_record_bytes=settings.announce_record_bytes,
        post_commit=post_commit_stage(hooks, store),
        on_commit=on_commit,
    )
    damage = DamageDesk(store, committer, lambda: config().damage_recheck_interval)
    jobs = JobQueue(
        store,
        job_runner(
            committer,
            lambda: jobs,  # the runner reports progress to the queue it runs for
            lambda: config().import_roots,
            lambda: config().import_limits(),
        ),
        concurrency=settings.jobs_concurrency,
        max_attempts=settings.jobs_max_attempts,
        backoff_initial=settings.jobs_backoff_initial,
        backoff_max=settings.jobs_backoff_max,
    )
    return Writer(committer, damage, jobs)
