"""Node types by name: the built-ins plus those other packages register.

A package adds a node type by declaring an entry point in the group
``ctxstore.nodes`` whose name is the node type and whose object is a
:class:`~ctxstore.nodes.base.Node` subclass::

    [project.entry-points."ctxstore.nodes"]
    audio = "my_package.nodes:AudioNode"

Entry points are scanned once, lazily, on the first lookup of a name that is
not built in. A plugin that fails to import, is not a concrete Node subclass,
disagrees about its own name, or tries to replace a built-in is logged and
skipped: one broken package never takes the built-ins down with it.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..errors import InvalidInputError, NotFoundError
from ..validation import check_label
from .base import Node
from .cnn import CNNNode
from .files import FileNode
from .llm import LLMNode

ENTRY_POINT_GROUP = "ctxstore.nodes"

BUILTIN_NODE_TYPES: Mapping[str, type[Node]] = MappingProxyType(
    {"llm": LLMNode, "cnn": CNNNode, "file": FileNode}
)

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_plugins: Mapping[str, type[Node]] | None = None


def node_types() -> dict[str, type[Node]]:
    """Every usable node type by name: built-ins first, then plugins."""
    return {**BUILTIN_NODE_TYPES, **_plugin_types()}


def get_node_type(name: str) -> type[Node]:
    """The Node class registered as ``name``, or NotFoundError listing the known types."""
    if not isinstance(name, str):
        raise InvalidInputError(f"node type must be a string, got {type(name).__name__}")
    found = BUILTIN_NODE_TYPES.get(name) or _plugin_types().get(name)
    if found is None:
        known = ", ".join(sorted(node_types()))
        raise NotFoundError(f"unknown node type {name!r:.80}; known types: {known}")
    return found


def create_node(node_type: str, slot: int, config: Mapping[str, Any] | None = None) -> Node:
    """A node of the named type for ``slot``; its config is validated here."""
    return get_node_type(node_type)(slot, config)


def refresh_node_types() -> None:
    """Forget the scanned plugins; the next lookup scans the entry points again."""
    global _plugins  # noqa: PLW0603 - the one lazily built registry of this process
    with _lock:
        _plugins = None


def _plugin_types() -> Mapping[str, type[Node]]:
    global _plugins  # noqa: PLW0603
    plugins = _plugins
    if plugins is None:
        with _lock:
            if _plugins is None:
                _plugins = MappingProxyType(_scan_entry_points())
            plugins = _plugins
    return plugins


def _scan_entry_points() -> dict[str, type[Node]]:
    import importlib.metadata  # on first lookup of a plugin: it costs a daemon's start ~50 ms

    try:
        entry_points = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception:  # damaged distribution metadata must not break the built-ins
        _log.warning(
            "cannot list %r entry points; using built-in node types only",
            ENTRY_POINT_GROUP,
            exc_info=True,
        )
        return {}
    found: dict[str, type[Node]] = {}
    for entry_point in entry_points:
        node_class = _load(entry_point, found)
        if node_class is not None:
            found[entry_point.name] = node_class
    return found


def _load(entry_point: Any, found: Mapping[str, type[Node]]) -> type[Node] | None:
    """The Node class an entry point names, or None (logged) if it cannot be used."""
    name = getattr(entry_point, "name", None)
    where = f"node type entry point {name!r:.80} ({getattr(entry_point, 'value', '?')})"
    try:
        check_label(name, "node type")
    except InvalidInputError as exc:
        _log.warning("skipping %s: %s", where, exc)
        return None
    if name in BUILTIN_NODE_TYPES or name in found:
        _log.warning("skipping %s: node type %r is already registered", where, name)
        return None
    try:
        obj = entry_point.load()
    except Exception:  # a plugin may fail to import in any way; it must not break the others
        _log.warning("skipping %s: it failed to load", where, exc_info=True)
        return None
    if not (isinstance(obj, type) and issubclass(obj, Node)) or inspect.isabstract(obj):
        _log.warning("skipping %s: %r is not a concrete ctxstore.nodes.Node subclass", where, obj)
        return None
    if getattr(obj, "node_type", None) != name:
        _log.warning(
            "skipping %s: its class says node_type %r", where, getattr(obj, "node_type", None)
        )
        return None
    return obj
