"""A version's tensor manifest: the read path's compact copy of its tensor rows.

Written once, in the commit transaction, beside the normalised ``tensors``
rows (which serve dedup, verify and the API). Decoding one msgpack blob costs
a fraction of materialising one SQL row per tensor, which is what keeps
opening a 300-tensor context near the cost of its 300 mmaps. ``verify``
checks that the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

import msgpack
import numpy as np

from ..errors import IntegrityError
from .npyfile import dtype_from_text, shape_from_text

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


#: no .npy header is shorter (numpy pads them to a multiple of 64 bytes), so no data
#: starts before this byte of its file
MIN_DATA_OFFSET = 64
#: the most dimensions a stored array has (numpy's own limit)
MAX_NDIM = 64
#: the largest byte count one array can span (what numpy can index)
_MAX_BYTES = 2**63 - 1


def unpack_manifest(blob: bytes) -> Manifest:
    """Decode a stored manifest and check every value in it before anyone uses one.

    The index is data like any other, and a tampered one must not crash or fool
    the read path: IntegrityError unless each entry is (name, dtype, shape,
    offset, nbytes, checksum) with a dtype :func:`check_recorded_dtype` allows,
    a shape of non-negative integers, data that starts after the smallest .npy
    header and spans exactly the shape's bytes, and no name twice. Whether the
    file really holds that header is checked where the file is read whole
    (re-hashing, ``verify``); that it has ``offset + nbytes`` bytes, at every map.
    """
    try:
        manifest: Manifest = msgpack.unpackb(blob, raw=False, use_list=False, **_LIMITS)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"stored tensor manifest is unreadable: {exc}") from exc
    if not isinstance(manifest, tuple):
        raise IntegrityError("stored tensor manifest is not a list")
    names: set[object] = set()
    for position, entry in enumerate(manifest):
        check_entry(entry, f"stored tensor manifest entry {position}")
        names.add(entry[0])
    if len(names) != len(manifest):
        raise IntegrityError("stored tensor manifest names a tensor twice")
    return manifest


def layout_entries(blob: bytes) -> tuple[tuple[Any, ...], ...]:
    """The writer's own stored manifest without its checksums: ``(name, dtype, shape,
    offset, nbytes)`` per tensor, for its announcements. Not checked here: what reads
    it checks it (:func:`check_layout_entries`)."""
    try:
        manifest = msgpack.unpackb(blob, raw=False, use_list=False, **_LIMITS)
        return tuple(tuple(entry[:5]) for entry in manifest)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"stored tensor manifest is unreadable: {exc}") from exc


#: the longest dtype text an announcement's record may carry (what the store writes is
#: far shorter; a longer one sends the reader to the index)
MAX_ANNOUNCED_DTYPE_TEXT: Final = 4096


def check_layout_entries(entries: object) -> tuple[tuple[Any, ...], ...]:
    """Raise IntegrityError unless ``entries`` (an announcement's tensors) is a non-empty
    tuple of ``(name, dtype, shape, offset, nbytes)`` that :func:`check_entry` would allow
    with a checksum beside it, no name twice; returns it."""
    if not isinstance(entries, tuple) or not entries:
        raise IntegrityError("the announced tensors are not a list")
    names: set[object] = set()
    for position, entry in enumerate(entries):
        if not isinstance(entry, tuple) or len(entry) != 5:
            raise IntegrityError(
                f"announced tensor {position} is not [name, dtype, shape, offset, nbytes]"
            )
        if isinstance(entry[1], str) and len(entry[1]) > MAX_ANNOUNCED_DTYPE_TEXT:
            raise IntegrityError(  # parsed, a dtype text costs time and memory per byte
                f"announced tensor {position}: a dtype text of {len(entry[1])} characters "
                f"(at most {MAX_ANNOUNCED_DTYPE_TEXT})"
            )
        check_entry((*entry, ""), f"announced tensor {position}")
        names.add(entry[0])
    if len(names) != len(entries):
        raise IntegrityError("the announced tensors name a tensor twice")
    return entries


def check_entry(entry: object, where: str) -> None:
    """Raise IntegrityError unless ``entry`` is a manifest entry that can be right."""
    if not isinstance(entry, tuple) or len(entry) != 6:
        raise IntegrityError(f"{where} is not [name, dtype, shape, offset, nbytes, checksum]")
    name, dtype_text, shape, offset, nbytes, checksum = entry
    if not isinstance(name, str) or not name:
        raise IntegrityError(f"{where}: the name is not a string")
    if not isinstance(checksum, str):
        raise IntegrityError(f"{where} ({name!r:.80}): the checksum is not a string")
    if not isinstance(dtype_text, str):
        raise IntegrityError(f"{where} ({name!r:.80}): the dtype is not a string")
    check_layout(shape, offset, nbytes, dtype_from_text(dtype_text), f"{where}: {name!r:.80}")


def check_layout(
    shape: object, offset: object, nbytes: object, dtype: np.dtype[Any], where: str
) -> None:
    """Raise IntegrityError unless a tensor record's shape, data offset and byte count agree:
    non-negative integers, at most :data:`MAX_NDIM` dimensions, data from
    :data:`MIN_DATA_OFFSET` on, ``nbytes == product(shape) * itemsize``. Shared by the
    manifest and verify's check of the ``tensors`` rows; ``where`` names the tensor."""
    itemsize = dtype.itemsize
    if (
        not isinstance(shape, tuple)
        or len(shape) > MAX_NDIM
        or not all(type(n) is int and n >= 0 for n in shape)
    ):
        raise IntegrityError(f"{where}: the shape {shape!r:.80} is not a tuple of sizes")
    if type(offset) is not int or not MIN_DATA_OFFSET <= offset <= _MAX_BYTES:
        raise IntegrityError(
            f"{where}: the data offset {offset!r:.40} is not where a .npy file's data can start"
        )
    if type(nbytes) is not int or nbytes != math.prod(shape) * itemsize:
        raise IntegrityError(
            f"{where} is {dtype} {list(shape)} in {nbytes!r:.40} bytes, which takes "
            f"{math.prod(shape) * itemsize}"
        )
    if math.prod(n for n in shape if n) * itemsize + offset > _MAX_BYTES:
        raise IntegrityError(f"{where}: the shape {list(shape)} is too large for any file")
