"""Small real models (imports torch and transformers: only modules that need them
import this)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ctxstore import Context


def tiny_llama(
    seed: int, directory: Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, Context]:
    """A 2-layer Llama with random weights in ``dtype``, and the Context a publisher would
    make of it. With ``directory``, the model is saved there with ``save_pretrained`` and
    the reference returned is what ``from_pretrained(directory)`` loads."""
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    if directory is not None:
        model.save_pretrained(directory)
        model = LlamaForCausalLM.from_pretrained(directory).eval()
    config_json = json.loads(model.config.to_json_string())
    return model, Context(model.state_dict(), config=config_json)
