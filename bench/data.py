"""Synthetic tensors, page-cache control and disk accounting shared by the scenarios."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]

PAGE = mmap.PAGESIZE
KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30


def layer_weights(
    count: int, rng: np.random.Generator, *, min_bytes: int = KIB, max_bytes: int = 64 * KIB
) -> dict[str, Array]:
    """``count`` float32 tensors of ``min_bytes``..``max_bytes`` each, named like model layers."""
    sizes = rng.integers(min_bytes // 4, max_bytes // 4, size=count, endpoint=True)
    return {
        f"layers.{i}.weight": rng.standard_normal(int(n), dtype=np.float32)
        for i, n in enumerate(sizes)
    }


def unique_bytes(nbytes: int, rng: np.random.Generator) -> Array:
    """A writable uint8 array of random bytes (callers stamp a counter to keep commits distinct)."""
    return np.frombuffer(bytearray(rng.bytes(nbytes)), dtype=np.uint8)


def stamp(array: Array, counter: int) -> None:
    """Write ``counter`` into the first 8 bytes so no two commits share a checksum."""
    array[:8] = np.frombuffer(counter.to_bytes(8, "little"), dtype=np.uint8)[: min(8, array.size)]


def weights_nbytes(weights: Mapping[str, Array]) -> int:
    return sum(a.nbytes for a in weights.values())


def touch(arrays: Iterable[Array]) -> int:
    """Read one byte in every page of every array (and its last byte): fault all of it in."""
    total = 0
    for array in arrays:
        flat = array.reshape(-1).view(np.uint8)
        if flat.size:
            total += int(flat[::PAGE].sum()) + int(flat[-1])
    return total


def recycle_guest_memory(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh anonymous memory, then free it.

    On a virtual machine whose host backs guest memory lazily, the first write
    to a guest page the host never backed costs a fault in the host, so a 1 GiB
    write into the page cache takes 0.25 s or 3 s depending on which free pages
    it draws. Freeing memory just touched puts backed pages at the head of the
    free lists, so the next large write draws those, whoever issues it: the
    lottery leaves the comparison without changing what is compared.
    """
    scratch = np.ones(nbytes, dtype=np.uint8)  # np.ones writes every page
    del scratch


# -- page cache ---------------------------------------------------------------------------


def drop_page_cache(paths: Iterable[str]) -> None:
    """Ask the kernel to drop each file's clean pages (POSIX_FADV_DONTNEED).

    Pages that are dirty or mapped by a process stay; callers sync once after
    writing and release every mapping first. :func:`resident_fraction` checks
    that the drop worked.
    """
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def resident_pages(path: str) -> tuple[int, int] | None:
    """(resident, total) pages of ``path`` in the page cache, via mincore(2); None if unknown."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return (0, 0)
        # a private mapping, never written: mincore reports the file's page-cache pages
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    pages = (size + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * pages)()
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        rc = _libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec)
    finally:
        del anchor
        mm.close()
    if rc != 0:
        return None
    return sum(b & 1 for b in vec), pages


def resident_fraction(paths: Iterable[str]) -> float | None:
    """Share of the files' pages in the page cache (0.0 = fully cold); None if unknown."""
    resident = total = 0
    for path in paths:
        counts = resident_pages(path)
        if counts is None:
            return None
        resident += counts[0]
        total += counts[1]
    return resident / total if total else 0.0
