"""Build-job endpoints over the daemon's job queue (``daemon.jobs`` package).

The handlers are plain functions, so FastAPI runs them in its thread pool:
submit and cancel wait for the store's write lock, which a commit holds while
it writes and fsyncs, and every read is SQL; none of it may stall the event
loop. Without a queue every endpoint is a 503 that says so.

A job's error text can say more about the files it read than their owner
would like, so when the daemon has a token only callers that present it see
it; anyone else sees the job's state with ``error`` null and ``error_hidden``
true.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, status

from ctxstore.errors import ConflictError, DaemonUnavailableError, NotFoundError
from ctxstore.nodes import FileNode, get_node_type

from ...import_roots import check_import_path
from ...jobs.records import LISTING
from ..context import ApiContext, Ctx
from ..errors import COMMON_ERRORS, GuardedRoute, errors
from ..fields import API_IDS, bounds
from ..guard import authorized
from ..schemas import JobBody, JobOut, JobsOut

router = APIRouter(route_class=GuardedRoute, responses=COMMON_ERRORS)
TAG = "jobs"
JobId = Annotated[int, Path(**bounds(API_IDS), description="job id")]
JobStateName = Literal["pending", "processing", "done", "failed", "cancelled"]


def _queue(ctx: ApiContext) -> Any:
    jobs = getattr(ctx.daemon, "jobs", None)
    if jobs is None:
        raise DaemonUnavailableError("build jobs are not available: the job queue is not running")
    return jobs


def _check_import_roots(ctx: ApiContext, node_type: str, config: Mapping[str, Any]) -> None:
    """A file job outside the import roots is refused now (403), not when it runs."""
    path = config.get("path")
    if isinstance(path, str) and issubclass(get_node_type(node_type), FileNode):
        check_import_path(ctx.daemon.config.import_roots, path)


def _as_dict(job: Any, job_id: object = None, *, reveal: bool = True) -> dict[str, Any]:
    """The job as JSON; its error text only when ``reveal`` (see the module docstring)."""
    if job is None:
        raise NotFoundError(f"job {job_id} does not exist")
    plain = dict(job.as_dict() if hasattr(job, "as_dict") else job)
    hidden = not reveal and plain.get("error") is not None
    if hidden:
        plain["error"] = None
    plain["error_hidden"] = hidden
    return plain


@router.post(
    "/jobs",
    tags=[TAG],
    response_model=JobOut,
    status_code=status.HTTP_201_CREATED,
    responses=errors(403, 404, 409),
    summary="Queue a build: node_type with config, for slot",
)
def submit_job(body: JobBody, ctx: Ctx) -> JobOut:
    queue = _queue(ctx)
    _check_import_roots(ctx, body.node_type, body.config)
    job = queue.submit(body.slot, body.node_type, body.config, body.priority)
    return JobOut(job=_as_dict(job))


@router.get("/jobs", tags=[TAG], response_model=JobsOut, summary="Jobs, newest first")
def list_jobs(
    request: Request,
    ctx: Ctx,
    state: JobStateName | None = None,
    limit: Annotated[int, Query(**bounds(LISTING))] = 100,
) -> JobsOut:
    jobs = _queue(ctx).list(state=state, limit=limit)
    reveal = authorized(request, ctx)
    return JobsOut(jobs=[_as_dict(job, reveal=reveal) for job in jobs])


@router.get(
    "/jobs/{job_id}", tags=[TAG], response_model=JobOut, responses=errors(404), summary="One job"
)
def get_job(job_id: JobId, request: Request, ctx: Ctx) -> JobOut:
    job = _queue(ctx).get(job_id)
    return JobOut(job=_as_dict(job, job_id, reveal=authorized(request, ctx)))


@router.delete(
    "/jobs/{job_id}",
    tags=[TAG],
    response_model=JobOut,
    responses=errors(404, 409),
    summary="Cancel a pending job (409 once it runs or ended)",
)
def cancel_job(job_id: JobId, ctx: Ctx) -> JobOut:
    queue = _queue(ctx)
    result = queue.cancel(job_id)
    if result is False:
        raise ConflictError(f"job {job_id} is not pending and cannot be cancelled")
    job = result if hasattr(result, "as_dict") else queue.get(job_id)
    return JobOut(job=_as_dict(job, job_id))
