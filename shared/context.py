"""The immutable Context: named tensors + config + metadata, bound to a slot and version.

A Context is a value. Its arrays are read-only all the way down (backed by a
stored file's copy-on-write map, or a private immutable copy), its config and
metadata are frozen, and every setter returns a new Context. Only a deliberately
writable view of a stored map (the torch adapter's tensors) can change what this
process sees; the file and other processes never see it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from operator import attrgetter
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import InvalidInputError
from .foreign import as_numpy
from .store.npyfile import PrivateMap
from .validation import (
    MAX_TENSORS,
    check_dtype,
    check_tensor_name,
    freeze_mapping,
    thaw_json,
)

Array = npt.NDArray[Any]
WeightsLike = Mapping[str, Any] | Sequence[Any] | Array


def _is_immutable(array: Array) -> bool:
    """True when no one can write through ``array`` or anything it views.

    A stored file's map counts as immutable: its pages are copy-on-write, so
    only a deliberately writable view in this process (the torch adapter's) can
    change them, and never for the file or another process.
    """
    if array.flags.writeable:
        return False
    root: Any = array
    while isinstance(root, np.ndarray) and root.base is not None:
        root = root.base
    if isinstance(root, np.ndarray):
        return False  # an array that owns its data can be made writeable again
    if isinstance(root, PrivateMap):
        return True  # a stored file's copy-on-write map: writes never leave this process
    try:
        return memoryview(root).readonly
    except TypeError:
        return False


def freeze_array(value: Any, name: str) -> Array:
    """A read-only array that nothing can mutate: ``value`` itself when it already is one.

    ``value`` may also be a torch tensor or JAX array (see foreign.py); its
    dtype must read back as itself (validation.check_dtype), so nothing is
    stored as raw void.
    """
    if isinstance(value, np.ndarray) and _is_immutable(value):
        check_dtype(value.dtype, name)
        return value
    array = as_numpy(value, name)
    check_dtype(array.dtype, name)
    if array.dtype.itemsize == 0:
        raise InvalidInputError(f"tensor {name!r} has zero-size dtype {array.dtype}")
    frozen = np.frombuffer(array.tobytes(order="C"), dtype=array.dtype)
    return frozen.reshape(array.shape)


def normalize_weights(weights: WeightsLike | None) -> dict[str, Array]:
    """Accept a mapping, a single array or a sequence of arrays; return frozen named arrays."""
    if weights is None:
        return {}
    if isinstance(weights, np.ndarray | np.generic):
        items: list[tuple[Any, Any]] = [("0", weights)]
    elif isinstance(weights, Mapping):
        items = list(weights.items())
    elif isinstance(weights, list | tuple):
        items = [(str(i), w) for i, w in enumerate(weights)]
    else:
        raise InvalidInputError(
            f"weights must be a dict of arrays, an array or a list of arrays, "
            f"got {type(weights).__name__}"
        )
    if len(items) > MAX_TENSORS:
        raise InvalidInputError(f"a context holds at most {MAX_TENSORS} tensors, got {len(items)}")
    out: dict[str, Array] = {}
    for name, value in items:
        check_tensor_name(name)
        if name in out:
            raise InvalidInputError(f"duplicate tensor name {name!r}")
        out[name] = freeze_array(value, name)
    return out


_NBYTES = attrgetter("nbytes")


class Context:
    """Named read-only tensors plus config and metadata; bound to (slot, version) once stored."""

    __slots__ = ("_config", "_metadata", "_slot", "_version", "_weights")

    def __init__(
        self,
        weights: WeightsLike | None = None,
        config: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self._weights: Mapping[str, Array] = MappingProxyType(normalize_weights(weights))
        self._config = freeze_mapping(config, "config")
        self._metadata = freeze_mapping(metadata, "metadata")
        self._slot: int | None = None
        self._version: int | None = None

    @classmethod
    def _trusted(
        cls,
        weights: Mapping[str, Array],
        config: Mapping[str, Any],
        metadata: Mapping[str, Any],
        slot: int | None = None,
        version: int | None = None,
    ) -> Context:
        """Build from parts that are already validated and frozen (the store's read path)."""
        ctx = cls.__new__(cls)
        ctx._weights = (
            weights if isinstance(weights, MappingProxyType) else MappingProxyType(dict(weights))
        )
        ctx._config = config
        ctx._metadata = metadata
        ctx._slot = slot
        ctx._version = version
        return ctx

    # -- read access ------------------------------------------------------------------------

    @property
    def weights(self) -> Mapping[str, Array]:
        """Read-only mapping of tensor name to read-only array, in stored order."""
        return self._weights

    @property
    def config(self) -> Mapping[str, Any]:
        """Frozen config (read-only mappings and tuples)."""
        return self._config

    @property
    def metadata(self) -> Mapping[str, Any]:
        """Frozen metadata (read-only mappings and tuples)."""
        return self._metadata

    @property
    def slot(self) -> int | None:
        """The slot this context was stored in, or None if it was never stored."""
        return self._slot

    @property
    def version(self) -> int | None:
        """The version this context was stored as, or None if it was never stored."""
        return self._version

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._weights)

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        total: int = sum(map(_NBYTES, self._weights.values()))  # ndarray.nbytes: an int
        return total

    def __len__(self) -> int:
        return len(self._weights)

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __getitem__(self, name: str) -> Array:
        return self._weights[name]

    def __contains__(self, name: object) -> bool:
        return name in self._weights

    def __repr__(self) -> str:
        where = "unstored" if self._slot is None else f"slot={self._slot} version={self._version}"
        return f"<Context {where} tensors={len(self)} bytes={self.nbytes}>"

    def equals(self, other: Context) -> bool:
        """Same names, dtypes, shapes, values, config and metadata (slot/version ignored)."""
        if self.names != other.names or self._config != other._config:
            return False
        if self._metadata != other._metadata:
            return False
        return all(
            a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
            for a, b in zip(self._weights.values(), other._weights.values(), strict=True)
        )

    # -- seed API: getters return copies of the containers, setters return new contexts ----

    def get_weights(self) -> dict[str, Array]:
        return dict(self._weights)

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = thaw_json(self._config)
        return config

    def get_metadata(self) -> dict[str, Any]:
        metadata: dict[str, Any] = thaw_json(self._metadata)
        return metadata

    def set_weights(self, weights: WeightsLike) -> Context:
        return Context._trusted(
            MappingProxyType(normalize_weights(weights)), self._config, self._metadata
        )

    def set_config(self, config: Mapping[str, Any]) -> Context:
        return Context._trusted(self._weights, freeze_mapping(config, "config"), self._metadata)

    def set_metadata(self, metadata: Mapping[str, Any]) -> Context:
        return Context._trusted(self._weights, self._config, freeze_mapping(metadata, "metadata"))

    def bind(self, slot: int, version: int) -> Context:
        """The same context, marked as stored at (slot, version)."""
        return Context._trusted(self._weights, self._config, self._metadata, slot, version)
