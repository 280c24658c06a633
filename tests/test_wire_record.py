"""Each wire message declares its fields once; the checks, dumps and optional fields follow."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Annotated, ClassVar

import pytest

import ctxstore.wire
from ctxstore.checks import integer
from ctxstore.errors import InvalidInputError
from ctxstore.wire import MESSAGE_TYPES, PublishBuild, PublishFile, PublishShm
from ctxstore.wire.fields import Field
from ctxstore.wire.record import Record, message


def test_every_message_checks_exactly_its_declared_fields_in_declaration_order() -> None:
    for cls in MESSAGE_TYPES.values():
        assert list(cls.CHECKS) == [f.name for f in dataclasses.fields(cls)], cls.TYPE


def test_only_the_fields_added_after_protocol_1_may_be_left_out() -> None:
    later = {name: cls.LATER for name, cls in MESSAGE_TYPES.items() if cls.LATER}
    publishes = (PublishFile, PublishBuild, PublishShm)
    added = {cls.TYPE: frozenset({"key", "progress"}) for cls in publishes}
    assert later == {**added, "announce": frozenset({"record"})}  # protocol 2's record
    omitted = {name: cls.OMIT_NONE for name, cls in MESSAGE_TYPES.items() if cls.OMIT_NONE}
    assert omitted == {"announce": frozenset({"record"})}  # an old peer's frame, byte for byte


def test_a_new_record_gets_its_checks_from_its_annotations() -> None:
    @message
    @dataclass(frozen=True, slots=True, kw_only=True)
    class Sample(Record):
        TYPE: ClassVar[str] = "sample"
        count: Annotated[int, Field(integer(1, 9), dump=str)]

    assert Sample(count=3).to_wire() == {"type": "sample", "count": "3"}
    with pytest.raises(InvalidInputError, match=r"sample\.count: must be between 1 and 9, got 0"):
        Sample(count=0)


def test_a_field_without_its_wire_declaration_is_refused_when_the_class_is_made() -> None:
    with pytest.raises(TypeError, match=r"Loose\.count needs one Field"):

        @message
        @dataclass(frozen=True, slots=True, kw_only=True)
        class Loose(Record):
            TYPE: ClassVar[str] = "loose"
            count: int


@pytest.mark.parametrize("old", ["ctxstore.protocol", "ctxstore.messages"])
def test_the_old_module_names_hand_out_the_wire_packages_objects(old: str) -> None:
    module = importlib.import_module(old)
    assert module.__all__
    for name in module.__all__:
        assert getattr(module, name) is getattr(ctxstore.wire, name), name


def test_a_descriptor_checks_each_field_the_same_after_its_dtype_was_accepted() -> None:
    """The decoder remembers the dtype strings it accepted (issue 21: parsing one cost more
    than the rest of a descriptor): a known dtype still gets every other check, a wrong
    one is refused as before, and ever new strings from a peer do not grow the memo."""
    from ctxstore.wire import tensors
    from ctxstore.wire.tensors import TensorSpec

    assert TensorSpec("w", "<f4", [2, 3], 0, 24).shape == (2, 3)
    with pytest.raises(InvalidInputError, match=r"nbytes 25 != 4 x \(2, 3\)"):
        TensorSpec("w", "<f4", [2, 3], 0, 25)
    with pytest.raises(InvalidInputError, match="shape"):
        TensorSpec("w", "<f4", [2, -3], 0, 24)
    with pytest.raises(InvalidInputError, match="offset"):
        TensorSpec("w", "<f4", [2, 3], True, 24)
    with pytest.raises(InvalidInputError, match="not a plain numpy dtype"):
        TensorSpec("w", "<f4 ", [2, 3], 0, 24)
    for width in range(1, 200):  # valid, all different: 'S1', 'S2', ...
        TensorSpec("w", f"S{width}", [1], 0, width)
    assert len(tensors._ACCEPTED) <= tensors._ACCEPTED_MAX
