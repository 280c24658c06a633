"""The daemon's settings, with the embedded defaults it runs on when nothing is given."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ctxstore.errors import InvalidInputError
from ctxstore.paths import default_socket_path, default_store_dir
from ctxstore.protocol import DEFAULT_MAX_FRAME_SIZE, MAX_FRAME_SIZE, MIN_FRAME_SIZE
from ctxstore.store import DEFAULT_RETENTION


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    store: Path = field(default_factory=default_store_dir)
    socket: Path = field(default_factory=default_socket_path)
    socket_group: str | None = None
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()
    retention: int = DEFAULT_RETENTION
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    #: a reader whose outbox does not drain for this long is disconnected
    stuck_timeout: float = 5.0
    #: a reader that sends nothing (not even a heartbeat) for this long is disconnected
    silent_timeout: float = 10.0
    table_capacity: int = 65536
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.retention < 1:
            raise InvalidInputError(f"retention must be at least 1, got {self.retention}")
        if not MIN_FRAME_SIZE <= self.max_frame_size <= MAX_FRAME_SIZE:
            raise InvalidInputError(
                f"max_frame_size must be in [{MIN_FRAME_SIZE}, {MAX_FRAME_SIZE}], "
                f"got {self.max_frame_size}"
            )
        for name in ("stuck_timeout", "silent_timeout"):
            value = getattr(self, name)
            if not 0 < value <= 3600:
                raise InvalidInputError(f"{name} must be in (0, 3600] seconds, got {value}")

    def replace(self, **changes: object) -> DaemonConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
