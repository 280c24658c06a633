"""numpy arrays from other libraries' arrays: torch tensors, JAX arrays and the like.

``Context(model.state_dict())`` must work as it is: parameters that require
grad, non-contiguous views, tensors on a GPU, bf16 and fp8. torch is never
imported here: a torch tensor is recognised by its type's module, and the
torch module it came from is already loaded when one exists. numpy cannot
hold torch's bf16/fp8 tensors, so their bits are viewed as same-width integers
and then as the ml_dtypes type of the same format. Anything else goes through
``np.asarray`` (JAX arrays arrive as ml_dtypes arrays for bf16/fp8 already).
"""

from __future__ import annotations

import sys
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from .dtypes import ml_dtype
from .errors import InvalidInputError
from .validation import check_shape

Array = npt.NDArray[Any]

#: torch dtype -> (same-width integer torch dtype, ml_dtypes name) for the types numpy lacks
_TORCH_ML_DTYPES = MappingProxyType(
    {
        "torch.bfloat16": ("int16", "bfloat16"),
        "torch.float8_e4m3fn": ("uint8", "float8_e4m3fn"),
        "torch.float8_e5m2": ("uint8", "float8_e5m2"),
        "torch.float8_e4m3fnuz": ("uint8", "float8_e4m3fnuz"),
        "torch.float8_e5m2fnuz": ("uint8", "float8_e5m2fnuz"),
        "torch.float8_e8m0fnu": ("uint8", "float8_e8m0fnu"),
    }
)


def is_torch_tensor(value: object) -> bool:
    """True for a torch.Tensor or a subclass (nn.Parameter...), without importing torch."""
    return type(value).__module__.partition(".")[0] == "torch" and hasattr(value, "detach")


def as_numpy(value: Any, name: str) -> Array:
    """``value`` as a numpy array of its true dtype (may share its memory; a copy when it
    must leave a device or is not contiguous). Raises InvalidInputError naming the tensor."""
    if isinstance(value, np.ndarray):
        return value
    if is_torch_tensor(value):
        return _from_torch(value, name)
    try:
        return np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidInputError(
            f"tensor {name!r}: a {type(value).__name__} cannot be read as an array: {exc}"
        ) from None


def _from_torch(tensor: Any, name: str) -> Array:
    torch = sys.modules["torch"]
    dtype = str(tensor.dtype)
    if tensor.layout != torch.strided:
        raise InvalidInputError(
            f"tensor {name!r} is a {tensor.layout} torch tensor; convert it with .to_dense()"
        )
    if tensor.device.type == "meta":
        raise InvalidInputError(f"tensor {name!r} is on the meta device and holds no data")
    check_shape(tuple(tensor.shape), tensor.element_size(), f"tensor {name!r}")
    try:
        t = tensor.detach().resolve_conj().resolve_neg().cpu().contiguous()
        if dtype in _TORCH_ML_DTYPES:
            bits, ml_name = _TORCH_ML_DTYPES[dtype]
            array: Array = t.view(getattr(torch, bits)).numpy().view(ml_dtype(ml_name))
            return array
        array = t.numpy()
    except (TypeError, RuntimeError, LookupError, ImportError) as exc:
        raise InvalidInputError(
            f"tensor {name!r} has torch dtype {dtype}, which ctxstore cannot store ({exc})"
        ) from None
    return array
