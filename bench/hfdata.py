"""Llama-shaped bf16 checkpoints for the Hugging Face scenario, written as ``save_pretrained`` does.

The full size takes its shapes from a real config (Qwen2.5-0.5B's: hidden 896,
24 layers, 14 heads, 2 key-value heads, MLP 4864, vocabulary 151,936, tied
embeddings) in a ``LlamaConfig``: 0.49 B parameters, 0.92 GiB in bfloat16. The
weights are random. Every version differs from the one before in every tensor
(a different low mantissa bit pattern), so no version deduplicates against
another and each one costs a whole checkpoint to move, as a fine-tuned release
does; the exponent bits are left alone, so every value stays finite.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]

#: Qwen2.5-0.5B's shapes as a Llama (no attention biases): ~0.92 GiB of bfloat16
FULL_CONFIG: dict[str, Any] = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}
QUICK_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "tie_word_embeddings": True,
    "max_position_embeddings": 128,
}
#: shards as save_pretrained cuts them for this limit
SHARD_BYTES = 300 << 20


def llama_config(values: Mapping[str, Any]) -> Any:
    """A transformers ``LlamaConfig`` in bfloat16 from ``values``."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**values, "dtype": "bfloat16"})


def tensor_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a LlamaForCausalLM of ``config`` saves (tied head left out)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def base_weights(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, Array]:
    """Random bfloat16 weights (normal, std 0.02; norms 1.0), as ml_dtypes arrays."""
    rng = np.random.default_rng(seed)
    weights: dict[str, Array] = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            weights[name] = np.ones(shape, dtype=ml_dtypes.bfloat16)
        else:
            values = rng.standard_normal(shape, dtype=np.float32)
            values *= 0.02
            weights[name] = values.astype(ml_dtypes.bfloat16)
    return weights


def version_of(base: Mapping[str, Array], version: int) -> dict[str, Array]:
    """``base`` with the low 3 mantissa bits of every value XORed by ``version``: every tensor
    differs from every other version's (for versions that differ mod 8, and in the stamp)."""
    flip = np.uint16((version % 7) + 1)
    out: dict[str, Array] = {}
    for name, array in base.items():
        bits = array.view(np.uint16) ^ flip
        bits.reshape(-1)[:1] = np.uint16(version & 0x7FFF) & np.uint16(0x7F)  # a finite stamp
        out[name] = bits.view(ml_dtypes.bfloat16)
    return out


def write_checkpoint(
    directory: Path, weights: Mapping[str, Array], config: Any, *, shard_bytes: int = SHARD_BYTES
) -> int:
    """Write ``weights`` as a sharded ``save_pretrained`` directory, fsynced; returns its bytes.

    The same files transformers writes (``model-0000i-of-0000n.safetensors``,
    ``model.safetensors.index.json``, ``config.json``, ``generation_config.json``),
    written with the safetensors library, each file fsynced, then the directory.
    """
    from safetensors.numpy import save_file

    directory.mkdir(parents=True)
    shards: list[dict[str, Array]] = [{}]
    size = 0
    for name, array in weights.items():
        if size and size + array.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
        total += sum(a.nbytes for a in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(directory)
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "_from_model_config": True})
    )
    return sync_tree(directory)


def sync_tree(directory: Path) -> int:
    """fsync every file under ``directory`` and the directory itself; returns the bytes."""
    total = 0
    for path in sorted(directory.iterdir()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return total
