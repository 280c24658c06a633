"""The daemon's HTTP admin API: ``create_app(daemon)`` builds the FastAPI app.

The routes live in ``api_nodes`` (hierarchy, groups), ``api_slots`` (slots,
versions, aliases, pins, rollback, verify), ``api_ops`` (health, readiness,
readers, metrics, events) and ``api_jobs`` (build jobs). This module adds
what applies to every request, in one ASGI layer (:class:`Guard`) that runs
before any route:

- a request to a loopback-bound API must name a loopback host (no DNS
  rebinding from a browser);
- a mutating request (POST, PUT, PATCH, DELETE) from a browser page of
  another origin is refused, and when the daemon has a token every mutating
  request needs ``Authorization: Bearer <token>`` (compared in constant
  time, read from the configuration on each request so a reload applies);
- request bodies are capped at ``max_body_bytes`` (413).

Errors of every kind leave as ``{"error": {"type", "message"}}``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import TYPE_CHECKING, Any, get_args
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ctxstore.errors import CtxStoreError

from . import api_jobs, api_nodes, api_ops, api_slots
from .api_base import (
    ApiContext,
    bearer_matches,
    ctxstore_error_response,
    error_response,
    internal_error_response,
    invalid_request,
    unreadable_body,
)
from .events import EventBroadcaster
from .metrics import DaemonMetrics

if TYPE_CHECKING:
    from .server import Daemon

log = logging.getLogger("ctxstore.daemon.api")

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_STATUS_KIND = {400: "invalid_input", 404: "not_found", 405: "method_not_allowed"}


def create_app(
    daemon: Daemon,
    *,
    metrics: DaemonMetrics | None = None,
    events: EventBroadcaster | None = None,
    trusted_hosts: Collection[str] | None = None,
) -> FastAPI:
    """The admin API of ``daemon``.

    ``trusted_hosts``: the Host header names a request may use (None: any);
    the HTTP server passes the loopback names when it is bound to loopback.
    """
    app = FastAPI(
        title="ctxstore admin API",
        version=_version(),
        description="Slots, versions, hierarchy, groups, readers, jobs, health and metrics "
        "of one ctxstore daemon. Mutating endpoints need `Authorization: Bearer <token>` "
        "when the daemon has a token file.",
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    context = ApiContext(
        daemon,
        DaemonMetrics(daemon) if metrics is None else metrics,
        EventBroadcaster() if events is None else events,
    )
    app.state.ctxstore = context
    routers = [module.router for module in (api_ops, api_slots, api_nodes, api_jobs)]
    for router in routers:
        app.include_router(router)
    _install_error_handlers(app, MethodIndex(routers))
    app.add_middleware(
        Guard,
        context=context,
        trusted_hosts=None if trusted_hosts is None else frozenset(trusted_hosts),
    )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _version() -> str:
    try:
        return package_version("ctxstore")
    except PackageNotFoundError:
        return "0"


# -- errors ---------------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI, methods: MethodIndex) -> None:
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


# -- the guard ------------------------------------------------------------------------------------


class Guard:
    """Host, origin, token and body-size checks for every request (pure ASGI, no buffering
    unless the body arrives chunked)."""

    def __init__(
        self, app: ASGIApp, *, context: ApiContext, trusted_hosts: frozenset[str] | None
    ) -> None:
        self.app = app
        self.context = context
        self.trusted_hosts = trusted_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        refusal = self._refusal(scope["method"], headers) or self._follower_refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        limit = self.context.daemon.config.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await error_response(400, "invalid_input", "Content-Length is not a number")(
                    scope, receive, send
                )
            elif int(length) > limit:
                await _too_large(int(length), limit)(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if "chunked" in headers.get("transfer-encoding", "").lower():
            await self._buffered(scope, receive, send, limit)
            return
        await self.app(scope, receive, send)

    def _refusal(self, method: str, headers: dict[str, str]) -> JSONResponse | None:
        host = headers.get("host", "")
        if self.trusted_hosts is not None and _host_name(host) not in self.trusted_hosts:
            return error_response(
                400, "invalid_input", f"Host {host[:100]!r} is not an address of this daemon"
            )
        if method not in MUTATING:
            return None
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != host:
            return error_response(
                403, "forbidden", "cross-origin requests may not change this daemon"
            )
        try:
            token = self.context.daemon.config.token()
        except (CtxStoreError, OSError) as exc:
            log.error("API: cannot read the token file, refusing %s requests: %s", method, exc)
            return error_response(503, "unavailable", "the daemon cannot read its token file")
        if token is not None and not bearer_matches(headers.get("authorization"), token):
            return error_response(
                401,
                "unauthorized",
                "this endpoint needs Authorization: Bearer <token>",
                headers={"WWW-Authenticate": 'Bearer realm="ctxstore"'},
            )
        return None

    def _follower_refusal(self, scope: Scope) -> JSONResponse | None:
        """A follower's store changes only by what it pulls from its origin (verify stays)."""
        follow = self.context.daemon.config.follow
        if not follow or scope["method"] not in MUTATING or scope["path"].startswith("/verify"):
            return None
        return error_response(
            403, "forbidden", f"this daemon follows {follow}: it takes no local writes; "
            "make the change on the writer daemon of that origin",
        )  # fmt: skip

    async def _buffered(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Read a chunked body up to ``limit`` bytes, then hand it to the app in one piece."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(size, limit, at_least=True)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _too_large(size: int, limit: int, *, at_least: bool = False) -> JSONResponse:
    amount = f"more than {limit}" if at_least else str(size)
    return error_response(
        413, "invalid_input", f"request body of {amount} bytes exceeds the limit of {limit} bytes"
    )


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _host_name(host: str) -> str:
    """``127.0.0.1:8470`` -> ``127.0.0.1``; ``[::1]:8470`` -> ``::1``."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


# -- OpenAPI --------------------------------------------------------------------------------------


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus the Bearer scheme and the guard's answers on mutating operations,
    minus FastAPI's 422 (a refused request is a 400 ``ErrorBody`` like every other error)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearerAuth"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "required on mutating endpoints when the daemon has a token file",
    }
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    guard_answers = {
        "401": "a token is configured and the request has no valid Bearer token",
        "403": "a cross-origin browser request",
        "413": "request body larger than max_body_bytes",
    }
    for operations in schema.get("paths", {}).values():
        for method, operation in operations.items():
            # FastAPI documents a 422 with pydantic's error list; we answer 400 in our shape
            operation.get("responses", {}).pop("422", None)
            if method.upper() not in MUTATING:
                continue
            operation["security"] = [{"bearerAuth": []}, {}]
            responses = operation.setdefault("responses", {})
            for status, description in guard_answers.items():
                responses.setdefault(
                    status,
                    {
                        "description": description,
                        "content": {"application/json": {"schema": error_ref}},
                    },
                )
    for unused in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(unused, None)
    app.openapi_schema = schema
    return schema
