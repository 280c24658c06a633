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
from .records import ContextMetadata, Problem, SlotInfo, TensorInfo, VersionInfo
from .store import PersistentStore

__version__ = "0.1.0"

__all__ = [
    "ClosedError",
    "ConflictError",
    "Context",
    "ContextMetadata",
    "CtxStoreError",
    "DaemonUnavailableError",
    "IntegrityError",
    "InvalidInputError",
    "LocalProtocolError",
    "NotFoundError",
    "PersistentStore",
    "Problem",
    "ProtocolError",
    "ReadOnlyError",
    "RemoteError",
    "RemoteProtocolError",
    "SlotInfo",
    "StorageError",
    "TensorInfo",
    "VersionInfo",
    "WaitTimeoutError",
    "WriterLockedError",
    "__version__",
]
