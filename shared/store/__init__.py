"""The store: versions committed atomically to SQLite + .npy files, mapped zero-copy.

``PersistentStore(path)`` is the writer; ``PersistentStore(path, readonly=True)``
returns a :class:`StoreView`, the read-only view readers, hooks and the API's reads
get, which has no write method at all. Each module of this package holds one part
of the store; docs/architecture.md has the map.

The names below load on first use, so a helper module alone (``ctxstore.store.npyfile``,
which ``ctxstore.context`` needs) loads neither sqlite3 nor the store classes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checking import PASSING_KINDS, VERIFY_SETTLE_MAX_S, VERIFY_SETTLE_S
    from .decode import VersionRef
    from .repair import Repair
    from .view import StoreView
    from .writer import DEFAULT_RETENTION, PersistentStore

#: each public name and the module of this package that defines it
_HOMES: dict[str, str] = {
    **dict.fromkeys(("PASSING_KINDS", "VERIFY_SETTLE_MAX_S", "VERIFY_SETTLE_S"), "checking"),
    "VersionRef": "decode",
    "Repair": "repair",
    "StoreView": "view",
    **dict.fromkeys(("DEFAULT_RETENTION", "PersistentStore"), "writer"),
}


def __getattr__(name: str) -> Any:
    """Load a public name's module on first use (later uses find it in the namespace)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


__all__ = [
    "DEFAULT_RETENTION",
    "PASSING_KINDS",
    "VERIFY_SETTLE_MAX_S",
    "VERIFY_SETTLE_S",
    "PersistentStore",
    "Repair",
    "StoreView",
    "VersionRef",
]
