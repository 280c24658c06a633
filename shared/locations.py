"""Where a store and the daemon's socket live when nobody says.

Precedence: the command-line flag, then CTXSTORE_HOME / CTXSTORE_SOCKET, then
systemd's $STATE_DIRECTORY / $RUNTIME_DIRECTORY, then the user's state
directory and $XDG_RUNTIME_DIR (or a per-user temp dir).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

SOCKET_NAME = "ctxstore.sock"


def _first_dir(var: str) -> Path | None:
    value = os.environ.get(var)
    return Path(value.split(":")[0]) if value else None


def default_store_dir() -> Path:
    explicit = _first_dir("CTXSTORE_HOME") or _first_dir("STATE_DIRECTORY")
    if explicit is not None:
        return explicit
    state_home = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state_home) / "ctxstore"


def default_socket_path() -> Path:
    explicit = os.environ.get("CTXSTORE_SOCKET")
    if explicit:
        return Path(explicit)
    runtime = _first_dir("RUNTIME_DIRECTORY")
    if runtime is not None:
        return runtime / SOCKET_NAME
    xdg = _first_dir("XDG_RUNTIME_DIR")
    if xdg is not None:
        return xdg / "ctxstore" / SOCKET_NAME
    return Path(tempfile.gettempdir()) / f"ctxstore-{os.getuid()}" / SOCKET_NAME
