"""Nodes: builders that make a context for a slot (synthetic LLM / CNN weights, file imports)."""

from .base import Node, Param
from .cnn import CNNNode
from .files import (
    DEFAULT_MAX_IMPORT_BYTES,
    FileNode,
    ImportLimits,
    WeightsFile,
    detect_format,
    load_weights_file,
    read_weights_file,
)
from .imports import open_import
from .llm import LLMNode
from .registry import (
    ENTRY_POINT_GROUP,
    create_node,
    get_node_type,
    node_types,
    refresh_node_types,
)

__all__ = [
    "CNNNode",
    "DEFAULT_MAX_IMPORT_BYTES",
    "ENTRY_POINT_GROUP",
    "FileNode",
    "ImportLimits",
    "LLMNode",
    "Node",
    "Param",
    "WeightsFile",
    "create_node",
    "detect_format",
    "get_node_type",
    "load_weights_file",
    "node_types",
    "open_import",
    "read_weights_file",
    "refresh_node_types",
]
