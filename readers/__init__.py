"""The reader library used inside inference workers (never imports the daemon).

``Reader`` maps contexts zero-copy and keeps them current; ``AsyncReader`` is
its face for asyncio servers.
"""

from .aio import AnnouncementStream, AsyncReader
from .connection import Backoff
from .memory import process_memory
from .reader import Reader, ReaderStats
from .subscriptions import Subscription, VersionEvent

__all__ = [
    "AnnouncementStream",
    "AsyncReader",
    "Backoff",
    "Reader",
    "ReaderStats",
    "Subscription",
    "VersionEvent",
    "process_memory",
]
