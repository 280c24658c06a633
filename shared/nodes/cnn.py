"""CNNNode: synthetic weights of a plain convolutional network.

One ``conv.<i>.weight`` [out, in, k, k] and ``conv.<i>.bias`` [out] per entry of
``channels``, then a dense classifier ``head.weight`` [num_classes, channels[-1]]
and ``head.bias`` (left out when num_classes is 0). Kernels use He
initialisation, biases start at zero. Stride, padding and activation shape no
tensor; they are validated and travel in the config for the inference side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from ..context import Array
from ..errors import InvalidInputError
from .base import (
    Check,
    Node,
    Param,
    check_size,
    choice,
    common_params,
    constant_tensor,
    int_list,
    integer,
    normal_tensor,
)

ACTIVATIONS = ("relu", "leaky_relu", "gelu", "silu", "tanh", "sigmoid", "identity")
PADDING_MODES = ("same", "valid")
MAX_KERNEL = 63
MAX_PADDING = 1024


def _kernel_size(what: str, value: object) -> int:
    size: int = integer(1, MAX_KERNEL)(what, value)
    if size % 2 == 0:
        raise InvalidInputError(f"{what} must be odd so the kernel has a centre, got {size}")
    return size


def _padding() -> Check:
    as_int = integer(0, MAX_PADDING)

    def check(what: str, value: object) -> int | str:
        if isinstance(value, str):
            if value in PADDING_MODES:
                return value
        elif not isinstance(value, bool):
            return int(as_int(what, value))
        raise InvalidInputError(
            f"{what} must be an integer in [0, {MAX_PADDING}] or one of "
            f"{', '.join(PADDING_MODES)}; got {value!r:.60}"
        )

    return check


class CNNNode(Node):
    """A context of convolution kernels and a classifier head, deterministic for a seed."""

    node_type: ClassVar[str] = "cnn"
    model_type = "cnn"
    params: ClassVar[Mapping[str, Param]] = MappingProxyType(
        {
            "in_channels": Param(3, integer(1, 2**16), "channels of the input image"),
            "channels": Param([8, 16], int_list(1, 2**16, 1, 256), "output channels per conv"),
            "kernel_size": Param(3, _kernel_size, "odd kernel side"),
            "stride": Param(1, integer(1, 64), "convolution stride"),
            "padding": Param("same", _padding(), "pixels, or 'same' / 'valid'"),
            "activation": Param("relu", choice(*ACTIVATIONS), "nonlinearity after each conv"),
            "num_classes": Param(10, integer(0, 2**20), "classifier outputs; 0 for no head"),
            **common_params(),
        }
    )

    @classmethod
    def check_config(cls, config: dict[str, Any]) -> None:
        if config["padding"] == "same" and config["stride"] != 1:
            raise InvalidInputError(
                f"cnn config: padding 'same' needs stride 1, got stride {config['stride']}; "
                "give the padding in pixels instead"
            )
        check_size("cnn", cls.estimated_nbytes(config))

    @staticmethod
    def estimated_nbytes(config: Mapping[str, Any]) -> int:
        """Bytes of weights a validated config builds (used to refuse oversized requests)."""
        k2 = config["kernel_size"] ** 2
        elements, fan_in = 0, config["in_channels"]
        for out in config["channels"]:
            elements += out * fan_in * k2 + out
            fan_in = out
        elements += config["num_classes"] * (fan_in + 1)
        return int(elements * (int(config["dtype"][len("float") :]) // 8))

    def build_weights(self) -> dict[str, Array]:
        c = self.config
        seed, dtype, k = c["seed"], c["dtype"], c["kernel_size"]
        weights: dict[str, Array] = {}
        fan_in = c["in_channels"]
        for i, out in enumerate(c["channels"]):
            self.report_progress(i / len(c["channels"]))
            name = f"conv.{i}."
            std = math.sqrt(2.0 / (fan_in * k * k))
            weights[name + "weight"] = normal_tensor(
                seed, name + "weight", (out, fan_in, k, k), std, dtype
            )
            weights[name + "bias"] = constant_tensor(name + "bias", (out,), 0.0, dtype)
            fan_in = out
        if c["num_classes"]:
            classes = c["num_classes"]
            std = 1 / math.sqrt(fan_in)
            weights["head.weight"] = normal_tensor(
                seed, "head.weight", (classes, fan_in), std, dtype
            )
            weights["head.bias"] = constant_tensor("head.bias", (classes,), 0.0, dtype)
        self.report_progress(1.0)
        return weights
