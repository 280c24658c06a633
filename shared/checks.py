"""Argument checks shared by the surfaces that take untrusted values: wire frames, settings.

A check takes a value and returns it normalized, or raises
:class:`~ctxstore.errors.InvalidInputError` with the reason; the caller prefixes
what was checked (``hello.pid: ``, ``config file F: retention = 0: ``). The
checks are the same everywhere; the words for a refused value are the ones each
surface has always used, held by a :class:`Voice`: a frame names the value's
Python type and value (``must be an integer, got str``), a setting its kind
(``must be an integer, not a string``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

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
    """How a refusal shows the value it refused: what follows "must be an integer" when the
    type is wrong (``wrong``), and what follows "must be between 1 and 9" (``outside``)."""

    wrong: Callable[[object], str]
    outside: Callable[[object], str]


#: socket frames: the value's Python type, or the value itself
WIRE: Final = Voice(
    wrong=lambda value: f", got {type(value).__name__}", outside=lambda value: f", got {value}"
)
#: daemon settings (file, environment, flags): the value's kind; the caller shows the value
SETTING: Final = Voice(wrong=lambda value: f", not {kind(value)}", outside=lambda value: "")


def integer(low: int, high: int, voice: Voice = WIRE) -> Check:
    """An int in [low, high]; bools are refused (``True`` is not a count)."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInputError(f"must be an integer{voice.wrong(value)}")
        if not low <= value <= high:
            raise InvalidInputError(f"must be between {low} and {high}{voice.outside(value)}")
        return value

    return check


def boolean(voice: Voice = WIRE) -> Check:
    """True or False, nothing else (not 0 or 1, not "yes")."""

    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise InvalidInputError(f"must be true or false{voice.wrong(value)}")
        return value

    return check


def optional(check: Check) -> Check:
    """None, or a value ``check`` accepts."""
    return lambda value: None if value is None else check(value)
