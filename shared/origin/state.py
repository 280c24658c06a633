"""A follower's saved state: the head ``seq`` applied per slot, and its counters.

``<store>/origin/follower.json``, replaced atomically (written beside, fsynced,
renamed, the directory fsynced) after every applied head, so a follower that
restarts neither applies an entry twice nor moves backwards.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IntegrityError
from ..store.durable import fsync_dir

STATE_NAME = "follower.json"


@dataclass
class FollowStats:
    versions_pulled: int = 0
    objects_downloaded: int = 0
    bytes_downloaded: int = 0
    #: bytes of heads and manifests read (what moves besides the objects)
    record_bytes: int = 0
    tensors_reused: int = 0
    pointer_moves: int = 0
    refused: int = 0
    polls: int = 0
    hints: int = 0
    last_error: str | None = None


@dataclass
class FollowState:
    """Applied head seq per slot, and the counters; saved after every applied head."""

    heads: dict[int, int] = field(default_factory=dict)
    stats: FollowStats = field(default_factory=FollowStats)

    @classmethod
    def load(cls, path: Path) -> FollowState:
        try:
            body = json.loads(path.read_bytes())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"{path} is unreadable ({exc}): remove it to re-sync") from None
        stats = FollowStats(**{k: v for k, v in body.get("stats", {}).items()
                               if k in FollowStats.__dataclass_fields__})  # fmt: skip
        return cls({int(s): int(q) for s, q in body.get("heads", {}).items()}, stats)

    def save(self, path: Path) -> None:
        body = {"heads": {str(s): q for s, q in self.heads.items()}, "stats": asdict(self.stats)}
        temporary = path.with_suffix(".tmp")
        with open(temporary, "wb") as out:
            out.write(json.dumps(body, sort_keys=True).encode())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        fsync_dir(path.parent)


def state_summary(state_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The follower's saved state as a dict (tests, status)."""
    state = FollowState.load(Path(state_dir) / STATE_NAME)
    return {"heads": state.heads, "stats": asdict(state.stats)}
