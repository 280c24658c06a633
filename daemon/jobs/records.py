"""A build job as the queue stores it, its states, and the checks on what a caller passes.

Shared by the table (which stores jobs), the queue (which takes them from
callers) and the workers (which run them and decide retries).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Final, Literal, TypeGuard, get_args

from ctxstore.checks import Integer
from ctxstore.errors import ConflictError, InvalidInputError, NotFoundError, PermissionDeniedError
from ctxstore.validation import thaw_json

JobState = Literal["pending", "processing", "done", "failed", "cancelled"]
JOB_STATES: tuple[JobState, ...] = get_args(JobState)
FINISHED_STATES: frozenset[str] = frozenset({"done", "failed", "cancelled"})
#: errors that no retry can mend: the job fails on the attempt that raised them (a missing
#: file is NotFoundError: it does not appear by trying again a few seconds later)
PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    InvalidInputError,
    NotFoundError,
    ConflictError,
    PermissionDeniedError,
)

#: a job's priority, and how many jobs one listing gives: ctxstore.checks declarations,
#: whose bounds the HTTP API's schema states too
PRIORITIES: Final = Integer(-(2**31), 2**31 - 1)
LISTING: Final = Integer(1, 10_000)
MIN_PRIORITY, MAX_PRIORITY = PRIORITIES.low, PRIORITIES.high
MAX_JOB_ID = 2**63 - 1
MAX_LIST = LISTING.high
MAX_ERROR_CHARS = 2_000
#: progress is written when it moved by this much, or after PROGRESS_INTERVAL seconds
PROGRESS_STEP = 0.05
PROGRESS_INTERVAL = 2.0
DEFAULT_STOP_TIMEOUT = 30.0
DEFAULT_KEEP_FINISHED = 10_000
DEFAULT_MAX_PENDING = 100_000

Runner = Callable[["Job"], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Job:
    """One build job as stored; ``config`` is the frozen config the caller submitted."""

    id: int
    slot: int
    node_type: str
    config: Mapping[str, Any]
    priority: int
    state: JobState
    attempts: int
    max_attempts: int
    progress: float
    error: str | None
    version: int | None
    created_at: float
    updated_at: float
    next_attempt_at: float | None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (the config as dicts and lists)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["config"] = thaw_json(self.config)
        return out


def backoff_delay(attempt: int, initial: float, maximum: float, jitter: float) -> float:
    """Seconds to wait after the ``attempt``-th failed attempt (jitter in [0, 1])."""
    base = min(maximum, initial * 2.0 ** min(attempt - 1, 64))
    return base * (0.5 + min(max(jitter, 0.0), 1.0) / 2)


def check_job_id(job_id: object) -> int:
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 1 <= job_id <= MAX_JOB_ID:
        raise InvalidInputError(f"job id must be a positive integer, got {job_id!r:.40}")
    return job_id


def check_priority(priority: object) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidInputError(f"priority must be an integer, got {priority!r:.40}")
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidInputError(
            f"priority must be between {MIN_PRIORITY} and {MAX_PRIORITY}, got {priority}"
        )
    return priority


def check_progress(progress: object) -> float:
    if not is_number(progress) or not 0 <= progress <= 1:
        raise InvalidInputError(f"progress must be a number in [0, 1], got {progress!r:.40}")
    return float(progress)


def describe_error(exc: BaseException) -> str:
    """The message stored with a failed attempt: the class and what it said, bounded."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def check_count(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r:.40}")


def is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
