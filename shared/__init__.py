"""ctxstore: versioned model contexts from one writer to many zero-copy readers."""

from .cache import CacheStats, ContextCache
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
    PermissionDeniedError,
    ProtocolError,
    ReadOnlyError,
    RemoteError,
    RemoteProtocolError,
    StorageError,
    WaitTimeoutError,
    WriterLockedError,
)
from .nodes import CNNNode, FileNode, LLMNode, Node, create_node, load_weights_file, node_types
from .records import ContextMetadata, Problem, SlotInfo, TensorInfo, VersionInfo
from .store import PersistentStore

__version__ = "0.1.0"

__all__ = [
    "CNNNode",
    "CacheStats",
    "ContextCache",
    "FileNode",
    "LLMNode",
    "Node",
    "create_node",
    "load_weights_file",
    "node_types",
    "ClosedError",
    "ConflictError",
    "PermissionDeniedError",
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
