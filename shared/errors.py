"""The one exception hierarchy of ctxstore, split by whose fault it is.

Every error ctxstore raises derives from :class:`CtxStoreError`; the ones that
have a natural builtin counterpart also derive from it, so callers that catch
``KeyError`` or ``ValueError`` keep working. The HTTP layer and the wire
protocol map these classes to status codes and error frames; no call site
invents its own.
"""

from __future__ import annotations


class CtxStoreError(Exception):
    """Root of every error raised by ctxstore."""

    #: short stable name used on the wire and in HTTP error bodies
    kind = "error"


class NotFoundError(CtxStoreError, KeyError):
    """A slot, version, alias, group or job does not exist."""

    kind = "not_found"

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class InvalidInputError(CtxStoreError, ValueError):
    """The caller passed something ctxstore refuses: bad name, dtype, config, frame field..."""

    kind = "invalid_input"


class ConflictError(CtxStoreError):
    """The request is well formed but clashes with the store's state (e.g. a cycle)."""

    kind = "conflict"


class PermissionDeniedError(CtxStoreError, PermissionError):
    """The caller is known but not allowed to do this (e.g. publish over the socket)."""

    kind = "permission_denied"


class IntegrityError(CtxStoreError):
    """Stored data disagrees with its record: checksum, size, missing file, damaged index."""

    kind = "integrity"


class StorageError(CtxStoreError, OSError):
    """The operating system refused a durable write (fsync, rename, disk full...).

    The operation that raised it did not happen: nothing it started is visible.
    """

    kind = "storage"


class WriterLockedError(CtxStoreError):
    """Another writer (this process or another) holds the store's writer lock."""

    kind = "writer_locked"

    def __init__(self, message: str, holder_pid: int | None = None) -> None:
        super().__init__(message)
        self.holder_pid = holder_pid


class ReadOnlyError(CtxStoreError):
    """A mutating call was made on a store opened read-only."""

    kind = "read_only"


class ClosedError(CtxStoreError):
    """The store, reader or client was used after close()."""

    kind = "closed"


class ProtocolError(CtxStoreError):
    """Base of wire-protocol violations. Abstract: raise a subclass."""

    kind = "protocol"


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol forbids (our bug)."""

    kind = "local_protocol"


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol (malformed, oversized, unknown, out of order)."""

    kind = "remote_protocol"


class DaemonUnavailableError(CtxStoreError, ConnectionError):
    """The writer daemon's socket cannot be reached."""

    kind = "daemon_unavailable"


class RemoteError(CtxStoreError):
    """The daemon answered a request with an error frame; ``kind`` is the daemon's class."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class WaitTimeoutError(CtxStoreError, TimeoutError):
    """A wait (for a version, an answer, a lock) ran out of time."""

    kind = "timeout"


__all__ = [
    "ClosedError",
    "ConflictError",
    "CtxStoreError",
    "DaemonUnavailableError",
    "IntegrityError",
    "InvalidInputError",
    "LocalProtocolError",
    "NotFoundError",
    "ProtocolError",
    "ReadOnlyError",
    "RemoteError",
    "RemoteProtocolError",
    "StorageError",
    "WaitTimeoutError",
    "WriterLockedError",
]
