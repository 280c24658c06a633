"""SIGHUP: read the configuration again, split into what applies now and what waits.

Settings marked ``live`` in the table (:mod:`.keys`) take effect at once; the
others are logged and keep their running value until a restart. A rotated
admin token is told apart by comparing the tokens, never shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .keys import KEYS
from .settings import DaemonConfig


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload does: the config to run with now and what waits for a restart."""

    config: DaemonConfig
    #: keys whose new value takes effect now
    changed: tuple[str, ...]
    #: (key, running value, configured value) for settings bound at start
    pending: tuple[tuple[str, Any, Any], ...]
    #: how the admin token changed ("admin token rotated", ...), or None; never the token
    token_change: str | None = None

    def describe(self) -> str:
        """What takes effect now, for the log: the live keys and the token, or "nothing"."""
        parts = [*self.changed, *([self.token_change] if self.token_change else [])]
        return ", ".join(parts) or "nothing"


def token_change(running: DaemonConfig, fresh: DaemonConfig) -> str | None:
    """How the admin token differs from ``running``'s to ``fresh``'s, in words, or None.

    The token lives in the file ``token_file`` names, so a rotation changes no
    setting: it is told by comparing the tokens themselves. ``fresh``'s file is
    read (the reload needs it anyway); ``running``'s token is the one it read at
    start, never read again (the file now holds the new one). The words never
    include either token.
    """
    new = fresh.token()
    old = running._token  # the token read at start, not what the file holds now
    if old is None and running.token_file is not None:
        return None  # never read by the running daemon: nothing to compare with
    if old == new:
        return None
    if old is None:
        return "admin token required"
    if new is None:
        return "admin token removed"
    return "admin token rotated"


def plan_reload(running: DaemonConfig) -> ReloadPlan:
    """Read the configuration again and split it into live changes and restart-only ones.

    Raises InvalidInputError (naming source, key and value) when the new
    configuration or its token file is bad; the caller then keeps ``running``.
    """
    fresh = running.reload()
    token = token_change(running, fresh)
    keep: dict[str, Any] = {}
    changed: list[str] = []
    pending: list[tuple[str, Any, Any]] = []
    for key in KEYS:
        old, new = getattr(running, key.field), getattr(fresh, key.field)
        if old == new:
            continue
        if key.live:
            changed.append(key.path)
        else:
            pending.append((key.path, old, new))
            keep[key.field] = old
    config = fresh
    if keep:  # token_file is live, never kept: the copy runs with the token just read
        config = fresh.replace(**keep)
        object.__setattr__(config, "_token", fresh._token)
    return ReloadPlan(config, tuple(changed), tuple(pending), token)
