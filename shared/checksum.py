"""xxh3-128 checksums of stored tensor files (about 17 GB/s, against 1.5 GB/s for sha256)."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable

import xxhash


def checksum_parts(parts: Iterable[memoryview | bytes]) -> str:
    """The hex xxh3-128 of the concatenation of ``parts`` (a header and the data)."""
    hasher = xxhash.xxh3_128()
    for part in parts:
        hasher.update(part)
    return str(hasher.hexdigest())


_CHUNK = 16 << 20


def checksum_file(path: str) -> str:
    """The hex xxh3-128 of a whole file, read through a map in chunks (a follower hashes
    each object it downloads from the origin with this, ctxstore.origin.follower)."""
    hasher = xxhash.xxh3_128()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size:
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    for start in range(0, size, _CHUNK):
                        hasher.update(view[start : start + _CHUNK])
                finally:
                    view.release()
    finally:
        os.close(fd)
    return str(hasher.hexdigest())
