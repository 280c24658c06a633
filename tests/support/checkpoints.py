"""Checkpoint directories as ``save_pretrained`` lays them out, written with safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors.numpy

CONFIG = {"architectures": ["TinyModel"], "hidden_size": 8, "rms_norm_eps": 1e-06, "x": None}


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embed.weight": rng.standard_normal((16, 8)).astype("<f4"),
        "layers.0.w": rng.standard_normal((8, 8)).astype("<f2"),
        "layers.1.w": rng.standard_normal((8, 8)).astype("<f4"),
        "norm.weight": np.ones(8, "<f4"),
        "steps": np.arange(3, dtype="<i8"),
        "layers.0.bf16": rng.standard_normal((4, 8)).astype(ml_dtypes.bfloat16),
        "layers.1.fp8": rng.standard_normal((4, 8)).astype(ml_dtypes.float8_e4m3fn),
    }


def write_checkpoint(
    directory: Path, weights: dict[str, np.ndarray], shards: list[list[str]] | None = None
) -> Path:
    """A directory as save_pretrained writes it: one file, or shards and an index."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (directory / "generation_config.json").write_bytes(b'{\n  "max_length": 20\n}')
    (directory / "tokenizer.json").write_bytes(bytes(range(256)) * 3)  # byte-exact, not text
    (directory / "chat_template.jinja").write_text("{{ messages }}\r\n")
    if shards is None:
        safetensors.numpy.save_file(weights, directory / "model.safetensors", {"format": "pt"})
        return directory
    weight_map = {}
    for i, names in enumerate(shards, 1):
        shard = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file({n: weights[n] for n in names}, directory / shard,
                                    {"format": "pt"})  # fmt: skip
        weight_map |= dict.fromkeys(names, shard)
    index = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


SHARDS = [
    ["embed.weight", "steps"],
    ["layers.0.w", "layers.0.bf16"],
    ["layers.1.w", "norm.weight", "layers.1.fp8"],
]
