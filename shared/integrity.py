"""Verify once per host: what a writer records after hashing a version, and what it vouches for.

The daemon hashes each new version once, right after its commit and before it
is announced, and records in the index (table ``version_checks``) that the
version's files matched their checksums, with each file's identity as it
hashed it: size, mtime_ns, inode and device, and the host's boot id. A reader
that finds such a record, made during this boot while a daemon runs, and files
whose identity (one ``fstat`` each, on the descriptors it maps) is the
recorded one, serves the version without hashing it again. Anything else (no
record, another boot, no daemon, a file replaced or written since) is hashed
as before. The trust argument is in docs/reliability.md.

A version whose files do not match (found by that hash, or by a reader and
confirmed by the daemon) is recorded ``damaged`` instead: readers do not map
it, ``ctxstore verify`` names it, and ``/metrics`` counts it.
"""

from __future__ import annotations

import functools
import operator
import os
import stat
import struct
from collections.abc import Callable, Sequence
from typing import Final

import xxhash

#: state of a row in ``version_checks``
VERIFIED: Final = "verified"
DAMAGED: Final = "damaged"

#: one file's identity: size, mtime_ns, inode, device
Identity = tuple[int, int, int, int]

_IDENTITY = struct.Struct("<QqQQ")
_CHUNK = 1 << 20
_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


@functools.cache
def boot_id() -> str | None:
    """This boot of this host (Linux), or None: a record made without one is never trusted."""
    try:
        with open(_BOOT_ID_PATH, encoding="ascii") as f:
            text = f.read(64).strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


#: a file's identity (size, mtime_ns, inode, device) from its stat, in C (one attrgetter
#: call: a reader takes it of every file of every version it maps)
identity_of: Final[Callable[[os.stat_result], Identity]] = operator.attrgetter(
    "st_size", "st_mtime_ns", "st_ino", "st_dev"
)


def pack_identities(identities: Sequence[Identity]) -> bytes:
    """The identities of a version's files, in position order, as stored in the index."""
    return b"".join(_IDENTITY.pack(*identity) for identity in identities)


def unpack_identities(blob: object) -> tuple[Identity, ...] | None:
    """Inverse of :func:`pack_identities`; None for anything malformed (never trusted)."""
    if not isinstance(blob, bytes) or len(blob) % _IDENTITY.size:
        return None
    return tuple(_IDENTITY.iter_unpack(blob))


def stat_file(path: str) -> Identity:
    """The identity of the regular file at ``path``, without reading it (symlinks and
    non-regular files are refused with OSError, as :func:`hash_file` refuses them)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path} is not a regular file")
    return identity_of(st)


def hash_file(path: str) -> tuple[str, Identity]:
    """The xxh3-128 of the regular file at ``path`` and its identity while it was hashed.

    The identity is taken on the descriptor that is hashed, before and after:
    a file written meanwhile raises OSError (EAGAIN) rather than be vouched
    for. Symlinks and non-regular files are refused (OSError) without reading.
    Read with ``pread``, not a map: a file truncated meanwhile can end the read
    early, never fault the process (SIGBUS).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise OSError(f"{path} is not a regular file")
        hasher = xxhash.xxh3_128()
        buffer = bytearray(min(_CHUNK, before.st_size + 1))  # +1: the read that sees the end
        with memoryview(buffer) as view:
            offset = 0
            while n := os.preadv(fd, [view], offset):
                hasher.update(view[:n])
                offset += n
        identity = identity_of(before)
        if identity_of(os.fstat(fd)) != identity:
            raise BlockingIOError(f"{path} changed while it was hashed")
    finally:
        os.close(fd)
    return str(hasher.hexdigest()), identity
