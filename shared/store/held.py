"""The arrays a reader process already holds, served again to a version that shares their files.

A writer links a tensor a new version leaves unchanged to the previous version's
file (same inode), so a following reader that adopted that version holds a map
of it already. :class:`HeldMaps` remembers, weakly, each array mapped from an
announcement by (file identity, dtype, shape, data offset): an entry lasts as
long as some version still holds the array, so it adds no memory and needs no
bound. Reusing one costs an ``lstat`` instead of an open, a map and an unmap.
A map lent out writable (the torch adapter) is never reused: a version must not
see edits made to another.
"""

from __future__ import annotations

import os
import weakref
from typing import cast

from ..context import Array
from ..integrity import Identity, identity_of
from .decode import MappedKey
from .npyfile import MapSpec, map_arrays


class HeldMaps:
    """This process's arrays of announced versions, by file and place, held weakly."""

    def __init__(self) -> None:
        self._arrays: weakref.WeakValueDictionary[MappedKey, Array] = weakref.WeakValueDictionary()
        #: files served from a map already held, not mapped again
        self.reused = 0

    def map_vouched(
        self, prefix: str, specs: tuple[MapSpec, ...], files: tuple[int, ...]
    ) -> tuple[list[Array], list[Identity], list[tuple[MappedKey, int]]] | None:
        """Each of ``specs`` (files under ``prefix``) mapped, or served from a held map
        of the very file; with each file's identity and the keys of the maps made here
        (for :meth:`keep`, once the caller has checked them). None when a file is not
        the one ``files`` (the writer's record, four integers per file) vouches for.

        A held map is served only if the path still names that file unchanged (one
        ``lstat``: identity as the record says and as it was when mapped), the check
        a fresh map gets from its ``fstat``, and only if no writable view of it was
        lent out (``PrivateMap.lent``: this process's edits stay with their version).
        Its header was checked when it was mapped.
        """
        held, lstat = self._arrays, os.lstat
        arrays: list[Array | None] = [None] * len(specs)
        identities: list[Identity] = []
        missing: list[int] = []
        served: set[int] = set()  # each held array once: two names are two maps, as mapped
        for index, (file_name, dtype, shape, offset, _) in enumerate(specs):
            size, mtime, inode, device = files[4 * index : 4 * index + 4]
            identity = (size, mtime, inode, device)
            identities.append(identity)
            array = held.get((identity, dtype, shape, offset))
            if (
                array is not None
                and id(array) not in served
                and not getattr(array.base, "lent", False)
            ):
                served.add(id(array))
                try:
                    same = identity_of(lstat(prefix + file_name)) == identity
                except OSError:
                    same = False
                if same:
                    arrays[index] = array
                    continue
            missing.append(index)
        new: list[tuple[MappedKey, int]] = []
        if missing:
            stats: list[os.stat_result] = []
            fresh = map_arrays(prefix, [specs[i] for i in missing], stats)
            for index, array, st in zip(missing, fresh, stats, strict=True):
                identity = identity_of(st)
                if identity != identities[index]:
                    return None
                arrays[index] = array
                _, dtype, shape, offset, _ = specs[index]
                new.append(((identity, dtype, shape, offset), index))
        self.reused += len(specs) - len(missing)
        return cast("list[Array]", arrays), identities, new  # every index filled above

    def keep(self, key: MappedKey, array: Array) -> None:
        """Remember ``array`` (checked) for the versions that will share its file."""
        self._arrays[key] = array
