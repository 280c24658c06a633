"""Hugging Face checkpoints with the real tools: transformers writes them, ctxstore stores
them, transformers loads what ``ctxstore export`` writes.

A tiny Llama (hidden 64, 2 layers, vocab 128) is built from ``LlamaConfig`` with
random weights (no hub download) in float32, float16 and bfloat16 (most current
checkpoints' dtype), with a tokenizer built from a vocabulary here and a chat
template, and saved with ``save_pretrained`` in shards.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from support.daemon import running_daemon
from tokenizers import Tokenizer, models, pre_tokenizers

from ctxstore import PersistentStore
from ctxstore.cli import main
from ctxstore.client import publish
from ctxstore.nodes import open_import
from ctxstore.readers import Reader

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def tiny_llama(
    dtype: torch.dtype, *, tie: bool = False, seed: int = 0
) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def save_checkpoint(model: transformers.PreTrainedModel, directory: Path, shard: str) -> Path:
    model.save_pretrained(directory, max_shard_size=shard)
    vocab = {f"t{i}": i for i in range(125)} | {"<unk>": 125, "<s>": 126, "</s>": 127}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    (directory / "README.md").write_text("---\nlicense: mit\n---\n# tiny llama\n")
    return directory


@pytest.fixture(
    scope="module",
    params=[torch.float32, torch.float16, torch.bfloat16],
    ids=["f32", "f16", "bf16"],
)
def checkpoint(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[transformers.PreTrainedModel, Path]:
    model = tiny_llama(request.param)
    directory = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "llama", "40KB")
    return model, directory


def extra_files(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in directory.iterdir()
        if p.is_file() and not p.name.endswith((".safetensors", ".safetensors.index.json"))
    }


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A torch tensor as the numpy array the store returns for it (bf16: ml_dtypes')."""
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def assert_same_weights(model: transformers.PreTrainedModel, weights: object) -> None:
    """Same names, dtypes, shapes and bytes as the model's state dict."""
    state = model.state_dict()
    assert set(state) == set(weights)  # type: ignore[arg-type]
    for name, tensor in state.items():
        array, expected = weights[name], as_numpy(tensor)  # type: ignore[index]
        assert (array.dtype, array.shape) == (expected.dtype, expected.shape), name
        assert array.tobytes() == expected.tobytes(), name


def test_a_sharded_checkpoint_published_through_the_daemon(
    checkpoint: tuple[transformers.PreTrainedModel, Path], tmp_path: Path
) -> None:
    model, directory = checkpoint
    shards = [p for p in directory.iterdir() if p.name.endswith(".safetensors")]
    assert len(shards) > 3  # really sharded
    files = extra_files(directory)
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md",
            "tokenizer_config.json", "chat_template.jinja"} <= set(files)  # fmt: skip
    with running_daemon(tmp_path) as daemon:
        version = publish(1, directory, socket=daemon.socket, model_type="llama", alias="base")
        with PersistentStore(daemon.store, readonly=True) as store:
            ctx = store.load_context(1, "base", verify=True)
            assert ctx.version == version
            assert_same_weights(model, ctx)
            assert ctx.config["hidden_size"] == 64 and ctx.config["vocab_size"] == 128
            assert {f.name for f in store.list_files(1)} == set(files)
            for name, data in files.items():
                assert store.read_file(1, version, name) == data, name
            assert store.verify() == []
        assert main(["publish", "--socket", str(daemon.socket), "2", str(directory)]) == 0
        with Reader(daemon.store, daemon.socket, name="hf-worker") as reader:
            assert_same_weights(model, reader.get(2))
            assert reader.read_file(2, "tokenizer.json") == files["tokenizer.json"]

            assert reader.get(1).version == version
            assert reader.read_file(1, "chat_template.jinja") == files["chat_template.jinja"]
            assert {f.name for f in reader.files(1)} == set(files)


def test_export_loads_with_from_pretrained_and_identical_parameters(
    checkpoint: tuple[transformers.PreTrainedModel, Path], tmp_path: Path
) -> None:
    model, directory = checkpoint
    store_dir = tmp_path / "store"
    with PersistentStore(store_dir) as store, open_import(directory) as imported:
        version = store.save_import(7, imported)
    out = tmp_path / "exported"
    assert main(["export", "--store", str(store_dir), "7", str(version), str(out),
                 "--max-shard-size", "30KB"]) == 0  # fmt: skip
    assert (out / "model.safetensors.index.json").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=model.dtype)
    assert type(loaded) is type(model)
    theirs = dict(loaded.named_parameters())
    for name, parameter in model.named_parameters():
        assert theirs[name].dtype == parameter.dtype and torch.equal(theirs[name], parameter), name
    for name, data in extra_files(directory).items():
        assert (out / name).read_bytes() == data, name
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("t1 t5 t9")["input_ids"] == [1, 5, 9]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    # logits against from_pretrained of the original directory (the model built in code
    # keeps its rotary buffer in its own dtype; from_pretrained computes it in float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=model.dtype)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_tied_embeddings_round_trip(tmp_path: Path) -> None:
    model = tiny_llama(torch.float32, tie=True, seed=1)
    directory = save_checkpoint(model, tmp_path / "tied", "5GB")
    assert os.listdir(directory).count("model.safetensors") == 1
    with PersistentStore(tmp_path / "store") as store, open_import(directory) as imported:
        store.save_import(1, imported)
        assert "lm_head.weight" not in store.load_context(1)  # the checkpoint stores it once
    assert main(["export", "--store", str(tmp_path / "store"), "1", str(tmp_path / "out")]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
