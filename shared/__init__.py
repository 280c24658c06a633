"""ctxstore: versioned model contexts from one writer to many zero-copy readers.

The names below load on first use (PEP 562), so importing one part of the
package costs only that part: ``import ctxstore.wire`` (the sans-IO wire
protocol) does not open the store or load the importers, and
``import ctxstore.readers`` does not load the importers (``ctxstore.nodes``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from .store import PersistentStore, StoreView

__version__ = "0.1.0"

#: each public name and the submodule that defines it
_HOMES: dict[str, str] = {
    **dict.fromkeys(("CacheStats", "ContextCache"), "cache"),
    "Context": "context",
    **dict.fromkeys(
        (
            "ClosedError",
            "ConflictError",
            "CtxStoreError",
            "DaemonUnavailableError",
            "IntegrityError",
            "InvalidInputError",
            "LocalProtocolError",
            "NotFoundError",
            "PermissionDeniedError",
            "ProtocolError",
            "ReadOnlyError",
            "RemoteError",
            "RemoteProtocolError",
            "StorageError",
            "WaitTimeoutError",
            "WriterLockedError",
        ),
        "errors",
    ),
    **dict.fromkeys(
        (
            "CNNNode",
            "FileNode",
            "LLMNode",
            "Node",
            "create_node",
            "load_weights_file",
            "node_types",
        ),
        "nodes",
    ),
    **dict.fromkeys(
        ("ContextMetadata", "Problem", "SlotInfo", "TensorInfo", "VersionInfo"), "records"
    ),
    **dict.fromkeys(("PersistentStore", "StoreView"), "store"),
}


def __getattr__(name: str) -> Any:
    """Load a public name's submodule on first use (later uses find it in the namespace)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


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
    "StoreView",
    "TensorInfo",
    "VersionInfo",
    "WaitTimeoutError",
    "WriterLockedError",
    "__version__",
]
