"""The daemon's HTTP admin API: ``create_app(daemon)`` builds the FastAPI app.

The routes live in ``routes/``, one module per resource: ``nodes``
(hierarchy, groups), ``slots`` (slots, versions, aliases, pins, rollback,
verify), ``ops`` (health, readiness, readers, metrics, events) and ``jobs``
(build jobs). What applies to every request is the auth guard
(``guard.py``); errors of every kind leave as ``{"error": {"type",
"message"}}`` (``errors.py``). The OpenAPI document adds the Bearer scheme and
the guard's answers to what FastAPI writes.
"""

from __future__ import annotations

from collections.abc import Collection
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ..events import EventBroadcaster
from ..metrics import DaemonMetrics
from .context import ApiContext
from .errors import MethodIndex, install_error_handlers
from .guard import MUTATING, Guard
from .routes import ROUTERS

if TYPE_CHECKING:
    from ..server import Daemon


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
    for router in ROUTERS:
        app.include_router(router)
    install_error_handlers(app, MethodIndex(ROUTERS))
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
