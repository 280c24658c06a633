"""How many peers, streams and unfinished bytes the daemon takes, and why those numbers.

Every connection costs a file descriptor, and a daemon out of descriptors can
accept nobody: not a reader, not a publisher, not ``/health``. So the caps are
derived from the soft ``RLIMIT_NOFILE`` at start (``0`` in the configuration
means "derive it"), with descriptors set aside first for the daemon's own work:

    usable          = nofile - RESERVED_FDS (160)          (at least 16)
    http            = max_http_connections    or min(usable // 4, 1024) (requests, /events)
    event_streams   = max_event_streams       or http // 2 (the other half: plain requests)
    connections     = max_connections         or min(usable - http, 4096)
    per_uid         = max_connections_per_uid or connections // 2
    partial_bytes   = max_partial_bytes       or 4 * max_frame_size
    uid_rate        = uid_rate                or 2 * peer_rate

The ceilings (1024, 4096) bound memory when the descriptor limit is large
(systemd/ctxstore.service sets 65536): each peer may hold up to about 128 KiB
of read buffers. A configured cap larger than the descriptors allow is lowered
to what they allow, with a warning. docs/configuration.md has the same table and a worked
example. The module also makes freed buffers go back to the operating system
(:func:`return_freed_memory`), so memory a departed peer held does not stay
in the daemon's RSS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource
from dataclasses import dataclass

from .config import DaemonConfig

log = logging.getLogger("ctxstore.daemon")

#: connections the Unix socket and the HTTP port accept in one go (their listen backlog,
#: and how many asyncio accepts per wake-up): each holds a descriptor until the caps close it
UNIX_BACKLOG = 64
HTTP_BACKLOG = 32
#: descriptors kept for the store (index, its WAL and shm, the lock, tensor files being
#: written or imported), the version table, the listening sockets, logs and worker threads
#: (64), and for the connections accepted in one go before the caps refuse them
RESERVED_FDS = 64 + UNIX_BACKLOG + HTTP_BACKLOG
MIN_USABLE_FDS = 16
#: the most connections a derived cap allows, whatever the descriptor limit (memory)
DERIVED_MAX_CONNECTIONS = 4096
DERIVED_MAX_HTTP_CONNECTIONS = 1024
#: glibc's mallopt parameter number for the mmap threshold
_M_MMAP_THRESHOLD = -3
#: its documented default; setting it explicitly turns off glibc's sliding threshold
MMAP_THRESHOLD = 128 << 10


@dataclass(frozen=True, slots=True)
class Limits:
    """The caps in force (configured, or derived from the descriptor limit)."""

    nofile: int
    connections: int
    per_uid: int
    http_connections: int
    event_streams: int
    partial_bytes: int
    #: budget units a second the peers of one uid share for answered frames (budgets.py)
    uid_rate: int = 2000

    def describe(self) -> str:
        return (
            f"{self.connections} socket peers ({self.per_uid} per uid), "
            f"{self.http_connections} HTTP connections ({self.event_streams} /events streams), "
            f"{self.partial_bytes} bytes of unfinished frames, {self.uid_rate} answered-frame "
            f"units a second per uid; RLIMIT_NOFILE {self.nofile}"
        )


def soft_nofile() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def derive_limits(config: DaemonConfig, nofile: int | None = None) -> Limits:
    """The caps for ``config`` under ``nofile`` descriptors (the soft limit now, by default)."""
    nofile = soft_nofile() if nofile is None else nofile
    usable = max(nofile - RESERVED_FDS, MIN_USABLE_FDS)
    fit = usable // 4
    http = _capped(
        "max_http_connections",
        config.max_http_connections,
        min(fit, DERIVED_MAX_HTTP_CONNECTIONS),
        fit,
        nofile,
    )
    fit = max(1, http // 2)
    event_streams = _capped("max_event_streams", config.max_event_streams, fit, fit, nofile)
    fit = max(1, usable - http)
    connections = _capped(
        "max_connections",
        config.max_connections,
        min(fit, DERIVED_MAX_CONNECTIONS),
        fit,
        nofile,
    )
    per_uid = config.max_connections_per_uid or max(1, connections // 2)
    return Limits(
        nofile=nofile,
        connections=connections,
        per_uid=min(per_uid, connections),
        http_connections=max(1, http),
        event_streams=event_streams,
        partial_bytes=config.max_partial_bytes or 4 * config.max_frame_size,
        uid_rate=config.uid_rate or 2 * config.peer_rate,
    )


def _capped(key: str, configured: int, derived: int, fits: int, nofile: int) -> int:
    """``configured``, lowered to what the descriptors ``fits``; ``derived`` when it is 0."""
    if not configured:
        return derived
    if configured > fits:
        log.warning(
            "%s = %d needs more file descriptors than RLIMIT_NOFILE %d leaves; using %d "
            "(raise LimitNOFILE= to allow more)",
            key,
            configured,
            nofile,
            fits,
        )
        return fits
    return configured


def stream_sizes(read_buffer: int) -> tuple[int, int]:
    """(the asyncio StreamReader's limit, the bytes its transport asks the kernel for per
    read) for ``limits.read_buffer``. The stream stops reading a peer's socket past twice
    its limit, so it holds at most ``read_buffer`` (half before the pause, half from the
    read that crossed it); bytes the daemon is not ready for wait in the kernel."""
    return max(1, read_buffer // 4), max(1, read_buffer // 2)


def return_freed_memory() -> bool:
    """Make glibc give large freed buffers back to the system at once.

    By default glibc raises its mmap threshold each time a large block is freed,
    so after one peer's 1 MiB frame later ones come from the heap, and a heap
    fragmented by a thousand such buffers is never returned. A fixed threshold
    keeps every block of 128 KiB or more in its own mapping, unmapped on free.
    False where the C library has no ``mallopt`` (musl): nothing changes there.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
