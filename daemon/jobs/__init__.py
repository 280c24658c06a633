"""The daemon's build-job queue: persistent in the index, priority-ordered, bounded, retried.

A job asks for one build: a node type and its config, for a slot. It lives in
the ``jobs`` table of the store's index, so a restart loses no queued job. Its
states and what moves it between them::

    pending    -> processing   a worker claims it (highest priority, then oldest; retry time due)
    pending    -> cancelled    cancel()
    processing -> done         run() returned the committed version
    processing -> pending      the attempt failed and attempts remain (a retry time is set),
                               or stop() / a restart after a crash interrupted it
    processing -> failed       attempts used up, or a permanent error

The queue hands the highest-priority eligible job (then the first submitted)
to one of ``concurrency`` asyncio workers, which awaits ``run(job)``: the
daemon's build + commit, returning the committed version. A failed attempt is
retried after ``min(backoff_max, backoff_initial * 2**(attempt - 1)) * (0.5 +
jitter / 2)`` seconds until ``max_attempts``; InvalidInputError,
NotFoundError, ConflictError and PermissionDeniedError fail the job at once
(retrying a bad config, a missing file, a model-type clash or a file outside
the import roots cannot help). What can be known at submission is refused
there instead: a file import whose file does not exist is never queued.

Every SQL statement runs on the store's connections: writes through
``store.write_transaction()``, which shares the commit path's write lock, so
the workers make them in a worker thread and the event loop never waits for
a commit in progress. Time is injected (``clock``, ``sleep``, ``jitter``), so
tests drive retries without sleeping.

The modules, one job each:

- ``records.py``: the :class:`Job` record, its states, bounds and argument checks;
- ``table.py``: the persistent queue, every SQL statement on the ``jobs`` table;
- ``queue.py``: :class:`JobQueue`, what callers submit, list, cancel and wait for;
- ``workers.py``: the runner, the worker tasks that build jobs and record outcomes;
- ``signals.py``: the change signal and the progress of builds in flight.
"""

from .queue import JobQueue
from .records import JOB_STATES, PROGRESS_INTERVAL, Job, JobState, Runner, backoff_delay

__all__ = [
    "JOB_STATES",
    "PROGRESS_INTERVAL",
    "Job",
    "JobQueue",
    "JobState",
    "Runner",
    "backoff_delay",
]
