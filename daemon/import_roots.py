"""Which directories the daemon imports weights files from (the ``import_roots`` setting).

A file import names a path and the daemon opens it with its own rights. On
the socket the peer's ownership of the file already bounds what it can name;
over HTTP a token holder could name any file the daemon can read. With
``import_roots`` set, both are bounded: a path whose real location (symlinks
resolved) lies outside every root is refused before a byte is read. The
check is made on the opened file, so a path swapped after the check is
caught instead of read. Empty roots (the default) restrict nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ctxstore.errors import InvalidInputError, PermissionDeniedError


def _inside(real: str, roots: Sequence[Path]) -> bool:
    for root in roots:
        base = os.path.realpath(root)
        if real.startswith(base if base.endswith(os.sep) else base + os.sep):
            return True
    return False


def _refusal(roots: Sequence[Path], what: str) -> PermissionDeniedError:
    listed = ", ".join(os.fspath(root) for root in roots)
    return PermissionDeniedError(
        f"{what} is outside the daemon's import roots ({listed}); "
        "move it under one of them or extend import_roots"
    )


def check_import_path(roots: Sequence[Path], path: str) -> None:
    """Refuse ``path`` when roots are set and it does not resolve under one of them.

    For requests that name a file to be read later (a queued build job): the
    caller hears at once, rather than when the job runs.
    """
    if roots and not _inside(os.path.realpath(path), roots):
        raise _refusal(roots, f"weights file {path!r}")


def check_opened_file(roots: Sequence[Path], name: str, status: os.stat_result, where: str) -> None:
    """An importer's FileCheck: the opened file ``name`` (``status``) must lie under a root."""
    if not roots:
        return
    real = os.path.realpath(name)
    if not _inside(real, roots):
        raise _refusal(roots, where)
    try:
        found = os.stat(real)
    except OSError as exc:
        raise InvalidInputError(f"{where} cannot be checked: {exc.strerror or exc}") from None
    if (found.st_dev, found.st_ino) != (status.st_dev, status.st_ino):
        raise InvalidInputError(f"{where} was replaced while it was being opened; try again")
