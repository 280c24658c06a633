"""What every admin API route shares: the daemon handle, errors as JSON, documented responses.

Errors map to a status by exception class, in one place (:func:`status_for`);
the body is always ``{"error": {"type": kind, "message": ...}}``. Messages of
ctxstore's own errors are written for users and are sent as they are; any
other exception is logged with its traceback and answered with a generic
500, so no stack trace or internal detail reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from ctxstore.errors import (
    ClosedError,
    ConflictError,
    CtxStoreError,
    DaemonUnavailableError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    ReadOnlyError,
    WaitTimeoutError,
    WriterLockedError,
)
from ctxstore.store import PersistentStore

from .api_models import ErrorBody
from .events import EventBroadcaster
from .metrics import DaemonMetrics

if TYPE_CHECKING:
    from .committer import Committer
    from .server import Daemon

log = logging.getLogger("ctxstore.daemon.api")

#: exception class -> HTTP status, most specific first; anything else is a 500
STATUS_BY_CLASS: tuple[tuple[type[BaseException], int], ...] = (
    (NotFoundError, 404),
    (InvalidInputError, 400),
    (ConflictError, 409),
    (PermissionDeniedError, 403),
    (ReadOnlyError, 409),
    (WriterLockedError, 409),
    (ClosedError, 503),
    (DaemonUnavailableError, 503),
    (WaitTimeoutError, 504),
)


def status_for(exc: BaseException) -> int:
    for cls, status in STATUS_BY_CLASS:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(
    status: int, kind: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"type": kind, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def ctxstore_error_response(exc: CtxStoreError) -> JSONResponse:
    status = status_for(exc)
    if status == 500:
        log.error("API request failed: %s: %s", exc.kind, exc)
    elif status > 500:
        log.warning("API request refused: %s: %s", exc.kind, exc)
    return error_response(status, exc.kind, str(exc) or exc.kind)


def internal_error_response() -> JSONResponse:
    return error_response(500, "internal", "internal error; the daemon's log has the details")


def validation_message(exc: RequestValidationError, limit: int = 5) -> str:
    """``body.parent: Input should be a valid integer; path.slot: ...`` (inputs not echoed)."""
    parts = []
    for error in exc.errors()[:limit]:
        where = ".".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg", ""))
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


class GuardedRoute(APIRoute):
    """A route whose unexpected exceptions become a logged, generic 500 (never a traceback)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (HTTPException, RequestValidationError):
                raise  # the app's handlers answer these in the same JSON shape
            except CtxStoreError as exc:
                return ctxstore_error_response(exc)
            except Exception:
                log.exception("API %s %s failed", request.method, request.url.path)
                return internal_error_response()

        return guarded


@dataclass(frozen=True, slots=True)
class ApiContext:
    """The daemon behind one API app, and the app's metrics and event streams."""

    daemon: Daemon
    metrics: DaemonMetrics
    events: EventBroadcaster

    @property
    def store(self) -> PersistentStore:
        store = self.daemon.store
        if store is None:
            raise ClosedError("the store is not open")
        return store

    @property
    def committer(self) -> Committer:
        committer = self.daemon.committer
        if committer is None:
            raise ClosedError("the daemon is not committing (starting or stopped)")
        return committer


async def _api_context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.ctxstore
    return context


Ctx = Annotated[ApiContext, Depends(_api_context)]


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer with."""
    return {
        status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses
    }


_DESCRIPTIONS = {
    400: "invalid input (bad slot, name, version or body)",
    401: "a token is configured and the request has no valid Bearer token",
    403: "a cross-origin browser request to a mutating endpoint",
    404: "no such slot, version, alias, node, group or job",
    409: "conflicts with the store's state (cycle, job not pending, read-only)",
    413: "request body larger than max_body_bytes",
    422: "the request does not match the schema",
    500: "internal error (see the daemon's log) or an integrity problem",
    503: "the store is not open, the daemon is stopping, or the job queue is not running",
}

#: every route can answer with these
COMMON_ERRORS = errors(400, 422, 500, 503)
