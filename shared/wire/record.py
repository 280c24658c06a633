"""The base of every wire record: fields declared once, checks derived from the declaration.

A message is a frozen dataclass whose wire fields are annotated
``Annotated[type, Field(check, dump=..., later=...)]``. The :func:`message`
decorator reads those annotations once, when the class is made, into
``CHECKS`` (field -> check, in declaration order: the order of the map on
the wire), ``DUMPS`` and ``LATER``. A record validates its fields when it is
built, so a message that exists is a valid message: the decoder builds records
from untrusted maps, and code that sends builds the same records, so both sides
refuse the same things with the same words.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from ..errors import InvalidInputError
from .fields import Check, Field


class Record:
    """Shared behaviour of messages: validate on construction, dump to a wire map."""

    __slots__ = ()
    TYPE: ClassVar[str]
    #: field name -> check (normalizes or raises InvalidInputError), derived by @message
    CHECKS: ClassVar[Mapping[str, Check]]
    #: field name -> wire form of the normalized value (identity when absent)
    DUMPS: ClassVar[Mapping[str, Check]] = {}
    #: fields added after protocol 1 shipped: a frame may leave them out (their default
    #: applies), so a peer from an older ctxstore is still understood
    LATER: ClassVar[frozenset[str]] = frozenset()
    #: fields left out of the frame when None (``Field.omit_none``)
    OMIT_NONE: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        for name, check in self.CHECKS.items():
            try:
                value = check(getattr(self, name))
            except InvalidInputError as exc:
                raise InvalidInputError(f"{self.TYPE}.{name}: {exc}") from None
            object.__setattr__(self, name, value)

    def to_wire(self) -> dict[str, Any]:
        """The frame body as a plain map (before msgpack)."""
        body: dict[str, Any] = {"type": self.TYPE}
        omit = self.OMIT_NONE
        for name in self.CHECKS:
            dump = self.DUMPS.get(name)
            value = getattr(self, name)
            if value is None and name in omit:
                continue
            body[name] = value if dump is None else dump(value)
        return body


R = TypeVar("R", bound=Record)


def message(cls: type[R]) -> type[R]:
    """Derive ``CHECKS``, ``DUMPS`` and ``LATER`` of a record dataclass from its annotations.

    Every dataclass field must carry exactly one :class:`Field`: a field the wire
    does not know would be a field the decoder could not fill.
    """
    hints = typing.get_type_hints(cls, include_extras=True)
    checks: dict[str, Check] = {}
    dumps: dict[str, Check] = {}
    later: set[str] = set()
    omit: set[str] = set()
    for member in dataclasses.fields(cls):  # type: ignore[arg-type]
        spec = [m for m in getattr(hints[member.name], "__metadata__", ()) if isinstance(m, Field)]
        if len(spec) != 1:
            raise TypeError(f"{cls.__name__}.{member.name} needs one Field(...) annotation")
        checks[member.name] = spec[0].check
        if spec[0].dump is not None:
            dumps[member.name] = spec[0].dump
        if spec[0].later:
            later.add(member.name)
        if spec[0].omit_none:
            omit.add(member.name)
    cls.CHECKS = checks
    cls.DUMPS = dumps
    cls.LATER = frozenset(later)
    cls.OMIT_NONE = frozenset(omit)
    return cls
