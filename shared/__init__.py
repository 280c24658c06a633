"""ctxstore: versioned model contexts from one writer to many zero-copy readers."""

from .context import Context
from .errors import (
    ClosedError,
    ConflictError,
    CtxStoreError,
    DaemonUnavailableError,
    IntegrityError,
    InvalidInputError,
    LocalProtocolError,
    NotFoundError,
    ProtocolError,
    ReadOnlyError,
    RemoteError,
    RemoteProtocolError,
    StorageError,
    WaitTimeoutError,
    WriterLockedError,
)

__version__ = "0.1.0"

__all__ = [
    "ClosedError",
    "ConflictError",
    "Context",
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
    "__version__",
]
