"""One set of argument checks, each surface keeping the words its users have always read."""

from __future__ import annotations

import numpy as np
import pytest

from ctxstore.checks import SETTING, WIRE, Voice, boolean, integer, kind, optional
from ctxstore.errors import InvalidInputError
from ctxstore.wire import Hello


@pytest.mark.parametrize(
    ("voice", "value", "words"),
    [
        (WIRE, "7", "must be an integer, got str"),
        (WIRE, True, "must be an integer, got bool"),
        (WIRE, 10, "must be between 1 and 9, got 10"),
        (SETTING, "7", "must be an integer, not a string"),
        (SETTING, [7], "must be an integer, not an array"),
        (SETTING, 10, "must be between 1 and 9"),
    ],
)
def test_an_integer_is_refused_in_the_surfaces_words(
    voice: Voice, value: object, words: str
) -> None:
    check = integer(1, 9, voice)
    with pytest.raises(InvalidInputError) as caught:
        check(value)
    assert str(caught.value) == words
    assert check(9) == 9


def test_booleans_and_optional_values() -> None:
    assert boolean(SETTING)(False) is False
    with pytest.raises(InvalidInputError, match=r"^must be true or false, not an integer$"):
        boolean(SETTING)(1)
    with pytest.raises(InvalidInputError, match=r"^must be true or false, got int$"):
        boolean(WIRE)(1)
    assert optional(integer(0, 1))(None) is None
    assert kind({"a": 1}) == "a table"


def test_the_wire_and_the_settings_use_the_same_checks() -> None:
    from ctxstore.daemon.config import checks as setting_checks
    from ctxstore.daemon.config import keys
    from ctxstore.wire import fields

    assert keys._optional is optional
    assert setting_checks._kind is kind
    assert fields.optional is optional
    with pytest.raises(InvalidInputError, match=r"hello\.pid: must be between 1 and \d+, got 0"):
        Hello(role="reader", name="r", pid=0)
    with pytest.raises(InvalidInputError, match=r"^must be an integer, not a float$"):
        setting_checks._int_in(1, 3)(1.5)


def test_a_node_config_value_is_refused_naming_its_key_and_value() -> None:
    from ctxstore.nodes.base import boolean as node_boolean
    from ctxstore.nodes.base import integer as node_integer

    layers = node_integer(1, 64)
    assert layers("layers", np.int64(3)) == 3 and type(layers("layers", np.int64(3))) is int
    for bad in ("x", 65, True):
        with pytest.raises(InvalidInputError) as caught:
            layers("layers", bad)
        assert str(caught.value) == f"layers must be an integer in [1, 64], got {bad!r}"
    assert node_boolean()("bias", np.bool_(True)) is True
    with pytest.raises(InvalidInputError, match=r"^bias must be true or false, got 1$"):
        node_boolean()("bias", 1)
    with pytest.raises(InvalidInputError, match=r"^must be an integer, got int64$"):
        integer(0, 9)(np.int64(3))  # the wire takes Python ints only, as msgpack gives


def test_the_http_api_states_the_bounds_the_checks_declare() -> None:
    """The API's pydantic bounds are read from ctxstore.checks declarations: what its schema
    says a slot or a priority may be is what the store's checks accept, edge for edge."""
    from pydantic import TypeAdapter, ValidationError

    from ctxstore.checks import SLOTS, VERSIONS, Integer, check_slot, check_version
    from ctxstore.daemon.http.fields import API_VERSIONS, SlotId, VersionNumber
    from ctxstore.daemon.http.schemas import JobBody
    from ctxstore.daemon.jobs.records import PRIORITIES, check_priority

    assert isinstance(SLOTS, Integer) and (SLOTS.low, SLOTS.high) == (0, 2**31 - 1)
    slot = TypeAdapter(SlotId)
    assert slot.json_schema() == {"type": "integer", "minimum": SLOTS.low, "maximum": SLOTS.high}
    for edge in (SLOTS.low, SLOTS.high):
        assert slot.validate_python(edge) == check_slot(edge) == SLOTS(edge) == edge
    for beyond in (SLOTS.low - 1, SLOTS.high + 1):
        with pytest.raises(InvalidInputError):
            check_slot(beyond)
        with pytest.raises(ValidationError, match=r"(greater|less)_than_equal"):
            slot.validate_python(beyond)
    # an API version is a store version a JSON double holds exactly
    assert VERSIONS.low == API_VERSIONS.low and API_VERSIONS.high < VERSIONS.high
    version = TypeAdapter(VersionNumber)
    assert check_version(API_VERSIONS.high) == version.validate_python(API_VERSIONS.high)
    with pytest.raises(ValidationError, match="less_than_equal"):
        version.validate_python(API_VERSIONS.high + 1)
    priority = JobBody.model_json_schema()["properties"]["priority"]
    assert (priority["minimum"], priority["maximum"]) == (PRIORITIES.low, PRIORITIES.high)
    assert check_priority(PRIORITIES.high) == PRIORITIES.high
    with pytest.raises(InvalidInputError, match="priority must be between"):
        check_priority(PRIORITIES.high + 1)
    with pytest.raises(ValidationError, match="less_than_equal"):
        JobBody(slot=1, node_type="llm", priority=PRIORITIES.high + 1)
