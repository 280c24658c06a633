"""JAX on CPU over a stored context: which calls share the mapped memory and which copy
(as docs/workers.md says), measured by the buffers' addresses."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np

from ctxstore import Context
from ctxstore.store import PersistentStore

WEIGHTS = {
    "w": np.arange(4096, dtype="f4").reshape(64, 64),
    "h": np.arange(100, dtype="f2"),
    "b": np.arange(3, dtype="f4"),
}


def test_device_put_shares_the_mapped_memory_and_jnp_asarray_copies(
    store: PersistentStore,
) -> None:
    store.save_context(1, Context(WEIGHTS))
    ctx = store.load_context(1)
    params = jax.device_put(ctx.get_weights())  # a plain dict: a pytree
    for name, array in ctx.weights.items():
        assert params[name].dtype == array.dtype
        assert params[name].unsafe_buffer_pointer() == array.ctypes.data  # zero copies
        assert jnp.asarray(array).unsafe_buffer_pointer() != array.ctypes.data  # a copy
        assert jnp.array(array).unsafe_buffer_pointer() != array.ctypes.data  # a copy
    total = jax.jit(lambda p: p["w"].sum() + p["b"].sum())(params)
    assert float(total) == float(WEIGHTS["w"].sum() + WEIGHTS["b"].sum())


def test_a_device_put_array_keeps_its_map_alive(store: PersistentStore) -> None:
    store.save_context(1, Context(WEIGHTS))
    params = jax.device_put(store.load_context(1).get_weights())
    gc.collect()  # the context and its arrays are gone; JAX holds the map
    assert np.array_equal(np.asarray(params["w"]), WEIGHTS["w"])
