"""File importers: real files round trip; hostile files are refused and never run code.

The hostile files are built by hand here: pickled object arrays whose unpickling
would leave a marker file behind, zip members that lie about their sizes or
overlap (zip bombs), safetensors headers with impossible lengths and offsets,
truncated and padded .npy files. Every one must raise InvalidInputError naming
the file; a fuzz test mutates valid files and holds the importers to "load or
raise InvalidInputError", nothing else.
"""

from __future__ import annotations

import json
import os
import pathlib
import stat
import struct
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ctxstore import Context, InvalidInputError, NotFoundError
from ctxstore.context import freeze_array
from ctxstore.nodes import load_weights_file, read_weights_file
from ctxstore.nodes.files import MAX_NPY_HEADER, MAX_SAFETENSORS_HEADER

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# -- helpers that write files -------------------------------------------------------------------


class Payload:
    """Unpickling this touches ``marker``: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (pathlib.Path.touch, (self.marker,))


def hostile_object_array(marker: Path) -> np.ndarray[Any, Any]:
    array = np.empty(1, dtype=object)
    array[0] = Payload(marker)
    return array


def npy_bytes(header: str, data: bytes = b"", version: tuple[int, int] = (1, 0)) -> bytes:
    raw = header.encode("utf-8" if version[0] == 3 else "latin-1")
    length = struct.pack("<H" if version[0] == 1 else "<I", len(raw))
    return b"\x93NUMPY" + bytes(version) + length + raw + data


def st_bytes(header: object, data: bytes = b"", header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def patch_zip_member(path: Path, *, file_size: int | None = None, flags: int | None = None) -> None:
    """Rewrite the first member's declared size / flags in its local and central headers."""
    data = bytearray(path.read_bytes())
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    if file_size is not None:
        struct.pack_into("<I", data, local + 22, file_size)
        struct.pack_into("<I", data, central + 24, file_size)
    if flags is not None:
        struct.pack_into("<H", data, local + 6, flags)
        struct.pack_into("<H", data, central + 8, flags)
    path.write_bytes(bytes(data))


def refuses(path: Path, *patterns: str, **kwargs: Any) -> str:
    """Assert the importer refuses ``path`` naming it and the problem; return the message."""
    with pytest.raises(InvalidInputError) as info:
        load_weights_file(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    for pattern in patterns:
        assert pattern in message, message
    return message


# -- round trips --------------------------------------------------------------------------------

NPY_DTYPES = st.one_of(
    hnp.scalar_dtypes(),
    hnp.byte_string_dtypes(min_len=1, max_len=4),
    hnp.unicode_string_dtypes(min_len=1, max_len=4),
    hnp.array_dtypes(allow_subarrays=True, max_size=3),
)


@FUZZ
@given(
    array=hnp.arrays(NPY_DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
    fortran=st.booleans(),
)
def test_npy_round_trip(array: np.ndarray[Any, Any], fortran: bool) -> None:
    if fortran:
        array = np.asfortranarray(array)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory, "tensor.npy")
        with warnings.catch_warnings():  # non-latin-1 field names need format 3.0; numpy says so
            warnings.filterwarnings("ignore", "Stored array in format", UserWarning)
            np.save(path, array)
        (name, loaded), *rest = load_weights_file(path).items()
        reference = np.load(path, allow_pickle=False)
    assert not rest
    assert name == "tensor"
    assert loaded.dtype == reference.dtype
    assert loaded.shape == reference.shape
    assert loaded.tobytes() == reference.tobytes()
    assert loaded.flags.f_contiguous == reference.flags.f_contiguous
    assert not loaded.flags.writeable


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_round_trip_keeps_names_and_order(tmp_path: Path, save: Callable[..., None]) -> None:
    arrays = {
        "z.last": np.arange(12, dtype=">i4").reshape(3, 4),
        "a": np.asfortranarray(np.ones((2, 3), np.float16)),
        "empty": np.zeros((0, 5), np.complex128),
        "scalar": np.array(True),
        "layers/0/w": np.linspace(0, 1, 7),
    }
    save(tmp_path / "w.npz", **arrays)
    loaded = load_weights_file(tmp_path / "w.npz")
    assert list(loaded) == list(arrays)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name], array)


ST_DTYPES = st.sampled_from(
    ["bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
     "float16", "float32", "float64", "complex64"]
)  # fmt: skip
ST_TENSORS = st.dictionaries(
    st.from_regex(r"[a-z][a-z0-9_.]{0,11}", fullmatch=True),
    hnp.arrays(ST_DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
    max_size=5,
)


@FUZZ
@given(tensors=ST_TENSORS, metadata=st.dictionaries(st.text(max_size=5), st.text(max_size=5)))
def test_safetensors_round_trip_matches_the_library(
    tensors: dict[str, np.ndarray[Any, Any]], metadata: dict[str, str]
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory, "model.safetensors")
        safetensors.numpy.save_file(tensors, path, metadata=metadata or None)
        loaded = read_weights_file(path)
        reference = safetensors.numpy.load_file(path)
    assert loaded.format == "safetensors"
    assert loaded.metadata == metadata
    assert set(loaded.weights) == set(tensors) == set(reference)
    for name, array in tensors.items():
        got = loaded.weights[name]
        assert got.dtype == reference[name].dtype == array.dtype.newbyteorder("<")
        assert got.shape == array.shape
        assert got.tobytes() == reference[name].tobytes()
        assert not got.flags.writeable


def test_safetensors_keeps_the_file_order(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    spans = {"b": [0, 4], "a": [4, 8]}  # header order differs from name order
    header = {n: {"dtype": "F32", "shape": [1], "data_offsets": o} for n, o in spans.items()}
    write(path, st_bytes(header, struct.pack("<2f", 1.0, 2.0)))
    loaded = load_weights_file(path)
    assert list(loaded) == ["b", "a"]
    assert loaded["a"][0] == 2.0


def test_imported_arrays_enter_a_context_without_a_copy(tmp_path: Path) -> None:
    np.save(tmp_path / "w.npy", np.arange(10.0))
    safetensors.numpy.save_file({"s": np.arange(4.0)}, tmp_path / "w.safetensors")
    np.savez(tmp_path / "w.npz", z=np.arange(3))
    for name in ("w.npy", "w.safetensors", "w.npz"):
        for array in load_weights_file(tmp_path / name).values():
            assert freeze_array(array, "x") is array
            assert Context({"x": array})["x"] is array


# -- pickles never run --------------------------------------------------------------------------


def test_pickled_object_npy_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.npy"
    np.save(path, hostile_object_array(marker), allow_pickle=True)
    np.load(path, allow_pickle=True)  # the file really is hostile ...
    assert marker.exists()
    marker.unlink()
    refuses(path, "objects", "never unpickled")  # ... and the importer never runs it
    assert not marker.exists()


def test_npz_with_a_pickle_member_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.npz"
    np.savez(path, ok=np.ones(3), evil=hostile_object_array(marker))
    refuses(path, "'evil.npy'", "objects")
    assert not marker.exists()


def test_object_fields_in_structured_dtypes_are_refused(tmp_path: Path) -> None:
    header = "{'descr': [('a', '<f4'), ('b', '|O')], 'fortran_order': False, 'shape': (1,)}"
    refuses(write(tmp_path / "s.npy", npy_bytes(header, bytes(12))), "objects")


# -- .npy headers and sizes ---------------------------------------------------------------------


def test_truncated_npy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    np.save(path, np.arange(100, dtype=np.int64))
    os.truncate(path, path.stat().st_size - 1)
    refuses(path, "truncated", "800 bytes", "799")


def test_npy_with_trailing_bytes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    np.save(path, np.arange(4))
    with path.open("ab") as f:
        f.write(b"extra")
    refuses(path, "5 unexpected bytes")


HEADER = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)}"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "ends early"),
        (b"\x93NUMP", "ends early"),
        (b"PK\x03\x04" + bytes(40), "bad magic"),
        (npy_bytes(HEADER, bytes(8), version=(9, 0)), "unsupported .npy format version"),
        (npy_bytes(HEADER, bytes(8), version=(2, 0)), ""),  # v2 is fine: control case
        (npy_bytes(HEADER, bytes(8), version=(3, 0)), ""),  # v3 (utf-8 header) too
        (npy_bytes("__import__('os').system('true')", bytes(8)), "not a valid header literal"),
        (npy_bytes("[" * 5000 + "]" * 5000), "not a valid header literal"),
        (npy_bytes("{'descr': '<f4', 'shape': (2,)}", bytes(8)), "exactly the keys"),
        (npy_bytes(HEADER[:-1] + ", 'x': 1}", bytes(8)), "exactly the keys"),
        (npy_bytes(HEADER.replace("(2,)", "(-2,)"), bytes(8)), "non-negative"),
        (npy_bytes(HEADER.replace("(2,)", "(True,)"), bytes(8)), "non-negative"),
        (npy_bytes(HEADER.replace("(2,)", "[2]"), bytes(8)), "tuple"),
        (npy_bytes(HEADER.replace("(2,)", "(1,) * 65"), bytes(8)), "not a valid header literal"),
        (npy_bytes(HEADER.replace("(2,)", "(" + "1, " * 65 + ")"), bytes(4)), "at most 64"),
        (npy_bytes(HEADER.replace("False", "0"), bytes(8)), "fortran_order must be a bool"),
        (npy_bytes(HEADER.replace("'<f4'", "'<q7'"), bytes(8)), "not a valid dtype"),
        (npy_bytes(HEADER.replace("'<f4'", "42"), bytes(8)), "not a valid dtype"),
        (npy_bytes(HEADER.replace("'<f4'", "('<f4', (2,))"), bytes(16)), "cannot be the element"),
        (npy_bytes(HEADER.replace("'<f4'", "'|V0'"), b""), "cannot be the element"),
        (npy_bytes(HEADER.replace("(2,)", "(2**62,)"), bytes(8)), "not a valid header literal"),
        (npy_bytes(HEADER.replace("(2,)", "(4611686018427387904,)"), bytes(8)), "truncated"),
        (npy_bytes("x" * (MAX_NPY_HEADER + 1), version=(2, 0)), "exceeds the limit"),
        (b"\x93NUMPY\x01\x00" + struct.pack("<H", 1000) + b"{}", "runs past the end"),
        (npy_bytes(HEADER, bytes(8)).replace(b"{'", b"{\xff'"), "not a valid header literal"),
    ],
)
def test_malformed_npy_is_refused(tmp_path: Path, content: bytes, problem: str) -> None:
    path = write(tmp_path / "bad.npy", content)
    if not problem:
        assert load_weights_file(path)["bad"].shape == (2,)
        return
    refuses(path, problem)


# -- .npz archives ------------------------------------------------------------------------------


def test_npz_with_a_non_npy_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    np.savez(path, a=np.ones(2))
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("readme.txt", b"hello")
    refuses(path, "'readme.txt'", "not a .npy file")


@pytest.mark.parametrize("member", ["../escape.npy", "a\x01b.npy", "/abs.npy", ".npy"])
def test_npz_member_names_are_validated(tmp_path: Path, member: str) -> None:
    path = tmp_path / "w.npz"
    with zipfile.ZipFile(path, "w") as archive, archive.open(member, "w") as f:
        np.lib.format.write_array(f, np.ones(2))
    refuses(path, "tensor name")


def test_npz_with_a_duplicate_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    np.savez(path, a=np.ones(2))
    with (
        zipfile.ZipFile(path, "a") as archive,
        pytest.warns(UserWarning, match="Duplicate"),
        archive.open("a.npy", "w") as f,
    ):
        np.lib.format.write_array(f, np.zeros(2))
    refuses(path, "'a' twice")


def test_npz_member_declaring_more_than_it_stores_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    np.savez(path, a=np.ones(2))
    patch_zip_member(path, file_size=0xFFFFFFF0)
    refuses(path, "'a.npy'", "declares 4294967280 bytes")


def test_npz_member_claiming_an_impossible_ratio_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    np.savez_compressed(path, a=np.ones(2))
    patch_zip_member(path, file_size=0xFFFFFFF0)
    refuses(path, "'a.npy'", "more than deflate can produce")


def test_npz_over_the_byte_limit_is_refused_before_decompressing(tmp_path: Path) -> None:
    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, a=np.zeros(2**20, np.uint8), b=np.zeros(2**20, np.uint8))
    assert path.stat().st_size < 2**16  # a real, honest, very compressible archive
    refuses(path, "limit of 1500000", max_bytes=1_500_000)
    assert load_weights_file(path, max_bytes=3_000_000)["b"].nbytes == 2**20


def test_npz_with_overlapping_members_is_refused(tmp_path: Path) -> None:
    """The non-recursive zip bomb: many directory entries sharing one compressed kernel."""
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, a=np.zeros(1000))
    data = path.read_bytes()
    eocd = len(data) - 22
    signature, disk, cd_disk, _, _, cd_size, cd_offset, comment = struct.unpack(
        "<4s4H2LH", data[eocd:]
    )
    entry = data[cd_offset : cd_offset + cd_size]
    twin = entry.replace(b"a.npy", b"b.npy")
    record = struct.pack(
        "<4s4H2LH", signature, disk, cd_disk, 2, 2, 2 * cd_size, cd_offset, comment
    )
    write(path, data[:cd_offset] + entry + twin + record)
    refuses(path, "overlap")


def test_encrypted_npz_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    np.savez(path, a=np.ones(2))
    patch_zip_member(path, flags=0x1)
    refuses(path, "encrypted")


def test_npz_with_other_compression_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_BZIP2) as archive,
        archive.open("a.npy", "w") as f,
    ):
        np.lib.format.write_array(f, np.ones(2))
    refuses(path, "compression method 12")


def test_npz_with_a_bad_checksum_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    values = np.arange(16, dtype=np.int64)
    np.savez(path, a=values)
    data = bytearray(path.read_bytes())
    data[data.find(values.tobytes()) + 3] ^= 0xFF
    write(path, bytes(data))
    refuses(path, "'a.npy'", "CRC")


def test_garbage_npz_is_refused(tmp_path: Path) -> None:
    refuses(write(tmp_path / "w.npz", b"not a zip at all" * 10), "not a valid .npz")


def test_npz_member_with_a_truncated_npy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    raw = npy_bytes(HEADER, bytes(4))  # the header says 8 bytes of data, 4 follow
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.npy", raw)
    refuses(path, "'a.npy'", "truncated")


# -- .safetensors headers -----------------------------------------------------------------------


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


SAFETENSORS_CASES: list[tuple[str, bytes, str]] = [
    ("short", b"\x01\x00", "too short"),
    ("huge header length", st_bytes({}, header_len=2**62), "exceeds the format's limit"),
    (
        "over the cap",
        st_bytes({}, header_len=MAX_SAFETENSORS_HEADER + 1),
        str(MAX_SAFETENSORS_HEADER),
    ),
    (
        "header past EOF",
        st_bytes({"a": entry("U8", [1], 0, 1)}, b"\x00", header_len=500),
        "runs past the end",
    ),
    (
        "offsets past EOF",
        st_bytes({"a": entry("F32", [250], 0, 1000)}, bytes(8)),
        "run past the end",
    ),
    (
        "overlap",
        st_bytes({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, bytes(12)),
        "overlap",
    ),
    (
        "same span twice",
        st_bytes({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 0, 8)}, bytes(8)),
        "overlap",
    ),
    (
        "gap",
        st_bytes({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 12, 20)}, bytes(20)),
        "belong to no tensor",
    ),
    (
        "uncovered tail",
        st_bytes({"a": entry("F32", [2], 0, 8)}, bytes(16)),
        "cover 8 bytes of a 16-byte",
    ),
    ("dtype x shape", st_bytes({"a": entry("F32", [3], 0, 8)}, bytes(8)), "need 12"),
    ("packed float4", st_bytes({"a": entry("F4", [4], 0, 2)}, bytes(2)), "'F4' is not supported"),
    ("unknown dtype", st_bytes({"a": entry("F12", [1], 0, 2)}, bytes(2)), "supported: BOOL"),
    ("begin after end", st_bytes({"a": entry("U8", [0], 4, 0)}, bytes(4)), "end before they begin"),
    ("negative offset", st_bytes({"a": entry("U8", [1], -1, 0)}, bytes(1)), "non-negative"),
    (
        "bool in shape",
        st_bytes({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, bytes(1)),
        "shape",
    ),
    ("missing key", st_bytes({"a": {"dtype": "U8", "shape": [1]}}, bytes(1)), "must have the keys"),
    ("entry not a dict", st_bytes({"a": [1, 2]}, bytes(1)), "must have the keys"),
    ("not json", st_bytes(b"{nope}", bytes(1)), "not valid JSON"),
    ("not utf-8", st_bytes(b'{"\xff": 1}', bytes(1)), "not valid JSON"),
    ("not an object", st_bytes(b"[1, 2]"), "its header is not JSON"),
    ("deep nesting", st_bytes(b"{" + b'"a":[' * 100000 + b"]" * 100000 + b"}"), "not valid JSON"),
    ("duplicate key", st_bytes(b'{"a": {}, "a": {}}'), "repeats a key"),
    ("bad metadata", st_bytes({"__metadata__": {"k": 1}}), "__metadata__"),
    ("bad name", st_bytes({"a/../b": entry("U8", [1], 0, 1)}, bytes(1)), "tensor name"),
    ("control in name", st_bytes({"a\u200bb": entry("U8", [1], 0, 1)}, bytes(1)), "tensor name"),
]


@pytest.mark.parametrize(
    ("content", "problem"),
    [pytest.param(content, problem, id=name) for name, content, problem in SAFETENSORS_CASES],
)
def test_malformed_safetensors_is_refused(tmp_path: Path, content: bytes, problem: str) -> None:
    path = write(tmp_path / "bad.safetensors", content)
    refuses(path, problem)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(content, id=name)
        for name, content, _ in SAFETENSORS_CASES
        if name not in {"bad name", "control in name", "bad metadata"}  # valid for the library
    ],
)
def test_the_reference_library_also_refuses_them(tmp_path: Path, content: bytes) -> None:
    """Our refusals are of truly broken files, not of files the format allows."""
    path = write(tmp_path / "bad.safetensors", content)
    with pytest.raises(Exception):  # noqa: B017, PT011 - SafetensorError, KeyError, ...
        safetensors.numpy.load_file(path)


def test_safetensors_zero_sized_tensors_may_share_an_offset(tmp_path: Path) -> None:
    header = {
        "e1": entry("F32", [0], 0, 0),
        "e2": entry("F64", [3, 0], 0, 0),
        "a": entry("U8", [2], 0, 2),
    }
    loaded = load_weights_file(write(tmp_path / "z.safetensors", st_bytes(header, b"\x01\x02")))
    assert loaded["e2"].shape == (3, 0)
    assert loaded["a"].tolist() == [1, 2]


def test_safetensors_extra_entry_keys_are_ignored_like_the_library(tmp_path: Path) -> None:
    header = {"a": {**entry("U8", [1], 0, 1), "x": [1, 2]}}
    path = write(tmp_path / "x.safetensors", st_bytes(header, b"\x07"))
    assert load_weights_file(path)["a"].tolist() == [7]
    assert safetensors.numpy.load_file(path)["a"].tolist() == [7]


def test_large_safetensors_metadata_is_summarised(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    safetensors.numpy.save_file({"a": np.ones(1)}, path, metadata={"k": "v" * 100_000})
    loaded = read_weights_file(path)
    assert list(loaded.metadata) == ["__omitted__"]


# -- files themselves ---------------------------------------------------------------------------


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    for name in ("nope.npy", "nope.npz", "nope.safetensors", "dir/nope.npy"):
        with pytest.raises(NotFoundError, match="does not exist"):
            load_weights_file(tmp_path / name)


def test_directory_and_fifo_are_refused_without_blocking(tmp_path: Path) -> None:
    (tmp_path / "d.npy").mkdir()
    refuses(tmp_path / "d.npy", "not a regular file")
    os.mkfifo(tmp_path / "f.npy")
    outcome: list[BaseException] = []
    worker = threading.Thread(target=lambda: _capture(outcome, tmp_path / "f.npy"), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "opening a FIFO blocked"
    assert isinstance(outcome[0], InvalidInputError)
    assert "not a regular file" in str(outcome[0])


def _capture(outcome: list[BaseException], path: Path) -> None:
    try:
        load_weights_file(path)
    except BaseException as exc:  # handed to the test thread
        outcome.append(exc)


def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    path = tmp_path / "w.npy"
    np.save(path, np.ones(2))
    path.chmod(0)
    try:
        refuses(path, "cannot be opened")
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_suffix_and_format(tmp_path: Path) -> None:
    np.save(tmp_path / "w.npy", np.ones(2))
    os.rename(tmp_path / "w.npy", tmp_path / "w.bin")
    with pytest.raises(InvalidInputError, match=r"unknown suffix '\.bin'"):
        load_weights_file(tmp_path / "w.bin")
    assert list(load_weights_file(tmp_path / "w.bin", format="npy")) == ["w"]
    with pytest.raises(InvalidInputError, match="format must be one of"):
        load_weights_file(tmp_path / "w.bin", format="pickle")
    refuses(tmp_path / "w.bin", "not a valid .npz", format="npz")
    assert list(load_weights_file(tmp_path / "w.bin", format="npy")) == ["w"]
    os.rename(tmp_path / "w.bin", tmp_path / "UPPER.NPY")
    assert list(load_weights_file(tmp_path / "UPPER.NPY")) == ["UPPER"]


def test_byte_limit_for_single_files(tmp_path: Path) -> None:
    np.save(tmp_path / "w.npy", np.ones(100))
    safetensors.numpy.save_file({"a": np.ones(100)}, tmp_path / "w.safetensors")
    refuses(tmp_path / "w.npy", "larger than the limit of 100", max_bytes=100)
    refuses(tmp_path / "w.safetensors", "larger than the limit of 100", max_bytes=100)


# -- fuzz: mutated files load or are refused, nothing else --------------------------------------


def _valid_files() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        np.save(root / "a.npy", np.arange(12, dtype="<f4").reshape(3, 4))
        np.savez(root / "a.npz", x=np.arange(5), y=np.ones((2, 2), np.float16))
        np.savez_compressed(root / "c.npz", x=np.arange(50))
        safetensors.numpy.save_file(
            {"w": np.arange(6, dtype=np.float32), "b": np.zeros(2, np.int64)},
            root / "a.safetensors",
            metadata={"k": "v"},
        )
        return {p.name: p.read_bytes() for p in root.iterdir()}


VALID_FILES = _valid_files()


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(VALID_FILES)))
    data = bytearray(VALID_FILES[name])
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert"]))
        if kind == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[position] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, ord("9")]))
        elif kind == "truncate":
            del data[position:]
            if not data:
                break
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
    suffix = Path(name).suffix
    return suffix, bytes(data)


@FUZZ
@given(case=mutations())
def test_mutated_files_load_or_are_refused(case: tuple[str, bytes]) -> None:
    suffix, data = case
    with tempfile.TemporaryDirectory() as directory:
        path = write(Path(directory, "m" + suffix), data)
        try:
            loaded = load_weights_file(path)
        except InvalidInputError:
            return
        for array in loaded.values():
            assert isinstance(array, np.ndarray)
            assert not array.flags.writeable
            assert not array.dtype.hasobject


def test_errors_never_echo_the_bytes_or_size_of_the_file(tmp_path: Path) -> None:
    """Issue 18 item 13: a symlink to a secret named as a weights file must not turn the
    error into an oracle for the secret's first bytes or its size."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"password=hunter2\n" * 7)
    leaks = [
        str(int.from_bytes(b"password", "little")),  # as a safetensors header length
        repr(b"passwo"),  # as .npy magic
        str(secret.stat().st_size),
    ]
    for suffix in (".safetensors", ".npy", ".npz"):
        link = tmp_path / f"weights{suffix}"
        link.symlink_to(secret)
        with pytest.raises(InvalidInputError) as info:
            load_weights_file(link)
        message = str(info.value)
        assert str(link) in message and "hunter2" not in message and "passw" not in message
        assert not any(leak in message for leak in leaks), message
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x05\x00")
    assert "2 bytes" not in refuses(short, "too short")
