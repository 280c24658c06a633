"""Errors as HTTP problems: CtxStoreError subclasses mapped to statuses, in one place.

The body is always ``{"error": {"type": kind, "message": ...}}``. Messages of
ctxstore's own errors are written for users and are sent as they are; any
other exception is logged with its traceback and answered with a generic
500, so no stack trace or internal detail reaches a client. This module also
installs the app's exception handlers (validation, HTTP, ctxstore, anything
else) and documents the error statuses of each route in the OpenAPI.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, get_args

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
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

from ..logs import LogLimiter
from .invalid_input import invalid_request, unreadable_body
from .schemas import ErrorBody

log = logging.getLogger("ctxstore.daemon.api")
api_events = LogLimiter(log, burst=20)
_STATUS_KIND = {400: "invalid_input", 404: "not_found", 405: "method_not_allowed"}

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
    elif status > 500:  # a flood of refused requests is a few lines and a count
        api_events.log("API refused", logging.WARNING, "API request refused: %s: %s", exc.kind, exc)
    return error_response(status, exc.kind, str(exc) or exc.kind)


def internal_error_response() -> JSONResponse:
    return error_response(500, "internal", "internal error; the daemon's log has the details")


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


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer with."""
    return {
        status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses
    }


_DESCRIPTIONS = {
    400: "invalid input: a path, query or body value the API or the store refuses, a body "
    "that is not JSON or not sent as application/json; the message names the field",
    401: "a token is configured and the request has no valid Bearer token",
    403: "a cross-origin browser request to a mutating endpoint",
    404: "no such slot, version, alias, node, group or job",
    409: "conflicts with the store's state (cycle, job not pending, read-only)",
    413: "request body larger than max_body_bytes",
    500: "internal error (see the daemon's log) or an integrity problem",
    503: "the store is not open, the daemon is stopping, the job queue is not running, or "
    "a limit is reached (limits.event_streams for /events)",
}

#: every route can answer with these
COMMON_ERRORS = errors(400, 500, 503)


def install_error_handlers(app: FastAPI, methods: MethodIndex) -> None:
    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        error = invalid_request(
            exc,
            content_type=request.headers.get("content-type"),
            body_fields=_body_fields(request.scope.get("route")),
        )
        return ctxstore_error_response(error)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        unreadable = unreadable_body(exc.__cause__) if exc.status_code == 400 else None
        if unreadable is not None:  # FastAPI's "There was an error parsing the body"
            return ctxstore_error_response(unreadable)
        kind = _STATUS_KIND.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method of the path, not only the matched route's
            headers["Allow"] = ", ".join(sorted(methods.allowed(request.url.path)))
        return error_response(exc.status_code, kind, str(exc.detail), headers)

    async def on_ctxstore(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, CtxStoreError)
        return ctxstore_error_response(exc)

    async def on_anything(request: Request, exc: Exception) -> JSONResponse:
        log.error("API %s %s failed", request.method, request.url.path, exc_info=exc)
        return internal_error_response()

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(CtxStoreError, on_ctxstore)
    app.add_exception_handler(Exception, on_anything)


def _body_fields(route: object) -> list[str] | None:
    """The fields of the JSON body ``route`` takes (None: no body, or not one of ours)."""
    body = route.body_field if isinstance(route, APIRoute) else None
    if body is None:
        return None
    annotation = body.field_info.annotation
    for candidate in (annotation, *get_args(annotation)):  # RollbackBody | None
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return list(candidate.model_fields)
    return None


class MethodIndex:
    """Which methods each documented path takes, for the ``Allow`` header of a 405."""

    def __init__(self, routers: Iterable[APIRouter]) -> None:
        self._routes = [
            (route.path_regex, frozenset(route.methods or ()) - {"HEAD"})
            for router in routers
            for route in router.routes
            if isinstance(route, APIRoute)
        ]

    def allowed(self, path: str) -> set[str]:
        return {m for regex, methods in self._routes if regex.match(path) for m in methods}
