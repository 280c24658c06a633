"""torch tensors over a Context's maps: the worker side of serving a model with ctxstore.

Imported only when the user imports it (``from ctxstore.readers import torch as
ctx_torch``); nothing else in ctxstore imports torch. Three steps, all zero-copy
for a context mapped from the store (a Reader's or ``load_context``'s):

* :func:`state_dict`: name -> ``torch.Tensor`` with the stored dtype (float32,
  float16, and bfloat16 / float8 as ``torch.bfloat16`` / ``torch.float8_e4m3fn``
  / ``torch.float8_e5m2``), each sharing memory with the context's array (the
  same data pointer), with no warning.
* :func:`build_model`: a transformers model on those tensors, through
  ``from_pretrained(None, config=..., state_dict=...)``, which assigns them as the
  model's parameters rather than copying them.
* :func:`swap_weights`: for a new version of the same architecture, re-point
  every parameter of the live model at the new version's tensors (no rebuild).

Writes: the store maps each tensor file copy-on-write (``MAP_PRIVATE``, see
:mod:`ctxstore.store.npyfile`), and these tensors are writable views of that map. An
in-place write (``t.add_()``, an optimizer step, a LoRA merge) copies the pages
it touches into this process: it costs those pages only, and never reaches the
file or any other worker. It is visible in this process, though, to everything
over the same map: the context's numpy arrays (still flagged read-only for
numpy) and the Reader's cached context of that version.

Copies: the arrays of a Context built in this process from numpy (never
stored) are immutable private buffers, and an array the kernel mapped
read-only (strict overcommit refused the private map) cannot be written
either; :func:`state_dict` copies those (``copy=None``), or refuses them
(``copy=False``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from ..context import Context
from ..errors import InvalidInputError
from ..store.npyfile import PrivateMap

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["build_model", "pretrained_config", "state_dict", "swap_weights", "torch_dtype"]

Array = npt.NDArray[Any]

# ml_dtypes' numpy dtypes (the store's bf16/fp8) by name, where this torch has them (e8m0
# came in 2.7); numpy's own dtypes go through torch.from_numpy. Only same-width types:
# torch's float4 packs two values a byte.
_SMALL_FLOATS = (
    "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    "float8_e8m0fnu",
)  # fmt: skip
_BY_NAME: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in _SMALL_FLOATS if hasattr(torch, name)
}
#: the integer a small float's bits travel as
_CARRIER: dict[int, type[np.unsignedinteger[Any]]] = {1: np.uint8, 2: np.uint16}


def torch_dtype(dtype: np.dtype[Any]) -> torch.dtype:
    """The torch dtype of a stored numpy dtype; InvalidInputError when torch has none."""
    mapped = _BY_NAME.get(dtype.name)
    if mapped is not None:
        return mapped
    try:
        return torch.from_numpy(np.empty(0, dtype.newbyteorder("="))).dtype
    except TypeError:
        raise InvalidInputError(f"dtype {dtype} has no torch equivalent") from None


def _writable_view(array: Array) -> Array | None:
    """A writable view of ``array``'s memory when it is a stored file's private map, else None."""
    root: Any = array.base
    if type(root) is not PrivateMap:  # the store's arrays sit right on their map
        root = array
        while isinstance(root, np.ndarray) and root.base is not None:
            root = root.base
        if not isinstance(root, PrivateMap):
            return None
    if not array.dtype.isnative:
        return None
    if any(stride < 0 for stride in array.strides):  # a reversed view: torch has no such strides
        return None
    view = array.view()
    try:
        view.setflags(write=True)
    except ValueError:  # mapped read-only (strict overcommit refused the private map)
        return None
    root.lent = True  # its pages may take this process's edits: never served to a later version
    return view


@lru_cache(maxsize=64)
def _conversion(dtype: np.dtype[Any]) -> tuple[torch.dtype, type[np.unsignedinteger[Any]] | None]:
    """The torch dtype of a native ``dtype`` and, for a small float (bf16, fp8), the unsigned
    integer its bits travel to torch as (cached: hundreds of tensors, a few dtypes)."""
    carrier = _CARRIER.get(dtype.itemsize) if dtype.name in _BY_NAME else None
    return torch_dtype(dtype), carrier


def _tensor(array: Array, name: str) -> torch.Tensor:
    """A tensor over ``array``'s memory (``array`` is writable and native-endian)."""
    dtype, carrier = _conversion(array.dtype)
    if carrier is not None:
        return torch.from_numpy(array.view(carrier)).view(dtype)
    try:
        return torch.from_numpy(array)
    except TypeError as exc:
        raise InvalidInputError(f"tensor {name!r}: {exc}") from None


def state_dict(context: Context, *, copy: bool | None = None) -> dict[str, torch.Tensor]:
    """Name -> torch tensor for each tensor of ``context``, in stored order.

    ``copy=None`` (the default): a tensor shares memory with the context's array
    (same data pointer, writes private to this process) when the array is a
    stored file's map, and is a private copy otherwise (a Context never
    stored, a read-only map, a non-native byte order, a reversed view).
    ``copy=False`` raises InvalidInputError naming the first tensor that would
    be copied; ``copy=True`` always copies.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, array in context.weights.items():
        view = None if copy else _writable_view(array)
        if view is None:
            if copy is False:
                raise InvalidInputError(
                    f"tensor {name!r} cannot be shared with torch without a copy (it is not "
                    "a stored file's writable private map)"
                )
            view = np.array(array, dtype=array.dtype.newbyteorder("="), order="C")
        tensors[name] = _tensor(view, name)
    return tensors


def pretrained_config(context: Context, config_class: Any = None) -> PretrainedConfig:
    """The transformers config stored as ``context.config`` (a ``config.json``'s keys).

    ``Context.config`` is frozen (read-only mappings, tuples), which
    transformers' strict config classes refuse; this builds from
    ``context.get_config()``, a plain deep copy. Without ``config_class`` the
    class comes from the config's ``model_type`` (``AutoConfig.for_model``).
    """
    from transformers import AutoConfig

    values = context.get_config()
    if config_class is not None:
        config: PretrainedConfig = config_class(**values)
        return config
    model_type = values.pop("model_type", None)
    if not isinstance(model_type, str):
        raise InvalidInputError(
            "the context's config has no 'model_type': pass config_class (or config to build_model)"
        )
    try:
        config = AutoConfig.for_model(model_type, **values)
    except ValueError as exc:
        raise InvalidInputError(f"config: {exc}") from None
    return config


def build_model(
    context: Context,
    model_class: Any = None,
    *,
    config: PretrainedConfig | None = None,
    copy: bool | None = None,
) -> PreTrainedModel:
    """A transformers model whose parameters are :func:`state_dict`'s tensors (no copy).

    ``model_class`` (a concrete class such as ``LlamaForCausalLM``; the Auto
    classes cannot load from no path) defaults to the causal LM class of the
    config's type, ``config`` to :func:`pretrained_config`. The model is in
    eval mode. When every floating tensor has one dtype, the model is built in
    it whatever the config says (transformers would otherwise cast, i.e. copy,
    bf16 weights to a config's float32); with mixed dtypes transformers
    decides, and ``copy=False`` raises InvalidInputError if it copied any.
    transformers' loading progress bar is silenced for the call.
    """
    config = pretrained_config(context) if config is None else config
    if model_class is None:
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

        try:
            model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        except KeyError:
            raise InvalidInputError(
                f"transformers has no causal LM for {type(config).__name__}: pass model_class"
            ) from None
    tensors = state_dict(context, copy=copy)
    floating = {t.dtype for t in tensors.values() if t.is_floating_point()}
    dtype = floating.pop() if len(floating) == 1 else None  # the stored dtype, not the config's
    with _quiet_transformers():
        model: PreTrainedModel = model_class.from_pretrained(
            None, config=config, state_dict=tensors, dtype=dtype
        )
    if copy is False:
        for name, tensor in model.state_dict().items():
            if name in tensors and tensor.data_ptr() != tensors[name].data_ptr():
                raise InvalidInputError(f"transformers copied tensor {name!r} ({tensor.dtype})")
    torch.nn.Module.eval(model)
    return model


def swap_weights(model: torch.nn.Module, context: Context, *, copy: bool | None = None) -> None:
    """Re-point every parameter and persistent buffer of ``model`` at ``context``'s tensors.

    The hot-swap path for a new version of the same architecture: no rebuild,
    no copy (each ``Parameter`` object stays, so hooks and references to it
    keep working; its ``.data`` becomes the new mapped tensor). Tied weights
    follow (they are one Parameter). All or nothing: a name the model does not
    have, a shape or dtype that differs, or a model tensor the context leaves
    out raises InvalidInputError before anything changes.
    """
    tensors = state_dict(context, copy=copy)
    current = model.state_dict(keep_vars=True)
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    covered: set[int] = set()
    for name, tensor in tensors.items():
        target = current.get(name)
        if target is None:
            raise InvalidInputError(f"tensor {name!r} of the context is not in the model")
        if target.shape != tensor.shape or target.dtype != tensor.dtype:
            raise InvalidInputError(
                f"tensor {name!r}: the context has {tensor.dtype}{list(tensor.shape)}, "
                f"the model {target.dtype}{list(target.shape)}"
            )
        plan.append((target, tensor))
        covered.add(id(target))
    missing = [name for name, target in current.items() if id(target) not in covered]
    if missing:
        raise InvalidInputError(f"the context has no tensor for {', '.join(missing[:5])}")
    with torch.no_grad():
        for target, tensor in plan:
            target.data = tensor


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' loading progress bar off for the block, as it was after."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
