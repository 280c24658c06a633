"""Which directories the daemon imports weights files from (the ``import_roots`` setting).

A file import names a path and the daemon opens it with its own rights. On
the socket the peer's ownership of the file already bounds what it can name;
over HTTP a token holder could name any file the daemon can read. With
``import_roots`` set, both are bounded: a file whose real location lies
outside every root is refused before a byte is read. The location is the
kernel's word on the opened descriptor (``/proc/self/fd``), never a second
lookup of the path, so no swap of symlinks or directories between open and
check can pass a file from outside. Empty roots (the default) restrict nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ctxstore.errors import InvalidInputError, PermissionDeniedError
from ctxstore.nodes.files import OpenedFile


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
    caller hears at once rather than when the job runs, where the opened file
    is checked again (:func:`check_opened_file`).
    """
    if not roots:
        return
    try:
        real = os.path.realpath(path)
    except (ValueError, UnicodeError) as exc:  # NUL bytes, unencodable names
        raise InvalidInputError(f"weights file path {path!r:.200} is not usable: {exc}") from None
    if not _inside(real, roots):
        raise _refusal(roots, f"weights file {path!r}")


def check_opened_file(roots: Sequence[Path], opened: OpenedFile, where: str) -> None:
    """An importer's FileCheck: the file open on ``opened.fd`` must lie under a root."""
    if not roots:
        return
    try:
        real = os.readlink(f"/proc/self/fd/{opened.fd}")
    except OSError as exc:
        raise PermissionDeniedError(
            f"cannot tell where {where} lies (/proc/self/fd: {exc.strerror or exc}); "
            "import_roots needs /proc to check imports"
        ) from None
    if not _inside(real, roots):
        raise _refusal(roots, where)
