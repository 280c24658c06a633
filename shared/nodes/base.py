"""The Node interface: a builder that turns a validated config into a Context for a slot.

A node is cheap to create and validates its whole config in the constructor,
so a bad request fails before any work is queued; ``validate_config`` lets the
daemon run the same check without creating a node. ``build_context`` does the
work (synthesise or import tensors) and is a pure function of the config, so a
rebuild with the same config yields byte-identical tensors, which the store
then deduplicates. ``async_build_context`` runs the build in a worker thread so
the daemon's event loop never blocks and concurrent builds overlap.

Config keys are declared as :class:`Param` tables, one per node class: each key
has a default and a check that validates and normalises a value, and names the
key and the bad value when it refuses one.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from .. import checks
from ..context import Array, Context, freeze_array
from ..errors import InvalidInputError
from ..validation import check_slot, freeze_mapping, thaw_json

log = logging.getLogger("ctxstore.nodes")

Check = Callable[[str, object], Any]
"""Validate and normalise one config value; the first argument names it in errors."""

FLOAT_DTYPES = ("float16", "float32", "float64")  # numpy has no bfloat16
MAX_SEED = 2**63 - 1
MAX_SYNTHETIC_BYTES = 16 * 2**30
"""Largest context a synthetic node may build: a typo in a size must not eat the host's memory."""


@dataclass(frozen=True, slots=True)
class Param:
    """One config key of a node type: its default and the check applied to every value."""

    default: Any
    check: Check
    doc: str = ""


# -- checks for config values ---------------------------------------------------------------


def _named(inner: checks.Check) -> Check:
    """A ctxstore.checks check as a node check: its reason follows the key's name."""

    def check(what: str, value: object) -> Any:
        try:
            return inner(value)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{what} {exc}") from None

    return check


def integer(low: int, high: int) -> Check:
    """An integer in [low, high] (bools refused, numpy integers accepted)."""
    return _named(checks.integer(low, high, checks.NODE, numpy=True))


def number(
    low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False
) -> Check:
    """A finite real number within the given bounds (open or closed); returned as float."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(what: str, value: object) -> float:
        if isinstance(value, int | float | np.integer | np.floating) and not isinstance(
            value, bool
        ):
            result = float(value)
            above = result > low if low_open else result >= low
            below = result < high if high_open else result <= high
            if math.isfinite(result) and above and below:
                return result
        raise InvalidInputError(f"{what} must be a number in {interval}, got {value!r:.60}")

    return check


def boolean() -> Check:
    """True or False (not 0 / 1)."""
    return _named(checks.boolean(checks.NODE, numpy=True))


def choice(*options: str) -> Check:
    """One of a fixed set of strings."""

    def check(what: str, value: object) -> str:
        if not isinstance(value, str) or value not in options:
            raise InvalidInputError(
                f"{what} must be one of {', '.join(options)}; got {value!r:.60}"
            )
        return value

    return check


def int_list(low: int, high: int, min_len: int, max_len: int) -> Check:
    """A list (or tuple) of min_len..max_len integers, each in [low, high]; returned as list."""
    item = integer(low, high)

    def check(what: str, value: object) -> list[int]:
        if not isinstance(value, list | tuple) or not min_len <= len(value) <= max_len:
            raise InvalidInputError(
                f"{what} must be a list of {min_len} to {max_len} integers, got {value!r:.60}"
            )
        return [item(f"{what}[{i}]", v) for i, v in enumerate(value)]

    return check


def optional(inner: Check) -> Check:
    """None, or a value ``inner`` accepts."""

    def check(what: str, value: object) -> Any:
        return None if value is None else inner(what, value)

    return check


# -- synthetic tensors ------------------------------------------------------------------------


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def normal_tensor(seed: int, name: str, shape: tuple[int, ...], std: float, dtype: str) -> Array:
    """A frozen N(0, std^2) tensor that depends only on (seed, name, shape, std, dtype).

    Each tensor draws from its own stream, keyed by its name, so adding a layer
    or reordering the build leaves every other tensor byte-identical (and the
    store deduplicates them).
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_name_key(name),)))
    draw_dtype = np.float64 if dtype == "float64" else np.float32
    values = rng.standard_normal(shape, dtype=draw_dtype)
    values *= std
    return freeze_array(values.astype(dtype, copy=False), name)


def constant_tensor(name: str, shape: tuple[int, ...], value: float, dtype: str) -> Array:
    """A frozen tensor filled with ``value`` (norm gains, biases)."""
    return freeze_array(np.full(shape, value, dtype=dtype), name)


# -- the interface ------------------------------------------------------------------------------


class Node(abc.ABC):
    """A builder of contexts for one slot, configured by a validated config.

    Subclasses set ``node_type`` (the registry name), ``model_type`` (the label
    stored with the slot), ``params`` (the config table), and implement
    :meth:`build_weights`; :meth:`check_config` adds rules that span keys.
    """

    node_type: ClassVar[str]
    model_type: str
    params: ClassVar[Mapping[str, Param]] = MappingProxyType({})

    def __init__(self, slot: int, config: Mapping[str, Any] | None = None) -> None:
        self._slot = check_slot(slot)
        self._config: Mapping[str, Any] = freeze_mapping(self.validate_config(config), "config")
        #: told how far a build is, 0..1 (a build job sets it); see :meth:`report_progress`
        self.on_progress: Callable[[float], object] | None = None

    @classmethod
    def validate_config(cls, config: Mapping[str, Any] | None) -> dict[str, Any]:
        """The complete config (defaults filled in, values normalised), or InvalidInputError.

        Unknown keys are refused: a misspelt key silently ignored would build
        something other than what the caller asked for.
        """
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise InvalidInputError(
                f"{cls.node_type} node config must be a dict, got {type(config).__name__}"
            )
        for key in config:
            if key not in cls.params:
                known = ", ".join(sorted(cls.params)) or "none"
                raise InvalidInputError(
                    f"unknown config key {key!r:.60} for a {cls.node_type} node; "
                    f"known keys: {known}"
                )
        out = {
            key: param.check(f"{cls.node_type} config key {key!r}", config.get(key, param.default))
            for key, param in cls.params.items()
        }
        cls.check_config(out)
        return out

    @classmethod  # noqa: B027 - an optional hook, empty by design
    def check_config(cls, config: dict[str, Any]) -> None:
        """Rules that span several keys; may fill in derived defaults. Raise InvalidInputError."""

    @classmethod  # noqa: B027 - an optional hook, empty by design
    def check_inputs(cls, config: Mapping[str, Any]) -> None:
        """Refuse now what every build from this validated config would fail on (a file
        to import that does not exist): a queued job is refused at submission instead of
        failing when it runs. Raise a CtxStoreError naming what is wrong."""

    @property
    def slot(self) -> int:
        return self._slot

    @property
    def config(self) -> Mapping[str, Any]:
        """The validated config, frozen (read-only mappings and tuples)."""
        return self._config

    def get_slot_index(self) -> int:
        return self._slot

    def get_config(self) -> dict[str, Any]:
        """A mutable copy of the validated config (plain dicts and lists)."""
        config: dict[str, Any] = thaw_json(self._config)
        return config

    def report_progress(self, fraction: float) -> None:
        """For :meth:`build_weights`: ``fraction`` (0..1) of the build is done.

        Optional for subclasses; a build job shows it. A failing listener is
        logged and ignored: progress never breaks a build.
        """
        listener = self.on_progress
        if listener is None:
            return
        try:
            listener(min(1.0, max(0.0, float(fraction))))
        except Exception as exc:
            log.debug("progress listener of %r failed: %s", self, exc)

    @abc.abstractmethod
    def build_weights(self) -> Mapping[str, Array]:
        """The named tensors of this node's context, in order."""

    def build_context(self) -> Context:
        """Build the context: tensors from :meth:`build_weights`, the config, build metadata."""
        return self.make_context(self.build_weights())

    async def async_build_context(self) -> Context:
        """:meth:`build_context` in a worker thread: the event loop stays free, builds overlap."""
        return await asyncio.to_thread(self.build_context)

    def make_context(self, weights: Mapping[str, Array], **extra: Any) -> Context:
        """A Context of ``weights`` with this node's config and metadata (plus ``extra`` keys)."""
        from .. import __version__  # late: ctxstore imports the nodes while it initialises

        parameters = sum(int(a.size) for a in weights.values())
        metadata = {
            "node_type": self.node_type,
            "model_type": self.model_type,
            "build": {
                "builder": f"{type(self).__module__}.{type(self).__qualname__}",
                "ctxstore_version": __version__,
                "tensors": len(weights),
                "parameters": parameters,
                "nbytes": sum(int(a.nbytes) for a in weights.values()),
            },
            **extra,
        }
        return Context(weights, self._config, metadata)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} slot={self._slot} config={dict(self._config)!r:.200}>"


def common_params(default_dtype: str = "float32") -> dict[str, Param]:
    """The keys every synthetic node shares: dtype and seed."""
    return {
        "dtype": Param(default_dtype, choice(*FLOAT_DTYPES), "element type of every tensor"),
        "seed": Param(0, integer(0, MAX_SEED), "same seed, same bytes"),
    }


def check_size(node_type: str, nbytes: int) -> None:
    """Refuse a synthetic build larger than MAX_SYNTHETIC_BYTES, before any memory is used."""
    if nbytes > MAX_SYNTHETIC_BYTES:
        raise InvalidInputError(
            f"this {node_type} config would build {nbytes} bytes of weights, "
            f"more than the limit of {MAX_SYNTHETIC_BYTES}; make it smaller"
        )
