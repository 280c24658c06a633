"""Nodes: one contract suite run against every node type, then what each type adds.

The contract (build, determinism, config round trip, slot, async builds that
overlap off the event loop, refused configs) is what the daemon relies on for
any node type, including those plugins register; the registry tests exercise
the entry-point path with fake entry points, without installing anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ctxstore import Context, InvalidInputError, NotFoundError
from ctxstore.nodes import (
    CNNNode,
    FileNode,
    LLMNode,
    Node,
    create_node,
    get_node_type,
    node_types,
    refresh_node_types,
    registry,
)
from ctxstore.nodes.base import MAX_SYNTHETIC_BYTES

TINY_LLM = {"vocab_size": 32, "d_model": 8, "n_layers": 2, "n_heads": 2}
TINY_CNN = {"in_channels": 2, "channels": [3, 4], "num_classes": 5}
BARRIER_TIMEOUT = 30.0  # only reached when the property under test is broken


def _tiny_file(directory: Path) -> dict[str, Any]:
    path = directory / "weights.npz"
    np.savez(path, a=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.ones(4, np.int16))
    return {"path": str(path)}


# Small, valid configs per built-in type; each value is a factory taking a temp directory.
CONTRACT_CONFIGS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "llm": lambda _: dict(TINY_LLM, seed=7),
    "cnn": lambda _: dict(TINY_CNN, seed=7),
    "file": _tiny_file,
}

# (node type, key, bad value) for each type: every one must be refused naming key and value
# (for a list, the bad element: SHOWN says what the message must quote when it is not the value).
SHOWN = {("channels", "[4, 0]"): "got 0"}
INVALID_CONFIGS: list[tuple[str, str, object]] = [
    ("llm", "temperature", -0.1),
    ("llm", "temperature", float("nan")),
    ("llm", "top_p", 0),
    ("llm", "top_p", 1.5),
    ("llm", "max_tokens", 0),
    ("llm", "learning_rate", 0.0),
    ("llm", "learning_rate", "fast"),
    ("llm", "vocab_size", 0),
    ("llm", "d_model", 2.5),
    ("llm", "n_layers", True),
    ("llm", "dtype", "bfloat16"),
    ("llm", "seed", -1),
    ("llm", "tie_embeddings", 1),
    ("cnn", "kernel_size", 4),
    ("cnn", "kernel_size", 0),
    ("cnn", "stride", 0),
    ("cnn", "padding", -1),
    ("cnn", "padding", "full"),
    ("cnn", "activation", "swish2"),
    ("cnn", "channels", []),
    ("cnn", "channels", [4, 0]),
    ("cnn", "channels", "8,16"),
    ("cnn", "dtype", "int8"),
    ("file", "path", ""),
    ("file", "path", "bad\nname.npy"),
    ("file", "path", 42),
    ("file", "format", "pickle"),
    ("file", "max_bytes", -1),
    ("file", "model_type", "../evil"),
]


@pytest.fixture(params=sorted(CONTRACT_CONFIGS))
def node_case(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[type[Node], dict[str, Any]]:
    node_type: str = request.param
    return get_node_type(node_type), CONTRACT_CONFIGS[node_type](tmp_path)


def _same_weights(a: Context, b: Context) -> bool:
    return a.names == b.names and all(
        x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
        for x, y in zip(a.weights.values(), b.weights.values(), strict=True)
    )


def test_every_builtin_type_has_a_contract_config() -> None:
    assert set(registry.BUILTIN_NODE_TYPES) == set(CONTRACT_CONFIGS)


class TestNodeContract:
    """What every node type promises, whatever it builds."""

    def test_builds_a_context_described_by_its_config(
        self, node_case: tuple[type[Node], dict[str, Any]]
    ) -> None:
        cls, config = node_case
        node = cls(3, config)
        ctx = node.build_context()
        assert isinstance(ctx, Context)
        assert len(ctx) > 0
        assert all(not a.flags.writeable for a in ctx.weights.values())
        assert ctx.config == node.config
        assert ctx.metadata["node_type"] == cls.node_type == node.node_type
        assert ctx.metadata["model_type"] == node.model_type
        build = ctx.metadata["build"]
        assert build["tensors"] == len(ctx)
        assert build["nbytes"] == ctx.nbytes
        assert build["builder"].endswith(cls.__qualname__)

    def test_same_config_same_bytes(self, node_case: tuple[type[Node], dict[str, Any]]) -> None:
        cls, config = node_case
        first, second = cls(1, config).build_context(), cls(2, config).build_context()
        assert _same_weights(first, second)
        assert first.equals(second)

    def test_config_round_trips(self, node_case: tuple[type[Node], dict[str, Any]]) -> None:
        cls, config = node_case
        node = cls(1, config)
        full = node.get_config()
        assert set(config) <= set(full) == set(cls.params)
        assert cls.validate_config(full) == full
        assert cls(1, json.loads(json.dumps(full))).get_config() == full
        assert cls(1, node.build_context().config).get_config() == full

    def test_validate_config_fills_defaults_without_a_node(
        self, node_case: tuple[type[Node], dict[str, Any]]
    ) -> None:
        cls, config = node_case
        full = cls.validate_config(config)
        assert set(full) == set(cls.params)
        full["extra"] = 1  # the caller's copy, not the class's table
        assert "extra" not in cls.validate_config(config)

    def test_slot_index(self, node_case: tuple[type[Node], dict[str, Any]]) -> None:
        cls, config = node_case
        assert cls(0, config).get_slot_index() == 0
        assert cls(2**31 - 1, config).get_slot_index() == 2**31 - 1
        for bad in (-1, 2**31, "1", 1.0, True, None):
            with pytest.raises(InvalidInputError, match="slot"):
                cls(bad, config)  # type: ignore[arg-type]

    def test_config_is_immutable(self, node_case: tuple[type[Node], dict[str, Any]]) -> None:
        cls, config = node_case
        node = cls(1, config)
        with pytest.raises(TypeError):
            node.config["x"] = 1  # type: ignore[index]
        copy = node.get_config()
        copy.clear()
        assert node.get_config()

    def test_unknown_and_non_mapping_configs_are_refused(
        self, node_case: tuple[type[Node], dict[str, Any]]
    ) -> None:
        cls, config = node_case
        with pytest.raises(InvalidInputError, match=r"unknown config key 'colour'.*known keys"):
            cls(1, {**config, "colour": "blue"})
        for bad in ([1, 2], "config", 3):
            with pytest.raises(InvalidInputError, match="must be a dict"):
                cls(1, bad)  # type: ignore[arg-type]

    def test_async_build_gives_the_same_context(
        self, node_case: tuple[type[Node], dict[str, Any]]
    ) -> None:
        cls, config = node_case
        node = cls(1, config)
        assert asyncio.run(node.async_build_context()).equals(node.build_context())

    def test_async_builds_overlap_and_leave_the_loop_free(
        self, node_case: tuple[type[Node], dict[str, Any]]
    ) -> None:
        """Both builds must be in flight at once, and the loop must run while they are."""
        cls, config = node_case
        both_started = threading.Barrier(2, timeout=BARRIER_TIMEOUT)
        loop_ran = threading.Event()
        threads: set[int] = set()

        def gated(node: Node) -> Callable[[], Context]:
            real = node.build_context

            def build() -> Context:
                threads.add(threading.get_ident())
                both_started.wait()  # raises BrokenBarrierError if the builds are serialised
                assert loop_ran.wait(BARRIER_TIMEOUT), "the event loop was blocked by a build"
                return real()

            return build

        nodes = [cls(1, config), cls(2, config)]
        for node in nodes:
            node.build_context = gated(node)  # type: ignore[method-assign]

        async def main() -> list[Context]:
            builds = asyncio.gather(*(n.async_build_context() for n in nodes))
            await asyncio.sleep(0)  # the loop keeps running while both builds wait
            loop_ran.set()
            return list(await builds)

        first, second = asyncio.run(main())
        assert _same_weights(first, second)
        assert threading.get_ident() not in threads
        assert len(threads) == 2


@pytest.mark.parametrize(("node_type", "key", "value"), INVALID_CONFIGS)
def test_invalid_config_is_refused_naming_key_and_value(
    node_type: str, key: str, value: object, tmp_path: Path
) -> None:
    cls = get_node_type(node_type)
    config = {**CONTRACT_CONFIGS[node_type](tmp_path), key: value}
    with pytest.raises(InvalidInputError) as info:
        cls(1, config)
    message = str(info.value)
    assert repr(key) in message
    assert SHOWN.get((key, repr(value)), repr(value)) in message
    with pytest.raises(InvalidInputError):
        cls.validate_config(config)


# -- LLMNode ------------------------------------------------------------------------------------


def test_llm_tensors_are_transformer_shaped() -> None:
    ctx = LLMNode(1, {**TINY_LLM, "d_ff": 12}).build_context()
    shapes = {name: a.shape for name, a in ctx.weights.items()}
    assert shapes["tok_embeddings"] == (32, 8)
    assert shapes["output"] == (32, 8)
    assert shapes["norm"] == (8,)
    for i in range(2):
        for proj in ("wq", "wk", "wv", "wo"):
            assert shapes[f"layers.{i}.attention.{proj}"] == (8, 8)
        assert shapes[f"layers.{i}.attention_norm"] == (8,)
        assert shapes[f"layers.{i}.ffn_norm"] == (8,)
        assert shapes[f"layers.{i}.feed_forward.up"] == (12, 8)
        assert shapes[f"layers.{i}.feed_forward.down"] == (8, 12)
    assert len(shapes) == 3 + 2 * 8
    assert np.all(ctx["norm"] == 1)
    assert ctx.metadata["build"]["parameters"] == sum(a.size for a in ctx.weights.values())


def test_llm_defaults_are_small_and_resolved() -> None:
    node = LLMNode(0)
    config = node.get_config()
    assert config["d_ff"] == 4 * config["d_model"]
    assert LLMNode.estimated_nbytes(config) == node.build_context().nbytes < 4 * 2**20
    assert 0 < config["top_p"] <= 1 and config["temperature"] >= 0


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_llm_dtype_is_honoured(dtype: str) -> None:
    ctx = LLMNode(1, {**TINY_LLM, "dtype": dtype}).build_context()
    assert {a.dtype for a in ctx.weights.values()} == {np.dtype(dtype)}
    assert all(np.isfinite(a).all() for a in ctx.weights.values())
    assert LLMNode.estimated_nbytes(LLMNode.validate_config({**TINY_LLM, "dtype": dtype})) == (
        ctx.nbytes
    )


def test_llm_seed_changes_the_weights_but_not_the_norms() -> None:
    a = LLMNode(1, {**TINY_LLM, "seed": 1}).build_context()
    b = LLMNode(1, {**TINY_LLM, "seed": 2}).build_context()
    assert a["tok_embeddings"].tobytes() != b["tok_embeddings"].tobytes()
    assert a["norm"].tobytes() == b["norm"].tobytes()


def test_llm_tensors_depend_only_on_their_own_name() -> None:
    """Adding layers leaves the existing ones byte-identical, so the store can share them."""
    two = LLMNode(1, TINY_LLM).build_context()
    three = LLMNode(1, {**TINY_LLM, "n_layers": 3}).build_context()
    for name in two.names:
        assert two[name].tobytes() == three[name].tobytes()
    assert "layers.2.attention.wq" in three


def test_llm_tied_embeddings_drop_the_output_head() -> None:
    ctx = LLMNode(1, {**TINY_LLM, "tie_embeddings": True}).build_context()
    assert "output" not in ctx
    assert "tok_embeddings" in ctx


def test_llm_sampling_keys_do_not_change_the_weights() -> None:
    a = LLMNode(1, TINY_LLM).build_context()
    b = LLMNode(1, {**TINY_LLM, "temperature": 0.0, "top_p": 1, "max_tokens": 1}).build_context()
    assert _same_weights(a, b)
    assert b.config["top_p"] == 1.0
    assert isinstance(b.config["top_p"], float)


def test_llm_heads_must_divide_d_model() -> None:
    with pytest.raises(InvalidInputError, match=r"d_model \(8\).*n_heads \(3\)"):
        LLMNode(1, {**TINY_LLM, "n_heads": 3})


def test_llm_refuses_a_config_too_large_to_build() -> None:
    with pytest.raises(InvalidInputError, match=str(MAX_SYNTHETIC_BYTES)):
        LLMNode(1, {"vocab_size": 2**21, "d_model": 2**14, "n_heads": 16})


def test_numpy_scalars_are_accepted_as_config_values() -> None:
    node = LLMNode(1, {**TINY_LLM, "d_model": np.int64(8), "top_p": np.float32(0.5)})
    assert type(node.config["d_model"]) is int
    assert type(node.config["top_p"]) is float


# -- CNNNode ------------------------------------------------------------------------------------


def test_cnn_tensors_are_conv_shaped() -> None:
    ctx = CNNNode(1, {**TINY_CNN, "kernel_size": 5}).build_context()
    shapes = {name: a.shape for name, a in ctx.weights.items()}
    assert shapes == {
        "conv.0.weight": (3, 2, 5, 5),
        "conv.0.bias": (3,),
        "conv.1.weight": (4, 3, 5, 5),
        "conv.1.bias": (4,),
        "head.weight": (5, 4),
        "head.bias": (5,),
    }
    assert not ctx["conv.0.bias"].any()
    assert CNNNode.estimated_nbytes(ctx.config) == ctx.nbytes


def test_cnn_without_head() -> None:
    ctx = CNNNode(1, {**TINY_CNN, "num_classes": 0}).build_context()
    assert "head.weight" not in ctx
    assert ctx.names[-1] == "conv.1.bias"


@pytest.mark.parametrize("padding", [0, 2, "same", "valid"])
def test_cnn_padding_forms(padding: int | str) -> None:
    assert CNNNode(1, {**TINY_CNN, "padding": padding}).config["padding"] == padding


def test_cnn_same_padding_needs_stride_one() -> None:
    with pytest.raises(InvalidInputError, match="'same' needs stride 1"):
        CNNNode(1, {**TINY_CNN, "stride": 2, "padding": "same"})
    assert CNNNode(1, {**TINY_CNN, "stride": 2, "padding": 1}).config["stride"] == 2


def test_cnn_channels_tuple_is_normalised_to_a_list() -> None:
    node = CNNNode(1, {**TINY_CNN, "channels": (3, 4)})
    assert node.get_config()["channels"] == [3, 4]


# -- FileNode -----------------------------------------------------------------------------------


def test_file_node_imports_and_records_its_source(tmp_path: Path) -> None:
    config = _tiny_file(tmp_path)
    ctx = FileNode(4, {**config, "model_type": "resnet"}).build_context()
    assert ctx.names == ("a", "b")
    assert ctx.metadata["model_type"] == "resnet"
    assert ctx.metadata["source"]["format"] == "npz"
    assert ctx.metadata["source"]["path"] == str(tmp_path / "weights.npz")
    np.testing.assert_array_equal(ctx["a"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_file_node_needs_a_known_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="'path' is required"):
        FileNode(1)
    with pytest.raises(InvalidInputError, match=r"unknown suffix '\.pt'"):
        FileNode(1, {"path": str(tmp_path / "model.pt")})
    node = FileNode(1, {"path": str(tmp_path / "model.pt"), "format": "npy"})
    with pytest.raises(NotFoundError, match="does not exist"):
        node.build_context()


def test_file_node_checks_existence_only_when_building(tmp_path: Path) -> None:
    path = tmp_path / "later.npy"
    node = FileNode(1, {"path": str(path)})
    with pytest.raises(NotFoundError):
        node.build_context()
    np.save(path, np.arange(3))
    assert node.build_context().names == ("later",)


# -- registry -----------------------------------------------------------------------------------


class _FakeEntryPoint:
    """The two things the registry uses of an EntryPoint: its name and load()."""

    def __init__(self, name: str, load: Callable[[], object], value: str = "fake:Fake") -> None:
        self.name = name
        self.value = value
        self._load = load

    def load(self) -> object:
        return self._load()


class ToyNode(Node):
    node_type = "toy"
    model_type = "toy"

    def build_weights(self) -> dict[str, Any]:
        return {"w": np.zeros(2)}


def _boom() -> object:
    raise ImportError("plugin dependency missing")


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Entry points the registry will see instead of the installed ones."""
    found: list[Any] = []

    def entry_points(**selection: str) -> list[Any]:
        assert selection == {"group": "ctxstore.nodes"}
        return found

    monkeypatch.setattr("importlib.metadata.entry_points", entry_points)
    refresh_node_types()
    yield found
    refresh_node_types()


def test_builtins_are_registered() -> None:
    assert get_node_type("llm") is LLMNode
    assert get_node_type("cnn") is CNNNode
    assert get_node_type("file") is FileNode
    assert {"llm", "cnn", "file"} <= set(node_types())


def test_unknown_type_lists_the_known_ones() -> None:
    with pytest.raises(NotFoundError, match=r"unknown node type 'gpt'.*cnn, file, llm"):
        get_node_type("gpt")
    with pytest.raises(InvalidInputError):
        get_node_type(3)  # type: ignore[arg-type]


def test_create_node_validates() -> None:
    node = create_node("cnn", 5, TINY_CNN)
    assert isinstance(node, CNNNode)
    assert node.get_slot_index() == 5
    with pytest.raises(InvalidInputError):
        create_node("cnn", 5, {"kernel_size": 2})
    with pytest.raises(NotFoundError):
        create_node("nope", 5)


def test_plugin_from_an_entry_point(fake_entry_points: list[Any]) -> None:
    fake_entry_points.append(_FakeEntryPoint("toy", lambda: ToyNode))
    assert get_node_type("toy") is ToyNode
    assert node_types()["toy"] is ToyNode
    assert create_node("toy", 1).build_context().names == ("w",)


def test_plugin_through_a_real_entry_point_object(
    fake_entry_points: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ctxstore_test_plugin.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            from ctxstore.nodes import Node

            class AudioNode(Node):
                node_type = "audio"
                model_type = "audio"

                def build_weights(self):
                    return {"filters": np.ones((2, 2))}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fake_entry_points.append(
        EntryPoint("audio", "ctxstore_test_plugin:AudioNode", "ctxstore.nodes")
    )
    try:
        node = create_node("audio", 2)
        assert type(node).__name__ == "AudioNode"
        assert node.build_context().metadata["node_type"] == "audio"
    finally:
        sys.modules.pop("ctxstore_test_plugin", None)


def test_broken_plugins_are_logged_and_skipped(
    fake_entry_points: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    class Abstract(Node):
        node_type = "abstract"

    class Misnamed(ToyNode):
        node_type = "other"

    fake_entry_points.extend(
        [
            _FakeEntryPoint("broken", _boom),
            _FakeEntryPoint("notanode", lambda: int),
            _FakeEntryPoint("instance", lambda: ToyNode(1)),
            _FakeEntryPoint("abstract", lambda: Abstract),
            _FakeEntryPoint("misnamed", lambda: Misnamed),
            _FakeEntryPoint("llm", lambda: ToyNode),  # may not replace a built-in
            _FakeEntryPoint("bad name!", lambda: ToyNode),
            _FakeEntryPoint("toy", lambda: ToyNode),
            _FakeEntryPoint("toy", lambda: Misnamed),  # a second claim on the same name
        ]
    )
    with caplog.at_level(logging.WARNING, logger="ctxstore.nodes.registry"):
        types = node_types()
    assert set(types) == {"llm", "cnn", "file", "toy"}
    assert types["llm"] is LLMNode and types["toy"] is ToyNode
    logged = caplog.text
    for name in ("broken", "notanode", "instance", "abstract", "misnamed", "'llm'", "bad name!"):
        assert name in logged
    assert "plugin dependency missing" in logged  # the traceback is kept for the operator
    with pytest.raises(NotFoundError, match="broken"):
        get_node_type("broken")


def test_builtins_survive_a_failing_entry_point_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    def entry_points(**_: str) -> list[Any]:
        raise RuntimeError("damaged metadata")

    monkeypatch.setattr("importlib.metadata.entry_points", entry_points)
    refresh_node_types()
    try:
        assert set(node_types()) == {"llm", "cnn", "file"}
        assert get_node_type("llm") is LLMNode
    finally:
        monkeypatch.undo()
        refresh_node_types()


def test_builtins_do_not_scan_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    def entry_points(**_: str) -> list[Any]:
        raise AssertionError("a built-in lookup scanned the entry points")

    monkeypatch.setattr("importlib.metadata.entry_points", entry_points)
    refresh_node_types()
    try:
        assert get_node_type("llm") is LLMNode
        assert create_node("file", 1, {"path": "x.npy"}).node_type == "file"
    finally:
        monkeypatch.undo()
        refresh_node_types()


@pytest.mark.parametrize(
    ("node_type", "config"),
    [("llm", {"n_layers": 3, "tie_embeddings": False}), ("cnn", {"channels": [4, 8]})],
)
def test_a_build_reports_its_progress_in_order(node_type: str, config: dict[str, Any]) -> None:
    node = create_node(node_type, 1, config)
    seen: list[float] = []
    node.on_progress = seen.append
    node.build_context()
    assert len(seen) >= 3, seen
    assert seen == sorted(seen) and 0.0 <= seen[0] < seen[-1] == 1.0, seen


def test_a_failing_progress_listener_never_breaks_a_build() -> None:
    node = create_node("llm", 1, {"n_layers": 1})

    def broken(fraction: float) -> None:
        raise RuntimeError("listener trouble")

    node.on_progress = broken
    assert len(node.build_context().weights) > 0
