"""LLMNode: synthetic weights shaped like a decoder-only transformer.

The tensors follow the common LLaMA-style naming, so tools and tests see a
realistic context: ``tok_embeddings``, per layer ``layers.<i>.attention_norm``,
``layers.<i>.attention.{wq,wk,wv,wo}``, ``layers.<i>.ffn_norm``,
``layers.<i>.feed_forward.{up,down}``, then ``norm`` and ``output`` (left out
when the embeddings are tied). The sampling and training keys (temperature,
top_p, max_tokens, learning_rate) shape no tensor; they travel in the config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from ..context import Array
from ..errors import InvalidInputError
from .base import (
    Node,
    Param,
    boolean,
    check_size,
    common_params,
    constant_tensor,
    integer,
    normal_tensor,
    number,
    optional,
)

_EMBED_STD = 0.02


class LLMNode(Node):
    """A context of transformer-shaped weights, deterministic for a seed."""

    node_type: ClassVar[str] = "llm"
    model_type = "llm"
    params: ClassVar[Mapping[str, Param]] = MappingProxyType(
        {
            "vocab_size": Param(1000, integer(1, 2**21), "rows of the token embedding"),
            "d_model": Param(64, integer(1, 2**16), "width of the residual stream"),
            "n_layers": Param(2, integer(1, 1024), "transformer blocks"),
            "n_heads": Param(4, integer(1, 2**16), "attention heads; must divide d_model"),
            "d_ff": Param(None, optional(integer(1, 2**18)), "MLP width; default 4 * d_model"),
            "tie_embeddings": Param(False, boolean(), "reuse tok_embeddings as the output head"),
            "norm_eps": Param(1e-5, number(0, 1, low_open=True), "RMSNorm epsilon"),
            **common_params(),
            "temperature": Param(0.7, number(0), "sampling temperature, >= 0"),
            "top_p": Param(0.9, number(0, 1, low_open=True), "nucleus sampling mass, (0, 1]"),
            "max_tokens": Param(256, integer(1, 2**31 - 1), "generation length limit"),
            "learning_rate": Param(1e-4, number(0, low_open=True), "fine-tuning step size, > 0"),
        }
    )

    @classmethod
    def check_config(cls, config: dict[str, Any]) -> None:
        d_model, n_heads = config["d_model"], config["n_heads"]
        if d_model % n_heads:
            raise InvalidInputError(
                f"llm config: d_model ({d_model}) must be divisible by n_heads ({n_heads})"
            )
        if config["d_ff"] is None:
            config["d_ff"] = 4 * d_model
        check_size("llm", cls.estimated_nbytes(config))

    @staticmethod
    def estimated_nbytes(config: Mapping[str, Any]) -> int:
        """Bytes of weights a validated config builds (used to refuse oversized requests)."""
        vocab, d, ff = config["vocab_size"], config["d_model"], config["d_ff"]
        per_layer = 4 * d * d + 2 * d * ff + 2 * d
        heads = 1 if config["tie_embeddings"] else 2
        itemsize = int(config["dtype"][len("float") :]) // 8
        return int((heads * vocab * d + config["n_layers"] * per_layer + d) * itemsize)

    def build_weights(self) -> dict[str, Array]:
        c = self.config
        seed, dtype = c["seed"], c["dtype"]
        vocab, d, ff = c["vocab_size"], c["d_model"], c["d_ff"]
        weights = {
            "tok_embeddings": normal_tensor(seed, "tok_embeddings", (vocab, d), _EMBED_STD, dtype)
        }
        layers = c["n_layers"]
        for i in range(layers):
            self.report_progress(i / (layers + 1))
            p = f"layers.{i}."
            weights[p + "attention_norm"] = constant_tensor(p + "attention_norm", (d,), 1.0, dtype)
            for proj in ("wq", "wk", "wv", "wo"):
                name = f"{p}attention.{proj}"
                weights[name] = normal_tensor(seed, name, (d, d), 1 / math.sqrt(d), dtype)
            weights[p + "ffn_norm"] = constant_tensor(p + "ffn_norm", (d,), 1.0, dtype)
            up, down = p + "feed_forward.up", p + "feed_forward.down"
            weights[up] = normal_tensor(seed, up, (ff, d), 1 / math.sqrt(d), dtype)
            weights[down] = normal_tensor(seed, down, (d, ff), 1 / math.sqrt(ff), dtype)
        weights["norm"] = constant_tensor("norm", (d,), 1.0, dtype)
        if not c["tie_embeddings"]:
            self.report_progress(layers / (layers + 1))
            weights["output"] = normal_tensor(seed, "output", (vocab, d), 1 / math.sqrt(d), dtype)
        self.report_progress(1.0)
        return weights
