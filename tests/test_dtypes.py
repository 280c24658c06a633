"""Dtypes round-trip with their true dtype: bfloat16, float8 and the rest of ml_dtypes, from
numpy, torch, JAX, .safetensors and the daemon, to every reader, zero-copy; what cannot
round-trip (raw void, packed float4, np.save'd bfloat16) is refused by name, and nothing
is half-committed."""

from __future__ import annotations

import io
import json
import math
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from support.daemon import running_daemon

from ctxstore import Context, IntegrityError, InvalidInputError, NotFoundError, RemoteError
from ctxstore.client import publish
from ctxstore.daemon.hooks import finite_check
from ctxstore.dtypes import ML_DTYPE_NAMES, SAFETENSORS_DTYPES
from ctxstore.messages import TensorSpec
from ctxstore.nodes import read_weights_file
from ctxstore.readers import Reader
from ctxstore.store import PersistentStore
from ctxstore.store.npyfile import check_recorded_dtype, dtype_from_text, dtype_to_text

Array = np.ndarray[Any, Any]

ML_DTYPES = sorted(ML_DTYPE_NAMES)
NUMPY_DTYPES = ["?", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8", "c8", "c16"]


def sample(dtype: np.dtype[Any], shape: tuple[int, ...] = (3, 5)) -> Array:
    """Every bit pattern a byte can hold (NaNs included), as ``dtype`` values."""
    count = math.prod(shape) * dtype.itemsize
    return np.frombuffer(bytes(i % 256 for i in range(count)), dtype).reshape(shape)


def every_dtype() -> list[np.dtype[Any]]:
    return [np.dtype(getattr(ml_dtypes, n)) for n in ML_DTYPES] + [
        np.dtype(d) for d in NUMPY_DTYPES
    ]


def assert_same(got: Array, want: Array) -> None:
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape
    assert got.tobytes() == want.tobytes()


def assert_mapped(array: Array) -> None:
    """Zero-copy: the array is a view over the file's mapping, not a private copy."""
    assert not array.flags.owndata
    assert not array.flags.writeable


# -- the index text ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ML_DTYPES)
def test_ml_dtypes_are_recorded_by_name_and_read_back(name: str) -> None:
    dtype = np.dtype(getattr(ml_dtypes, name))
    assert dtype_to_text(dtype) == name
    assert dtype_from_text(name) == dtype


def test_the_index_check_allows_ml_dtypes_and_still_refuses_raw_void() -> None:
    for name in ML_DTYPES:
        check_recorded_dtype(np.dtype(getattr(ml_dtypes, name)), "row")
    with pytest.raises(IntegrityError, match="raw void"):
        dtype_from_text("'|V2'")  # what the index would say had bfloat16 been stored as void
    with pytest.raises(IntegrityError, match="unreadable"):
        dtype_from_text("bfloat17")


def test_existing_index_texts_read_as_before() -> None:
    for text, dtype in [("'<f4'", "<f4"), ("'|b1'", "?"), ("[('a', '<i8'), ('b', '<f2')]", None)]:
        expected = np.dtype([("a", "<i8"), ("b", "<f2")]) if dtype is None else np.dtype(dtype)
        assert dtype_from_text(text) == expected
        assert dtype_to_text(expected) == text


# -- from Python, through a store -------------------------------------------------------------


def test_every_dtype_round_trips_through_a_store_zero_copy(tmp_path: Path) -> None:
    arrays = {f"t{i}": sample(dtype) for i, dtype in enumerate(every_dtype())}
    with PersistentStore(tmp_path / "s") as store:
        store.save_context(1, Context(arrays))
        back = store.load_context(1)
        rows = {t.name: t.dtype for t in store.get_metadata(1).tensors or ()}
        assert store.verify() == []
    for name, array in arrays.items():
        assert_same(back[name], array)
        assert_mapped(back[name])
        assert rows[name] == str(array.dtype)  # what show / the API print: bfloat16, ...
    assert rows["t0"] == ML_DTYPES[0] and "bfloat16" in rows.values()


def test_np_load_of_a_stored_bfloat16_file_returns_its_bits(tmp_path: Path) -> None:
    weights = np.array([1.5, -2.0, np.inf, np.nan], ml_dtypes.bfloat16)
    fp8 = np.array([0.5, -448.0], ml_dtypes.float8_e5m2)  # np.save would write '<f1'
    with PersistentStore(tmp_path / "s") as store:
        store.save_context(1, Context({"w": weights, "f": fp8}))
    bits = np.load(tmp_path / "s" / "slots" / "1" / "1" / "0.npy")
    assert bits.dtype == np.dtype("<u2")
    assert bits.tobytes() == weights.tobytes()
    assert_same(bits.view(ml_dtypes.bfloat16), weights)
    fp8_bits = np.load(tmp_path / "s" / "slots" / "1" / "1" / "1.npy")
    assert fp8_bits.dtype == np.dtype("u1") and fp8_bits.tobytes() == fp8.tobytes()


def test_torch_state_dict_publishes_without_conversion(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied, as lm_head and embed_tokens
    model = model.to(torch.bfloat16)
    weight = model[0].weight
    assert weight.requires_grad
    fp8_kinds = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
                 torch.float8_e5m2fnuz, torch.float8_e8m0fnu]  # fmt: skip
    tensors: dict[str, torch.Tensor] = {
        **dict(model.named_parameters(remove_duplicate=False)),  # the tied pair, both names
        "transposed": weight.T,  # not contiguous
        "strided": torch.arange(20, dtype=torch.float32)[::3],
        "u16": torch.arange(5).to(torch.uint16),
        **{f"fp8_{i}": torch.linspace(-4, 4, 9).to(kind) for i, kind in enumerate(fp8_kinds)},
    }
    with PersistentStore(tmp_path / "s") as store:
        store.save_context(1, Context(tensors))
        back = store.load_context(1)
    assert back["0.weight"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert back["fp8_0"].dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    assert back["fp8_4"].dtype == np.dtype(ml_dtypes.float8_e8m0fnu)
    for name, tensor in tensors.items():
        assert back[name].shape == tuple(tensor.shape)
        assert back[name].tobytes() == torch_bits(tensor), name
    np.testing.assert_array_equal(
        back["transposed"].astype(np.float32), weight.detach().T.float().numpy()
    )


def torch_bits(tensor: torch.Tensor) -> bytes:
    """The tensor's values as bytes in C order, through torch alone."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.itemsize]
    return bytes(tensor.detach().contiguous().view(width).numpy().tobytes())


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (
            lambda: torch.zeros(2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
            "float4_e2m1fn_x2",
        ),
        (lambda: torch.zeros(2, 2).to_sparse(), "to_dense"),
        (lambda: torch.zeros(2, device="meta"), "meta device"),
    ],
)
def test_torch_tensors_numpy_cannot_hold_are_refused_by_name(make: Any, why: str) -> None:
    with pytest.raises(InvalidInputError, match=why) as info:
        Context({"odd": make()})
    assert "'odd'" in str(info.value)


JAX_ROUND_TRIP = """
import sys
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from ctxstore import Context, PersistentStore

arrays = {
    "bf16": jnp.linspace(-1, 1, 6, dtype=jnp.bfloat16).reshape(2, 3),
    "fp8": jnp.array([0.5, -2.0], dtype=jnp.float8_e4m3fn),
    "f32": jnp.arange(4, dtype=jnp.float32),
}
with PersistentStore(sys.argv[1]) as store:
    store.save_context(1, Context(arrays))
    back = store.load_context(1)
    for name, array in arrays.items():
        want = np.asarray(array)
        got = back[name]
        assert (got.dtype, got.shape, got.tobytes()) == (want.dtype, want.shape, want.tobytes())
    assert back["bf16"].dtype == np.dtype(ml_dtypes.bfloat16), back["bf16"].dtype
    assert back["fp8"].dtype == np.dtype(ml_dtypes.float8_e4m3fn), back["fp8"].dtype
print("ok")
"""


def test_jax_arrays_round_trip_through_a_store(tmp_path: Path) -> None:
    """In a process of its own: once imported, JAX makes every later fork in pytest's
    process warn (an error here), and other tests fork."""
    done = subprocess.run(
        [sys.executable, "-c", JAX_ROUND_TRIP, str(tmp_path / "s")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr[-2000:]


# -- what cannot round-trip is refused --------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "why"),
    [
        (np.zeros(3, "V2"), r"\|V2: it is raw bytes \(void\)"),
        (np.zeros(2, [("a", "f4"), ("b", ml_dtypes.bfloat16)]), "field 'b' is bfloat16"),
        (np.zeros(2, [("a", "f4"), ("v", "V4")]), "field 'v' is raw bytes"),
        (np.zeros(2, np.dtypes.StringDType()), "Python objects"),
        (np.zeros(2, ml_dtypes.bfloat16).view(np.dtype(ml_dtypes.bfloat16).newbyteorder(">")),
         "byte-swapped"),
    ],
)  # fmt: skip
def test_dtypes_that_cannot_round_trip_are_refused(array: Array, why: str) -> None:
    with pytest.raises(InvalidInputError, match=why) as info:
        Context({"ok": np.ones(2), "bad": array})
    assert "'bad'" in str(info.value)


def test_publish_descriptors_carry_ml_dtypes_names_and_refuse_void() -> None:
    spec = TensorSpec("w", "bfloat16", (3,), 0, 6)
    assert spec.dtype == "bfloat16" and spec.to_wire()[1] == "bfloat16"
    assert TensorSpec("f", "float8_e4m3fn", (2, 2), 64, 4).dtype == "float8_e4m3fn"
    with pytest.raises(InvalidInputError, match=r"'w'.*raw bytes \(void\)"):
        TensorSpec("w", "<V2", (3,), 0, 6)  # what an older client sent for bfloat16
    with pytest.raises(InvalidInputError, match="not a plain numpy dtype string"):
        TensorSpec("w", "float8_e9m9", (3,), 0, 3)


def save_npy(array: Array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "dtype", [ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]
)
def test_np_saved_ml_dtypes_npy_files_are_refused_naming_safetensors(
    tmp_path: Path, dtype: Any
) -> None:
    path = tmp_path / "w.npy"
    path.write_bytes(save_npy(np.ones(3, dtype)))
    with pytest.raises(InvalidInputError, match=r"w\.npy.*save them as \.safetensors"):
        read_weights_file(path)


def huge_empty_npy(path: Path) -> Path:
    raw = str({"descr": "<f4", "fortran_order": False, "shape": (0, 10**30)}).encode()
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw)) + raw)
    return path


def test_shape_with_a_zero_and_a_huge_dimension_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="too large"):
        read_weights_file(huge_empty_npy(tmp_path / "huge.npy"))
    st_header = (
        b'{"e": {"dtype": "F32", "shape": [0, 4611686018427387904, 4], "data_offsets": [0, 0]}}'
    )
    st = tmp_path / "huge.safetensors"
    st.write_bytes(struct.pack("<Q", len(st_header)) + st_header)
    with pytest.raises(InvalidInputError, match="too large"):
        read_weights_file(st)
    with pytest.raises(InvalidInputError, match="too large"):
        TensorSpec("e", "<f4", (0, 2**62, 2**62), 0, 0)
    with pytest.raises(InvalidInputError, match="too large"):
        Context({"e": torch.empty(0, 2**62)})


def test_a_file_job_with_a_huge_empty_shape_fails_once_as_invalid_input(
    store: PersistentStore, tmp_path: Path
) -> None:
    """It was an uncaught ValueError: kind "internal", a traceback, and three attempts."""
    from support.jobs import FakeTime, make_queue, run_async

    from ctxstore.daemon.jobs import Job, JobQueue
    from ctxstore.daemon.pipeline import job_runner

    weights = huge_empty_npy(tmp_path / "huge.npy")
    time = FakeTime()

    class NoCommits:
        async def commit(self, slot: int, context: Any, *, model_type: str | None = None) -> int:
            raise AssertionError("nothing was built, so nothing may be committed")

    async def scenario() -> Job:
        queue: JobQueue | None = None
        run = job_runner(NoCommits(), lambda: queue)  # type: ignore[arg-type]
        queue = make_queue(store, run, time, max_attempts=3)
        job = queue.submit(4, "file", {"path": str(weights)})
        await queue.start()
        failed = await queue.wait(job.id)
        await queue.stop()
        return failed

    job = run_async(scenario())
    assert (job.state, job.attempts) == ("failed", 1)
    assert job.error is not None and "too large" in job.error and "Traceback" not in job.error
    assert time.sleeps == []


# -- finite_check -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "where"),
    [
        (np.array([(1.0, (np.nan, 2))], [("a", "f4"), ("s", [("m", "f8"), ("n", "i4")])]),
         "field 's.m'"),
        (np.array([(1.0, [0.0, np.inf])], [("a", "f4"), ("v", "f2", (2,))]), "field 'v'"),
        (np.array([1.0, np.nan], ml_dtypes.bfloat16), "1 NaN"),
        (np.array([1.0, np.inf], ml_dtypes.float8_e5m2), "1 Inf"),
        (np.array([1.0, np.nan], ml_dtypes.float8_e4m3fn), "1 NaN"),
    ],
)  # fmt: skip
def test_finite_check_reads_structured_fields_and_ml_floats(array: Array, where: str) -> None:
    with pytest.raises(InvalidInputError, match=where):
        finite_check(1, Context({"x": array}))


def test_finite_check_passes_large_finite_float8_values() -> None:
    """448 (e4m3fn's largest) x 1000 would overflow a float8 sum to NaN."""
    finite_check(1, Context({"x": np.full(1000, 448.0, ml_dtypes.float8_e4m3fn)}))


# -- through a real daemon, read by a Reader --------------------------------------------------


def safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    tensors = {
        "bf16": torch.linspace(-3, 3, 12, dtype=torch.bfloat16).reshape(3, 4),
        "f8_e4m3": torch.linspace(-3, 3, 8).to(torch.float8_e4m3fn),
        "f8_e5m2": torch.linspace(-3, 3, 8).to(torch.float8_e5m2),
        "f32": torch.arange(6, dtype=torch.float32),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "b": torch.tensor([True, False]),
    }
    safetensors.torch.save_file(tensors, path)
    return tensors


def test_daemon_publishes_true_dtypes_to_readers(tmp_path: Path) -> None:
    arrays = {f"t{i}": sample(dtype, (4, 3)) for i, dtype in enumerate(every_dtype())}
    st_path = tmp_path / "model.safetensors"
    st_tensors = safetensors_file(st_path)
    with running_daemon(tmp_path) as daemon:
        assert publish(1, Context(arrays), socket=daemon.socket) == 1
        assert publish(2, st_path, socket=daemon.socket) == 1
        with Reader(daemon.store, daemon.socket, name="dtypes") as reader:
            shm = reader.get(1)
            from_file = reader.get(2)
            for name, array in arrays.items():
                assert_same(shm[name], array)
                assert_mapped(shm[name])
            for name, tensor in st_tensors.items():
                got = from_file[name]
                assert_mapped(got)
                assert got.dtype == np.dtype(
                    {"bf16": ml_dtypes.bfloat16, "f8_e4m3": ml_dtypes.float8_e4m3fn,
                     "f8_e5m2": ml_dtypes.float8_e5m2}.get(name, got.dtype)
                )  # fmt: skip
                np.testing.assert_array_equal(got.astype(np.float32), tensor.float().numpy())


def test_daemon_refuses_files_that_cannot_round_trip_and_commits_nothing(tmp_path: Path) -> None:
    npz = tmp_path / "mixed.npz"
    np.savez(npz, ok=np.ones(3, "f4"), bf16=np.ones(3, ml_dtypes.bfloat16))  # member is '<V2'
    packed = tmp_path / "packed.safetensors"
    header = (
        b'{"ok": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
        b' "f4": {"dtype": "F4", "shape": [4], "data_offsets": [4, 6]}}'
    )
    packed.write_bytes(struct.pack("<Q", len(header)) + header + bytes(6))
    huge = huge_empty_npy(tmp_path / "huge.npy")
    with running_daemon(tmp_path) as daemon:
        for path, why in [
            (npz, "raw bytes"),
            (packed, "'F4' is not supported"),
            (huge, "too large"),
        ]:
            with pytest.raises(RemoteError, match=why) as info:
                publish(1, path, socket=daemon.socket)
            assert info.value.kind == "invalid_input"
        assert publish(2, Context({"w": np.ones(2)}), socket=daemon.socket) == 1  # carries on
    with PersistentStore(daemon.store, readonly=True) as store:
        with pytest.raises(NotFoundError):
            store.list_versions(1)
        assert store.verify() == []


@pytest.mark.parametrize("code", sorted(SAFETENSORS_DTYPES))
def test_safetensors_files_of_every_supported_code_import_as_the_library_wrote_them(
    tmp_path: Path, code: str
) -> None:
    text = SAFETENSORS_DTYPES[code]
    dtype = dtype_from_text(text if text in ML_DTYPE_NAMES else repr(text))
    array = sample(dtype, (2, 3))
    path = tmp_path / "one.safetensors"
    safetensors.numpy.save_file({"t": array}, path)  # the reference writer names the code
    header = path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]]
    assert json.loads(header)["t"]["dtype"] == code
    assert_same(read_weights_file(path).weights["t"], array)
