"""A version's tensor manifest: the read path's compact copy of its tensor rows.

Written once, in the commit transaction, beside the normalised ``tensors``
rows (which serve dedup, verify and the API). Decoding one msgpack blob costs
a fraction of materialising one SQL row per tensor, which is what keeps
opening a 300-tensor context near the cost of its 300 mmaps. ``verify``
checks that the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from .errors import IntegrityError
from .npyfile import shape_from_text

#: per tensor, in position order: name, dtype text, shape, data offset, data bytes, checksum
ManifestEntry = tuple[str, str, tuple[int, ...], int, int, str]
Manifest = tuple[ManifestEntry, ...]

_LIMITS: dict[str, Any] = {
    "max_str_len": 1 << 16,
    "max_array_len": 1 << 20,
    "max_map_len": 0,
    "max_bin_len": 0,
    "max_ext_len": 0,
}


def pack_manifest(rows: Sequence[tuple[int, str, str, str, int, int, str]]) -> bytes:
    """From the commit path's tensor rows (position, name, dtype, shape, offset, nbytes, sum)."""
    entries = [
        [name, dtype, list(shape_from_text(shape)), offset, nbytes, checksum]
        for _, name, dtype, shape, offset, nbytes, checksum in rows
    ]
    packed: bytes = msgpack.packb(entries, use_bin_type=True)
    return packed


def unpack_manifest(blob: bytes) -> Manifest:
    try:
        manifest: Manifest = msgpack.unpackb(blob, raw=False, use_list=False, **_LIMITS)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"stored tensor manifest is unreadable: {exc}") from exc
    if not isinstance(manifest, tuple):
        raise IntegrityError("stored tensor manifest is not a list")
    return manifest
