"""JAX on CPU over a stored context: which calls share the mapped memory and which copy
(as docs/workers.md says), measured by the buffers' addresses.

JAX runs in a process of its own: once its backend is up, every later fork in
pytest's process warns (an error here), and other tests fork."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from ctxstore import Context
from ctxstore.store import PersistentStore

WEIGHTS = {
    "w": np.arange(4096, dtype="f4").reshape(64, 64),
    "h": np.arange(100, dtype="f2"),
    "b": np.arange(3, dtype="f4"),
    "bf16": np.arange(64, dtype="f4").astype(ml_dtypes.bfloat16),
    "fp8": np.arange(8, dtype="f4").astype(ml_dtypes.float8_e4m3fn),
}

# For each stored array: does jax.device_put / jnp.asarray / jnp.array of it use the
# array's own memory? Then a jitted sum over the device_put params, and whether those
# params still read right once the context and its arrays are gone (JAX holds the map).
MEASURE = """
import gc, json, sys
import jax, jax.numpy as jnp, numpy as np
from ctxstore.store import PersistentStore

with PersistentStore(sys.argv[1], readonly=True) as store:
    ctx = store.load_context(1)
    params = jax.device_put(ctx.get_weights())  # a plain dict: a pytree
    facts = {"arrays": {}}
    for name, array in ctx.weights.items():
        address = array.ctypes.data
        facts["arrays"][name] = {
            "dtype": [str(params[name].dtype), str(array.dtype)],
            "device_put": params[name].unsafe_buffer_pointer() == address,
            "asarray": jnp.asarray(array).unsafe_buffer_pointer() == address,
            "array": jnp.array(array).unsafe_buffer_pointer() == address,
        }
    facts["sum"] = float(jax.jit(lambda p: p["w"].sum() + p["b"].sum())(params))
    expected = np.array(ctx["w"])
    del ctx, array
    gc.collect()
    facts["alive"] = bool(np.array_equal(np.asarray(params["w"]), expected))
print(json.dumps(facts))
"""


def test_device_put_shares_the_mapped_memory_and_jnp_asarray_copies(tmp_path: Path) -> None:
    with PersistentStore(tmp_path / "store") as store:
        store.save_context(1, Context(WEIGHTS))
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", MEASURE, str(tmp_path / "store")],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    for name, fact in facts["arrays"].items():
        assert fact["dtype"][0] == fact["dtype"][1] == str(WEIGHTS[name].dtype)
        assert fact["device_put"], f"{name}: device_put copied"  # zero copies
        assert not fact["asarray"] and not fact["array"], f"{name}: jnp shared"  # copies
    assert facts["sum"] == float(WEIGHTS["w"].sum() + WEIGHTS["b"].sum())
    assert facts["alive"]


# A JAX program publishing its parameters (bf16, fp8, f32 jax.Arrays) through the
# daemon as they are: Context takes the jax.Arrays, publish sends it.
PUBLISH = """
import json, sys
import jax.numpy as jnp, numpy as np
from ctxstore import Context
from ctxstore.client import publish

params = {
    "w_bf16": jnp.arange(96, dtype=jnp.float32).reshape(8, 12).astype(jnp.bfloat16) / 7,
    "w_e4m3": (jnp.arange(32, dtype=jnp.float32) - 16).astype(jnp.float8_e4m3fn),
    "w_e5m2": jnp.linspace(-3, 3, 16).astype(jnp.float8_e5m2),
    "bias": jnp.ones(12, jnp.float32),
}
version = publish(1, Context(params), socket=sys.argv[1])
raw = {name: np.asarray(a).view("u1").tobytes().hex() for name, a in params.items()}
print(json.dumps({"version": version, "dtypes": {n: str(a.dtype) for n, a in params.items()},
                  "bytes": raw}))
"""


def test_jax_arrays_published_from_python_reach_a_reader_bit_for_bit(tmp_path: Path) -> None:
    from support.daemon import running_daemon

    from ctxstore.readers import Reader

    with running_daemon(tmp_path) as daemon:
        out = subprocess.run(
            [sys.executable, "-c", PUBLISH, str(daemon.socket)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        sent = json.loads(out.stdout)
        with Reader(daemon.store, socket=daemon.socket, connect=False) as reader:
            ctx = reader.get(1, sent["version"])
            assert {n: str(ctx[n].dtype) for n in ctx.names} == sent["dtypes"]
            for name, hexbytes in sent["bytes"].items():
                assert ctx[name].view("u1").tobytes().hex() == hexbytes, name
