"""Which tensor a follower already holds it may link into a pulled version, unread.

A pull needs only the tensors its store lacks. A held file is linked into the new
version without a byte of it read when the index vouches for it: its version was
recorded verified during this boot and the file's identity (size, mtime, inode,
device) is still the recorded one, the argument by which readers skip the hash
(docs/reliability.md). Any other held file is hashed first, and one that is not the
tensor's bytes (damaged on disk, tampered) is never reused: a follower serves what
its writer published, or nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from ..errors import CtxStoreError
from ..integrity import (
    VERIFIED,
    Identity,
    boot_id,
    hash_file,
    identity_of,
    stat_file,
    unpack_identities,
)
from ..sources import Imported, TensorSource, VerifiedFile, verified_source
from ..store import PersistentStore
from ..store import layout as store_layout
from ..store.npyfile import check_npy_header
from .layout import TensorEntry

log = logging.getLogger(__name__)


def reusable_copy(
    store: PersistentStore, tensor: TensorEntry, dtype: np.dtype[Any], imported: Imported
) -> TensorSource | None:
    """A stored copy of ``tensor`` for the commit to link, or None (download it).

    Its bytes are known without reading them when the index records its version
    verified during this boot with the file's present identity (the readers'
    trust argument, docs/reliability.md); else it is hashed here, and a copy that
    is not the tensor's bytes (damaged on disk, tampered) is never reused: a
    follower serves what its writer published or nothing.
    """
    found = _stored_copy(store, tensor)
    if found is None:
        return None
    path, vouched = found
    try:
        identity = stat_file(path)
        if identity != vouched:
            checksum, identity = hash_file(path)
            if checksum != tensor.checksum:
                log.warning(
                    "stored %s does not hash to %s (damaged?): downloading tensor %s",
                    path,
                    tensor.checksum,
                    tensor.name,
                )
                return None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    imported.closers.append(lambda: os.close(fd))
    try:
        if identity_of(os.fstat(fd)) != identity:
            return None  # replaced meanwhile
        check_npy_header(os.pread(fd, tensor.offset, 0), dtype, tensor.shape, tensor.offset)
    except (OSError, CtxStoreError):
        return None
    verified = VerifiedFile(path, tensor.checksum, identity)
    return verified_source(dtype, tensor.shape, fd, tensor.offset, verified)


def _stored_copy(store: PersistentStore, tensor: TensorEntry) -> tuple[str, Identity | None] | None:
    """A stored file with the tensor's checksum and layout, and the identity its
    version's verified record vouches for during this boot (None: none does)."""
    rows = store.read_query(
        "SELECT t.slot, t.version, t.position, c.state, c.boot_id, c.files FROM tensors t "
        "LEFT JOIN version_checks c ON c.slot = t.slot AND c.version = t.version "
        "WHERE t.checksum = ? AND t.nbytes = ? AND t.data_offset = ? LIMIT 4",
        (tensor.checksum, tensor.nbytes, tensor.offset),
    )
    first: tuple[str, Identity | None] | None = None
    this_boot = boot_id()
    for slot, version, position, state, boot, files in rows:
        if not type(slot) is type(version) is type(position) is int:
            continue  # a tampered row names no file to reuse
        path = store_layout.tensor_path_str(str(store.root), slot, version, position)
        identities = unpack_identities(files)
        if (state == VERIFIED and boot is not None and boot == this_boot
                and identities is not None and 0 <= position < len(identities)):  # fmt: skip
            return path, identities[position]
        first = first or (path, None)
    return first
