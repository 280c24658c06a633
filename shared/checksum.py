"""xxh3-128 checksums of stored tensor files (about 17 GB/s, against 1.5 GB/s for sha256)."""

from __future__ import annotations

from collections.abc import Iterable

import xxhash


def checksum_parts(parts: Iterable[memoryview | bytes]) -> str:
    """The hex xxh3-128 of the concatenation of ``parts`` (a header and the data)."""
    hasher = xxhash.xxh3_128()
    for part in parts:
        hasher.update(part)
    return str(hasher.hexdigest())
