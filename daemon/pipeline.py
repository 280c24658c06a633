"""What runs around a commit in the daemon: hooks from the configuration and build jobs.

Small glue between the configuration, the hook machinery, the job queue and
the committer, so the server only wires them together.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from ctxstore.context import Context
from ctxstore.nodes import FileNode, ImportLimits, create_node
from ctxstore.store import PersistentStore

from .committer import Committer
from .config import DaemonConfig
from .hooks import CommitEvent, Hooks
from .import_roots import check_opened_file
from .jobs import Job, JobQueue

log = logging.getLogger("ctxstore.daemon")

#: fraction of a job's progress reached when its context is built and the commit starts
BUILT = 0.8


def load_hooks(config: DaemonConfig) -> Hooks:
    """The hooks the configuration names; InvalidInputError names a hook that cannot load."""
    return Hooks.load(
        config.pre_commit_hooks,
        config.post_commit_hooks,
        post_timeout=config.post_commit_timeout,
        check_finite=config.check_finite,
        best_metric=config.best_metric,
        best_mode=config.best_mode,
    )


def hooks_changed(old: DaemonConfig, new: DaemonConfig) -> bool:
    keys = ("pre_commit_hooks", "post_commit_hooks", "post_commit_timeout", "check_finite",
            "best_metric", "best_mode")  # fmt: skip
    return any(getattr(old, key) != getattr(new, key) for key in keys)


def post_commit_stage(
    hooks: Callable[[], Hooks], store: PersistentStore
) -> Callable[[int, int, Context, str | None], Awaitable[Mapping[str, int]]]:
    """The committer's post-commit stage: run the current hooks, return the aliases they moved."""

    async def stage(
        slot: int, version: int, context: Context, model_type: str | None
    ) -> Mapping[str, int]:
        outcomes = await hooks().post_commit(CommitEvent(slot, version, context, model_type, store))
        moved: dict[str, int] = {}
        for outcome in outcomes:
            moved.update(outcome.aliases)
        return moved

    return stage


def job_runner(
    committer: Committer,
    jobs: Callable[[], JobQueue | None],
    import_roots: Callable[[], tuple[Path, ...]] = tuple,
    import_limits: Callable[[], ImportLimits] = ImportLimits,
) -> Callable[[Job], Awaitable[int]]:
    """How a queued build job runs: build off the loop, then commit like any publish.

    A job that imports a file reads it only from under the import roots in force
    when it runs (they may have changed since it was queued).
    """

    async def run(job: Job) -> int:
        node = create_node(job.node_type, job.slot, dict(job.config))
        queue = jobs()
        if isinstance(node, FileNode):  # checked now, streamed into the store by the commit
            node.file_check = functools.partial(check_opened_file, import_roots())
            node.limits_cap = import_limits()
            imported = await asyncio.to_thread(node.build_import)
            if queue is not None:
                queue.set_progress(job.id, BUILT)
            return await committer.commit(job.slot, imported, model_type=node.model_type)
        if queue is not None:  # the build's own progress fills [0, BUILT]
            node.on_progress = functools.partial(_scaled_progress, queue, job.id)
        context = await node.async_build_context()
        if queue is not None:
            queue.set_progress(job.id, BUILT)
        return await committer.commit(job.slot, context, model_type=node.model_type)

    return run


def _scaled_progress(queue: JobQueue, job_id: int, fraction: float) -> None:
    queue.set_progress(job_id, BUILT * fraction)


def apply_job_settings(jobs: JobQueue, config: DaemonConfig) -> None:
    """Retry settings change live (SIGHUP); concurrency waits for a restart."""
    jobs.max_attempts = config.jobs_max_attempts
    jobs.backoff_initial = config.jobs_backoff_initial
    jobs.backoff_max = config.jobs_backoff_max
