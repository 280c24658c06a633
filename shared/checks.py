"""Argument checks shared by the surfaces that take untrusted values: frames, settings, nodes.

A check takes a value and returns it normalized, or raises
:class:`~ctxstore.errors.InvalidInputError` with the reason; the caller prefixes
what was checked (``hello.pid: ``, ``config file F: retention = 0: ``). The
checks are the same everywhere; the words for a refused value are the ones each
surface has always used, held by a :class:`Voice`: a frame names the value's
Python type and value (``must be an integer, got str``), a setting its kind
(``must be an integer, not a string``), a node config the value itself
(``layers must be an integer in [1, 64], got 'x'``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Final, TypeAlias

import numpy as np

from .errors import InvalidInputError

Check: TypeAlias = Callable[[Any], Any]


def kind(value: object) -> str:
    """What a settings file would call ``value``'s type: ``a string``, ``an array``, ``a table``."""
    names = {bool: "a boolean", str: "a string", float: "a float", int: "an integer"}
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    return names.get(type(value), type(value).__name__)


@dataclass(frozen=True, slots=True)
class Voice:
    """The reason a check gives for each refusal, in one surface's words: a value that is
    not an integer, an integer outside ``[low, high]``, a value that is not a boolean."""

    not_integer: Callable[[object, int, int], str]
    outside: Callable[[object, int, int], str]
    not_boolean: Callable[[object], str]


#: socket frames: the value's Python type, or the value itself
WIRE: Final = Voice(
    not_integer=lambda value, low, high: f"must be an integer, got {type(value).__name__}",
    outside=lambda value, low, high: f"must be between {low} and {high}, got {value}",
    not_boolean=lambda value: f"must be true or false, got {type(value).__name__}",
)
#: daemon settings (file, environment, flags): the value's kind; the caller shows the value
SETTING: Final = Voice(
    not_integer=lambda value, low, high: f"must be an integer, not {kind(value)}",
    outside=lambda value, low, high: f"must be between {low} and {high}",
    not_boolean=lambda value: f"must be true or false, not {kind(value)}",
)


def _node_integer(value: object, low: int, high: int) -> str:
    return f"must be an integer in [{low}, {high}], got {value!r:.60}"


#: node configs (``ctxstore build``, publish_build, POST /jobs): the value, whatever went wrong
NODE: Final = Voice(
    not_integer=_node_integer,
    outside=_node_integer,
    not_boolean=lambda value: f"must be true or false, got {value!r:.60}",
)


@dataclass(frozen=True, slots=True)
class Integer:
    """An int in [low, high], as a check (call it) and as a declaration (read its bounds).

    Bools are refused (``True`` is not a count). ``numpy``: numpy integers are
    accepted too, and returned as int (a node config may come from an array). A
    surface that states bounds rather than calling checks (the HTTP API's schema)
    reads ``low`` and ``high`` from the same declaration the other surfaces call.
    """

    low: int
    high: int
    voice: Voice = WIRE
    numpy: bool = False

    def __call__(self, value: Any) -> int:
        if type(value) is int and self.low <= value <= self.high:
            return value  # the common case, decided without the isinstance chain
        if isinstance(value, bool) or not isinstance(value, Integral if self.numpy else int):
            raise InvalidInputError(self.voice.not_integer(value, self.low, self.high))
        number = int(value)
        if not self.low <= number <= self.high:
            raise InvalidInputError(self.voice.outside(value, self.low, self.high))
        return number


def integer(low: int, high: int, voice: Voice = WIRE, *, numpy: bool = False) -> Integer:
    """An int in [low, high] (see :class:`Integer`)."""
    return Integer(low, high, voice, numpy)


def boolean(voice: Voice = WIRE, *, numpy: bool = False) -> Check:
    """True or False, nothing else (not 0 or 1, not "yes"); ``numpy``: numpy.bool_ too."""
    kinds: tuple[type, ...] = (bool, np.bool_) if numpy else (bool,)

    def check(value: Any) -> bool:
        if not isinstance(value, kinds):
            raise InvalidInputError(voice.not_boolean(value))
        return bool(value)

    return check


def optional(check: Check) -> Check:
    """None, or a value ``check`` accepts."""
    return lambda value: None if value is None else check(value)


# -- identifiers: slots, versions, names ----------------------------------------------------

MAX_SLOT = 2**31 - 1
MAX_VERSION = 2**63 - 1
MAX_TENSOR_NAME_BYTES = 256
#: the slots and version numbers :func:`check_slot` and :func:`check_version` accept
SLOTS: Final = Integer(0, MAX_SLOT)
VERSIONS: Final = Integer(1, MAX_VERSION)

#: a label (alias, group, model type): a letter, then up to 63 of [A-Za-z0-9_.-]; and
#: never ``..`` anywhere in it (:func:`check_label`)
LABEL_PATTERN: Final = r"[A-Za-z][A-Za-z0-9_.-]{0,63}"
_LABEL = re.compile(LABEL_PATTERN)
RESERVED_ALIASES = frozenset({"latest", "current"})


def check_slot(slot: object) -> int:
    """Return ``slot`` as an int, or raise: slots are integers in [0, 2**31 - 1]."""
    if type(slot) is int and 0 <= slot <= MAX_SLOT:
        return slot  # the common case (every frame has one), without the isinstance chain
    if isinstance(slot, bool) or not isinstance(slot, int | np.integer):
        raise InvalidInputError(f"slot must be an integer, got {type(slot).__name__} {slot!r:.40}")
    value = int(slot)
    if not SLOTS.low <= value <= SLOTS.high:
        raise InvalidInputError(f"slot must be between {SLOTS.low} and {SLOTS.high}, got {value}")
    return value


def check_version(version: object) -> int:
    """Return ``version`` as an int, or raise: versions are integers >= 1."""
    if type(version) is int and 1 <= version <= MAX_VERSION:
        return version  # as check_slot's
    if isinstance(version, bool) or not isinstance(version, int | np.integer):
        raise InvalidInputError(
            f"version must be an integer, got {type(version).__name__} {version!r:.40}"
        )
    value = int(version)
    if not VERSIONS.low <= value <= VERSIONS.high:
        raise InvalidInputError(
            f"version must be between {VERSIONS.low} and {VERSIONS.high}, got {value}"
        )
    return value


def check_label(value: object, what: str) -> str:
    """Alias, group and model-type names: a letter, then up to 63 of [A-Za-z0-9_.-]."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a string, got {type(value).__name__}")
    if not _LABEL.fullmatch(value) or ".." in value:
        raise InvalidInputError(
            f"{what} {value!r:.80} is not allowed: use a letter followed by up to 63 "
            "letters, digits, '_', '-' or '.' (no '..')"
        )
    return value


def check_alias(name: object) -> str:
    """An alias a user may set: a label that is not reserved."""
    alias = check_label(name, "alias")
    if alias in RESERVED_ALIASES:
        raise InvalidInputError(f"alias {alias!r} is reserved")
    return alias


def check_tensor_name(name: object) -> str:
    """Tensor names: 1-256 UTF-8 bytes, no control characters, no path traversal.

    Names never become paths (files are named by position), but they travel
    through logs, HTTP and terminals, so anything that looks like traversal or
    carries control or invisible format characters is refused.
    """
    if not isinstance(name, str):
        raise InvalidInputError(f"tensor name must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidInputError("tensor name must not be empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_TENSOR_NAME_BYTES:
        raise InvalidInputError(
            f"tensor name {name[:40]!r}... is longer than {MAX_TENSOR_NAME_BYTES} UTF-8 bytes"
        )
    # ASCII is printable exactly where it holds no category-C character: the common case
    # costs one C call, not a category lookup per character
    for char in "" if name.isascii() and name.isprintable() else name:
        if unicodedata.category(char)[0] == "C":
            raise InvalidInputError(
                f"tensor name {name!r:.80} contains control or invisible character {char!r}"
            )
    if name.startswith(("/", "\\")) or "\\" in name:
        raise InvalidInputError(f"tensor name {name!r:.80} must not start with '/' or contain '\\'")
    if any(part in {".", ".."} for part in name.split("/")):
        raise InvalidInputError(f"tensor name {name!r:.80} must not contain '.' or '..' segments")
    return name
