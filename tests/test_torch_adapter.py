"""The torch adapter: zero-copy state dicts over the store's copy-on-write maps, private
in-place writes, transformers models built and hot-swapped on mapped tensors."""

from __future__ import annotations

import errno
import json
import mmap
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from support.models import tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

from ctxstore import Context, InvalidInputError
from ctxstore.readers import torch as ctx_torch
from ctxstore.store import PersistentStore, npyfile

PAGE = mmap.PAGESIZE


def stored(store: PersistentStore, ctx: Context, slot: int = 1) -> Context:
    version = store.save_context(slot, ctx)
    return store.load_context(slot, version)


def test_state_dict_shares_the_mapped_memory_with_the_stored_dtypes(
    store: PersistentStore,
) -> None:
    weights = {
        "f32": np.arange(12, dtype="f4").reshape(3, 4),
        "f16": np.arange(5, dtype="f2"),
        "i64": np.arange(4, dtype="i8"),
        "flag": np.array([True, False]),
        "scalar": np.array(2.5, dtype="f8"),
    }
    ctx = stored(store, Context(weights))
    tensors = ctx_torch.state_dict(ctx)  # pytest turns any warning into an error
    assert list(tensors) == list(weights)
    expected = [torch.float32, torch.float16, torch.int64, torch.bool, torch.float64]
    assert [t.dtype for t in tensors.values()] == expected
    for name, tensor in tensors.items():
        assert tensor.data_ptr() == ctx[name].ctypes.data
        assert tensor.shape == ctx[name].shape
        assert np.array_equal(tensor.numpy(), weights[name])


def test_bf16_and_fp8_tensors_are_shared_as_torch_dtypes_bit_for_bit(
    store: PersistentStore,
) -> None:
    values = np.array([0.5, -1.0, 2.0, 448.0], dtype="f4")
    weights = {
        "bf16": values.astype(ml_dtypes.bfloat16),
        "e4m3": values.astype(ml_dtypes.float8_e4m3fn),
        "e5m2": values[:3].astype(ml_dtypes.float8_e5m2),
    }
    ctx = stored(store, Context(weights))
    tensors = ctx_torch.state_dict(ctx)
    expected = {"bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
    assert {name: t.dtype for name, t in tensors.items()} == expected
    for name, tensor in tensors.items():
        assert tensor.data_ptr() == ctx[name].ctypes.data
        assert tensor.view(torch.uint8).numpy().tobytes() == weights[name].tobytes()
        assert tensor.float().tolist() == weights[name].astype("f4").tolist()


def test_a_bf16_checkpoint_builds_a_model_identical_to_from_pretrained(
    store: PersistentStore, tmp_path: Path
) -> None:
    reference, ctx = tiny_llama(0, tmp_path / "ckpt", torch.bfloat16)
    mapped = stored(store, ctx)
    assert mapped["lm_head.weight"].dtype == ml_dtypes.bfloat16
    model = ctx_torch.build_model(mapped)
    assert model.dtype == torch.bfloat16
    assert pointers(model) == {name: mapped[name].ctypes.data for name in mapped}
    tokens = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)


def test_a_torch_write_is_private_and_costs_only_the_pages_it_touches(
    store: PersistentStore,
) -> None:
    ctx = stored(store, Context({"w": np.zeros(64 * PAGE // 4, dtype="f4")}))
    tensor = ctx_torch.state_dict(ctx)["w"]
    assert private_dirty(ctx["w"]) == 0
    tensor[0] += 1.0
    tensor[20_000:20_010].add_(2.0)
    tensor[-1] = 3.0
    pages = {(ctx["w"].ctypes.data + 4 * i) // PAGE for i in (0, 20_000, 20_009, 65_535)}
    assert len(pages) == 3  # of 65 the mapping spans
    assert private_dirty(ctx["w"]) == 3 * PAGE  # each copied once, for this process only
    assert ctx["w"][0] == 1.0  # the same memory: this process sees its edit
    with pytest.raises(ValueError, match="read-only"):
        ctx["w"][0] = 2.0  # numpy still refuses, before anything is written
    path = next((store.root / "slots" / "1").glob("*/*.npy"))
    assert np.load(path)[0] == 0.0  # the file never sees it
    with PersistentStore(store.root, readonly=True) as other:
        assert other.load_context(1, verify=True)["w"][0] == 0.0  # nor a new map of it


def private_dirty(array: np.ndarray) -> int:
    """Bytes of this process's private (copied) pages in the mapping that holds ``array``."""
    address = array.ctypes.data
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        bounds = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if bounds:
            inside = int(bounds[1], 16) <= address < int(bounds[2], 16)
        elif inside and line.startswith("Private_Dirty:"):
            total += int(line.split()[1]) * 1024
    return total


def test_arrays_that_cannot_be_shared_are_copied_or_refused(store: PersistentStore) -> None:
    fresh = Context({"w": np.arange(3, dtype="f4")})  # never stored: an immutable private copy
    tensor = ctx_torch.state_dict(fresh)["w"]
    assert tensor.data_ptr() != fresh["w"].ctypes.data
    tensor.add_(1.0)
    assert fresh["w"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(InvalidInputError, match="'w' cannot be shared"):
        ctx_torch.state_dict(fresh, copy=False)
    big_endian = stored(store, Context({"b": np.arange(3, dtype=">f4")}))
    assert ctx_torch.state_dict(big_endian)["b"].tolist() == [0.0, 1.0, 2.0]
    views = Context({"every_other": big_endian["b"][::2], "reversed": big_endian["b"][::-1]})
    assert {k: t.tolist() for k, t in ctx_torch.state_dict(views).items()} == {
        "every_other": [0.0, 2.0],
        "reversed": [2.0, 1.0, 0.0],
    }
    native = stored(store, Context({"n": np.arange(4, dtype="f4")}), slot=3)["n"]
    strided = ctx_torch.state_dict(Context({"s": native[::2], "r": native[::-1]}))
    assert strided["s"].data_ptr() == native.ctypes.data  # a view of the map: still shared
    assert strided["r"].tolist() == [3.0, 2.0, 1.0, 0.0]  # torch has no negative strides: a copy
    mapped = stored(store, Context({"w": np.arange(3, dtype="f4")}), slot=2)
    copied = ctx_torch.state_dict(mapped, copy=True)["w"]
    assert copied.data_ptr() != mapped["w"].ctypes.data


def test_a_map_refused_by_strict_overcommit_falls_back_to_read_only(
    store: PersistentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under vm.overcommit_memory=2 a writable private map is charged at its full size;
    when the kernel refuses (ENOMEM) the file is mapped read-only and torch gets a copy."""
    store.save_context(1, Context({"w": np.arange(4, dtype="f4")}))

    class Refused(npyfile.PrivateMap):
        __slots__ = ()

        def __new__(cls, fd: int, length: int, **kwargs: Any) -> Refused:
            if kwargs.get("access") == mmap.ACCESS_COPY:
                raise OSError(errno.ENOMEM, "Cannot allocate memory")
            return super().__new__(cls, fd, length, **kwargs)

    monkeypatch.setattr(npyfile, "PrivateMap", Refused)
    ctx = store.load_context(1, verify=True)
    assert ctx["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    tensor = ctx_torch.state_dict(ctx)["w"]
    assert tensor.data_ptr() != ctx["w"].ctypes.data
    tensor.add_(1.0)  # a copy: writable, nothing shared
    assert ctx["w"][0] == 0.0
    with pytest.raises(InvalidInputError, match="cannot be shared"):
        ctx_torch.state_dict(ctx, copy=False)


def test_small_floats_become_their_torch_dtypes_bit_for_bit() -> None:
    for dtype, expected in [
        (ml_dtypes.bfloat16, torch.bfloat16),
        (ml_dtypes.float8_e4m3fn, torch.float8_e4m3fn),
        (ml_dtypes.float8_e5m2, torch.float8_e5m2),
    ]:
        values = np.array([0.5, -1.0, 2.0, 448.0 if expected is torch.float8_e4m3fn else 3.0])
        array = values.astype(dtype)
        assert ctx_torch.torch_dtype(array.dtype) is expected
        tensor = ctx_torch._tensor(array, "x")
        assert tensor.dtype is expected
        assert tensor.data_ptr() == array.ctypes.data
        assert tensor.float().tolist() == array.astype(np.float32).tolist()
    with pytest.raises(InvalidInputError, match="no torch equivalent"):
        ctx_torch.torch_dtype(np.dtype("U3"))


def test_config_passes_to_transformers_through_get_config(store: PersistentStore) -> None:
    _, ctx = tiny_llama(0)
    ctx = stored(store, ctx)
    with pytest.raises(Exception, match="rope_parameters"):
        LlamaConfig(**ctx.config)  # frozen: a mappingproxy inside, which transformers refuses
    assert LlamaConfig(**ctx.get_config()).hidden_size == 64
    config = ctx_torch.pretrained_config(ctx)
    assert isinstance(config, LlamaConfig)
    assert config.num_hidden_layers == 2
    no_type = Context({}, config={"hidden_size": 64})
    with pytest.raises(InvalidInputError, match="model_type"):
        ctx_torch.pretrained_config(no_type)
    assert ctx_torch.pretrained_config(no_type, LlamaConfig).hidden_size == 64


def test_a_model_is_built_on_the_maps_and_swapped_to_the_next_version(
    store: PersistentStore,
) -> None:
    reference, ctx = tiny_llama(0)
    next_reference, next_ctx = tiny_llama(1)
    first, second = stored(store, ctx), stored(store, next_ctx)
    tokens = torch.arange(12).unsqueeze(0)
    model = ctx_torch.build_model(first)
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert pointers(model) == {name: first[name].ctypes.data for name in first}
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)
        parameter = model.model.norm.weight
        ctx_torch.swap_weights(model, second)
        assert model.model.norm.weight is parameter  # re-pointed, not replaced
        assert pointers(model) == {name: second[name].ctypes.data for name in second}
        assert torch.equal(model(tokens).logits, next_reference(tokens).logits)


def test_the_model_is_built_in_the_stored_dtype_whatever_the_config_says(
    store: PersistentStore,
) -> None:
    """transformers casts weights to the config's dtype (a copy); the stored one wins."""
    _, ctx = tiny_llama(0)
    ctx = ctx.set_config({**ctx.get_config(), "dtype": "float32"})
    half = stored(store, ctx.set_weights({k: v.astype("f2") for k, v in ctx.weights.items()}))
    model = ctx_torch.build_model(half)
    assert model.dtype == torch.float16
    assert pointers(model) == {name: half[name].ctypes.data for name in half}
    mixed = {k: v if "norm" in k else v.astype("f2") for k, v in ctx.weights.items()}
    with pytest.raises(InvalidInputError, match="transformers copied tensor"):
        ctx_torch.build_model(stored(store, ctx.set_weights(mixed), slot=2), copy=False)


def pointers(model: torch.nn.Module) -> dict[str, int]:
    return {name: t.data_ptr() for name, t in model.state_dict().items()}


def test_tied_weights_are_built_and_swapped_through_their_one_stored_tensor(
    store: PersistentStore,
) -> None:
    """save_pretrained stores a tied lm_head once, as embed_tokens; so does the publisher."""
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128, tie_word_embeddings=True,
    )  # fmt: skip
    contexts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        weights = LlamaForCausalLM(config).state_dict()
        del weights["lm_head.weight"]
        context = Context({k: v.numpy() for k, v in weights.items()})
        contexts.append(stored(store, context.set_config(json.loads(config.to_json_string()))))
    first, second = contexts
    model = ctx_torch.build_model(first)
    embed = first["model.embed_tokens.weight"].ctypes.data
    assert model.lm_head.weight.data_ptr() == embed
    ctx_torch.swap_weights(model, second)
    assert model.lm_head.weight.data_ptr() == second["model.embed_tokens.weight"].ctypes.data


def test_a_swap_to_another_architecture_is_refused_and_changes_nothing(
    store: PersistentStore,
) -> None:
    _, ctx = tiny_llama(0)
    first = stored(store, ctx)
    model = ctx_torch.build_model(first)
    before = pointers(model)
    weights = first.get_weights()
    wrong_shape = {**weights, "model.norm.weight": np.ones(32, dtype="f4")}
    missing = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    extra = {**weights, "adapter.weight": np.ones(2, dtype="f4")}
    refusals = [
        (wrong_shape, r"torch.float32\[32\]"),
        (missing, "no tensor for"),
        (extra, "'adapter.weight' of the context is not in the model"),
    ]
    for bad, message in refusals:
        with pytest.raises(InvalidInputError, match=message):
            ctx_torch.swap_weights(model, stored(store, Context(bad), slot=2))
        assert pointers(model) == before


def test_the_core_and_the_readers_never_import_torch() -> None:
    code = (
        "import sys, ctxstore, ctxstore.readers, ctxstore.store, ctxstore.client; "
        "bad = sorted(m for m in ('torch', 'transformers', 'jax') if m in sys.modules); "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
