"""Context is an immutable value: read-only arrays, frozen config, setters return new contexts."""

from __future__ import annotations

import numpy as np
import pytest

from ctxstore import Context, InvalidInputError


def test_weights_forms_and_names() -> None:
    a, b = np.arange(3), np.ones((2, 2))
    assert Context(a).names == ("0",)
    assert Context([a, b]).names == ("0", "1")
    assert Context({"x": a, "y": b}).names == ("x", "y")
    assert Context(np.float32(2.5))["0"].shape == ()


def test_arrays_are_read_only_all_the_way_down() -> None:
    source = np.arange(6.0)
    ctx = Context({"w": source})
    source[0] = 99.0  # the caller's array is not shared
    w = ctx["w"]
    assert w[0] == 0.0
    assert not w.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        w[0] = 1.0
    with pytest.raises(ValueError, match="WRITEABLE"):
        w.setflags(write=True)
    root = w
    while isinstance(root.base, np.ndarray):
        root = root.base
        with pytest.raises(ValueError, match="WRITEABLE"):
            root.setflags(write=True)


def test_config_and_metadata_are_frozen_and_getters_copy() -> None:
    ctx = Context({"w": np.zeros(2)}, {"layers": [1, 2], "opt": {"lr": 0.1}}, {"step": 3})
    with pytest.raises(TypeError):
        ctx.config["opt"]["lr"] = 1.0  # type: ignore[index]
    assert ctx.config["layers"] == (1, 2)
    copy = ctx.get_config()
    copy["opt"]["lr"] = 5.0
    copy["layers"].append(3)
    assert ctx.get_config() == {"layers": [1, 2], "opt": {"lr": 0.1}}
    assert ctx.get_metadata() == {"step": 3}


def test_setters_return_new_contexts_and_leave_the_old_one() -> None:
    ctx = Context({"w": np.zeros(2)}, {"a": 1}, {"m": 1})
    new = ctx.set_config({"a": 2}).set_metadata({"m": 2}).set_weights({"v": np.ones(3)})
    assert ctx.get_config() == {"a": 1} and ctx.get_metadata() == {"m": 1}
    assert ctx.names == ("w",)
    assert new.get_config() == {"a": 2} and new.get_metadata() == {"m": 2}
    assert new.names == ("v",)
    assert ctx.slot is None and ctx.version is None


def test_numpy_scalars_in_metadata_become_python_values() -> None:
    ctx = Context(None, None, {"loss": np.float32(0.5), "step": np.int64(7)})
    assert ctx.get_metadata() == {"loss": 0.5, "step": 7}
    assert type(ctx.metadata["step"]) is int


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"o": np.array([object(), 1], dtype=object)}, "holds Python objects"),
        ({"": np.zeros(1)}, "must not be empty"),
        ({"x" * 300: np.zeros(1)}, "longer than 256"),
        ({"a\x00b": np.zeros(1)}, "control or invisible"),
        ({"a\nb": np.zeros(1)}, "control or invisible"),
        ({"../etc/passwd": np.zeros(1)}, "'..' segments"),
        ({"/abs": np.zeros(1)}, "must not start with '/'"),
        ({1: np.zeros(1)}, "must be a string"),
        ("not weights", "weights must be"),
    ],
)
def test_invalid_weights_are_refused(weights: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        Context(weights)  # type: ignore[arg-type]


def test_duplicate_names_are_refused() -> None:
    class Pairs(dict[str, np.ndarray]):
        def items(self):  # type: ignore[no-untyped-def, override]
            return [("a", np.zeros(1)), ("a", np.ones(1))]

    with pytest.raises(InvalidInputError, match="duplicate tensor name 'a'"):
        Context(Pairs())


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"f": float("nan")}, "not a finite number"),
        ({"f": float("inf")}, "not a finite number"),
        ({1: "x"}, "is not a string"),
        ({"s": {1, 2}}, "set is not plain JSON-like"),
        ({"a": np.zeros(2)}, "ndarray is not plain JSON-like"),
        ({"big": 2**70}, "does not fit in 64 bits"),
        ({"obj": object()}, "object is not plain JSON-like"),
        ([1, 2], "config must be a dict"),
    ],
)
def test_invalid_config_is_refused(config: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        Context(None, config)  # type: ignore[arg-type]


def test_deeply_nested_config_is_refused() -> None:
    deep: dict[str, object] = {}
    node = deep
    for _ in range(40):
        node["x"] = {}
        node = node["x"]  # type: ignore[assignment]
    with pytest.raises(InvalidInputError, match="nested deeper"):
        Context(None, deep)
