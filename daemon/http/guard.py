"""The auth guard: host, origin, token and body-size checks for every request.

One ASGI layer (:class:`Guard`) that runs before any route:

- a request to a loopback-bound API must name a loopback host (no DNS
  rebinding from a browser);
- a mutating request (POST, PUT, PATCH, DELETE) from a browser page of
  another origin is refused, and when the daemon has a token every mutating
  request needs ``Authorization: Bearer <token>`` (compared in constant
  time, read from the configuration on each request so a reload applies);
- request bodies are capped at ``max_body_bytes`` (413);
- a follower daemon (``--follow``) refuses every mutating request but verify
  (403): its store changes only by what it pulls from its origin.
"""

from __future__ import annotations

import hmac
import logging
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ctxstore.errors import CtxStoreError

from .context import ApiContext
from .errors import error_response

log = logging.getLogger("ctxstore.daemon.api")

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


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


def bearer_matches(header: str | None, token: str) -> bool:
    """Whether an Authorization header carries ``token`` (compared in constant time)."""
    if header is None:
        return False
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def authorized(request: Request, context: ApiContext) -> bool:
    """Whether this caller may see what only token holders see: True when the daemon has
    no token, or the request carries it; False too when the token file cannot be read."""
    try:
        token = context.daemon.config.token()
    except (CtxStoreError, OSError):
        return False
    return token is None or bearer_matches(request.headers.get("authorization"), token)
