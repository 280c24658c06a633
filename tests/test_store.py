"""PersistentStore behaviour: round trips, pointers, retention, dedup, verify, refusals."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from support.store import wal_leftovers

from ctxstore import (
    ConflictError,
    Context,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    StorageError,
)
from ctxstore.store import PersistentStore
from ctxstore.store import checking as store_module
from ctxstore.validation import thaw_json


@pytest.fixture(autouse=True)
def _verify_reports_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """No writer works beside these stores (each test's own chores are drained before
    verify looks), so the damage a test makes is reported at once, not after
    ``VERIFY_SETTLE_MAX_S`` of rechecks (10 s a test). Waiting out a busy writer's passing
    states is proven in test_cli_verify.py, beside a real one."""
    monkeypatch.setattr(store_module, "VERIFY_SETTLE_MAX_S", 0.0)


DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?"),
    hnp.complex_number_dtypes(endianness="?"),
    hnp.datetime64_dtypes(endianness="?"),
    hnp.timedelta64_dtypes(endianness="?"),
    hnp.byte_string_dtypes(min_len=1, max_len=8),
    hnp.unicode_string_dtypes(min_len=1, max_len=4, endianness="?"),
    hnp.array_dtypes(hnp.scalar_dtypes(), min_size=1, max_size=3),
)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)


@st.composite
def stored_arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays as callers hand them in: any layout, Fortran order and strided views included."""
    array = draw(hnp.arrays(DTYPES, SHAPES))
    layout = draw(st.sampled_from(["c", "fortran", "strided"]))
    if layout == "fortran":
        return np.asfortranarray(array)
    if layout == "strided" and array.ndim >= 1 and array.shape[0] > 1:
        return array[::2]
    return array


def test_round_trip_every_npy_dtype_and_layout(store: PersistentStore) -> None:
    slot = iter(range(10_000))

    @settings(max_examples=75, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(stored_arrays(), min_size=1, max_size=4))
    def round_trip(arrays: list[np.ndarray]) -> None:
        ctx = Context(arrays, {"n": len(arrays)}, {"tag": "rt"})
        s = next(slot)
        version = store.save_context(s, ctx)
        loaded = store.load_context(s, version)
        assert loaded.slot == s and loaded.version == version
        for original, back in zip(arrays, loaded.weights.values(), strict=True):
            assert back.dtype == original.dtype
            assert back.shape == original.shape
            assert back.tobytes() == np.ascontiguousarray(original).tobytes()
            assert not back.flags.writeable
        # every stored file is a plain .npy that np.load reads without pickle
        for position, original in enumerate(arrays):
            path = store.root / "slots" / str(s) / str(version) / f"{position}.npy"
            plain = np.load(path, allow_pickle=False)
            assert plain.tobytes() == np.ascontiguousarray(original).tobytes()

    round_trip()


def test_loaded_arrays_are_zero_copy_maps(store: PersistentStore) -> None:
    import mmap

    store.save_context(1, Context({"w": np.arange(1000.0)}))
    w = store.load_context(1)["w"]
    assert isinstance(w.base, mmap.mmap)
    assert not w.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        w[0] = 5.0


def test_a_write_through_a_loaded_array_stays_in_this_process(store: PersistentStore) -> None:
    """The map is copy-on-write: a caller who makes a view writable on purpose edits a
    private copy of the pages it touches; the file and every later load are unchanged."""
    store.save_context(1, Context({"w": np.arange(1000.0)}))
    w = store.load_context(1)["w"]
    writable = w.view()
    writable.setflags(write=True)
    writable[0] = 5.0
    assert w[0] == 5.0  # the same memory, in this process
    again = store.load_context(1, verify=True)["w"]  # a new map of the file: still intact
    assert again[0] == 0.0
    path = next((store.root / "slots" / "1" / "1").glob("*.npy"))
    assert np.load(path)[0] == 0.0


def test_versions_count_from_one_per_slot_and_current_moves(store: PersistentStore) -> None:
    ctx = Context({"w": np.zeros(2)})
    assert [store.save_context(7, ctx) for _ in range(3)] == [1, 2, 3]
    assert store.save_context(8, ctx) == 1
    assert store.current_version(7) == 3
    assert store.load_context(7).version == 3
    assert store.current_versions() == {7: 3, 8: 1}


def test_config_metadata_and_model_type_are_stored(store: PersistentStore) -> None:
    ctx = Context({"w": np.zeros(2)}, {"lr": 0.1, "layers": [1, 2]}, {"loss": 0.25})
    store.save_context(3, ctx, model_type="llm")
    meta = store.get_metadata(3)
    assert meta.model_type == "llm" and meta.version == 1 and meta.current_version == 1
    assert meta.config == {"lr": 0.1, "layers": (1, 2)}
    assert meta.metadata == {"loss": 0.25}
    assert meta.tensors is not None and meta.tensors[0].name == "w"
    assert meta.tensors[0].shape == (2,) and meta.tensors[0].nbytes == 16
    assert store.get_metadata(3, tensors=False).tensors is None
    with pytest.raises(ConflictError, match="holds model type 'llm'"):
        store.save_context(3, ctx, model_type="cnn")


def test_version_numbers_and_model_type_follow_the_index_across_failures_and_reopens(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer remembers each slot's next number and model type between commits;
    what it remembers must be what the index says, after a failed commit and after
    a reopen alike."""
    ctx = Context({"w": np.zeros(2)})
    with PersistentStore(store_dir) as store:
        assert store.save_context(3, ctx, model_type="llm") == 1
        assert store.save_context(3, ctx) == 2  # no model type given: the slot keeps its own
        with pytest.raises(ConflictError, match="holds model type 'llm'"):
            store.save_context(3, ctx, model_type="cnn")

        def failing_fsync(paths: object, **kw: object) -> None:
            raise StorageError(5, "fsync failed (injected)")

        with monkeypatch.context() as patch:
            patch.setattr("ctxstore.store.commit.fsync_all", failing_fsync)
            with pytest.raises(StorageError, match="injected"):
                store.save_context(3, Context({"w": np.ones(2)}))
        assert [info.version for info in store.list_versions(3)] == [1, 2]
        assert store.save_context(3, ctx, model_type="llm") == 3
    with PersistentStore(store_dir) as store:
        with pytest.raises(ConflictError, match="holds model type 'llm'"):
            store.save_context(3, ctx, model_type="cnn")
        assert store.save_context(3, ctx) == 4
        assert store.get_metadata(3).model_type == "llm"


def test_a_commit_interrupted_after_its_commit_point_keeps_its_number_and_files(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt right after COMMIT (in a notebook that goes on using the
    store): the version is committed, and the next commit takes the next number
    instead of reusing its number and removing its files."""
    with PersistentStore(store_dir) as store:
        store.save_context(1, Context({"w": np.zeros(4)}))
        real_commit = store._commit

        def interrupted(*args: Any) -> Any:
            real_commit(*args)
            raise KeyboardInterrupt

        with monkeypatch.context() as patch:
            patch.setattr(store, "_commit", interrupted)
            with pytest.raises(KeyboardInterrupt):
                store.save_context(1, Context({"w": np.ones(4)}))
        assert store.save_context(1, Context({"w": np.full(4, 2.0)})) == 3
        assert store.load_context(1, 2)["w"].tolist() == [1.0] * 4
        assert store.verify() == []


def test_a_commit_reported_failed_but_durable_is_not_numbered_twice(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT wrote and synced, then reported an error: the settling write finds the
    row, keeps the version, and the next commit is numbered after it."""
    import ctxstore.store.writing as store_module

    real_transaction = store_module.transaction
    with PersistentStore(store_dir) as store:
        store.save_context(1, Context({"w": np.zeros(4)}))

        @contextlib.contextmanager
        def commits_then_fails(conn: Any) -> Iterator[Any]:
            with real_transaction(conn):
                yield conn
            raise StorageError(5, "COMMIT reported an error (injected)")

        with monkeypatch.context() as patch:
            patch.setattr(store_module, "transaction", commits_then_fails)
            with pytest.raises(StorageError, match="injected"):
                store.save_context(1, Context({"w": np.ones(4)}))
        assert store.save_context(1, Context({"w": np.full(4, 2.0)})) == 3
        assert store.load_context(1, 2)["w"].tolist() == [1.0] * 4
        assert store.verify() == []


def test_loaded_config_and_metadata_are_immutable_all_the_way_down(
    store: PersistentStore,
) -> None:
    config = {"model": {"layers": [1, {"heads": [8, 8]}], "name": "x"}, "on": True, "n": None}
    store.save_context(3, Context({"w": np.zeros(2)}, config, {"tags": ["a"]}))
    for loaded in (store.load_context(3).config, store.get_metadata(3).config):
        assert loaded == {"model": {"layers": (1, {"heads": (8, 8)}), "name": "x"},
                          "on": True, "n": None}  # fmt: skip
        with pytest.raises(TypeError):
            loaded["model"]["name"] = "y"  # type: ignore[index]
        with pytest.raises(TypeError):
            loaded["model"]["layers"][1]["heads"] = ()  # type: ignore[index]
        assert thaw_json(loaded) == config
    assert store.load_context(3).metadata["tags"] == ("a",)


def test_a_manifest_whose_sizes_disagree_with_its_shapes_is_refused(store_dir: Path) -> None:
    """A record that says 16 bytes for 2 float64s and 4 more: never a shorter array."""
    import sqlite3

    import msgpack

    with PersistentStore(store_dir) as writer:
        writer.save_context(1, Context({"w": np.zeros(2)}))
    conn = sqlite3.connect(store_dir / "index.db")
    (blob,) = conn.execute("SELECT manifest FROM versions").fetchone()
    entries = msgpack.unpackb(blob)
    entries[0][2] = [3]  # the shape now needs 24 bytes; the file and the record say 16
    with conn:
        conn.execute("UPDATE versions SET manifest = ?", (msgpack.packb(entries),))
    conn.close()
    with (
        PersistentStore(store_dir, readonly=True) as reader,
        pytest.raises(IntegrityError, match=r"'w' is float64 \[3\] in 16 bytes"),
    ):
        reader.load_context(1)


def test_a_failing_chore_after_commit_does_not_fail_the_commit(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise OSError(5, "Input/output error")

    with PersistentStore(store_dir) as store:
        monkeypatch.setattr(store, "_warm", broken)
        assert store.save_context(1, Context({"w": np.ones(2)})) == 1  # committed: it says so
        assert store.load_context(1).version == 1


def test_a_commit_warms_the_stored_files_it_linked_not_those_it_just_wrote(
    store: PersistentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    same = np.arange(1000, dtype=np.float32)
    store.save_context(1, Context({"same": same, "new": np.zeros(8)}))
    advised: list[str] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            advised.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    twice = np.ones(8)  # "again" is linked to "new", staged in this very commit
    assert store.save_context(1, Context({"same": same, "new": twice, "again": twice})) == 2
    assert advised == [str(store.root / "slots/1/2/0.npy")]  # "same", hard-linked from v1
    assert os.stat(store.root / "slots/1/2/2.npy").st_nlink == 2  # the link was made


@pytest.mark.parametrize(
    ("stored", "message"),
    [("{not json", "config is unreadable"), ('{"lr": NaN}', "NaN is not a finite number"),
     ("[1, 2]", "config is a list, not a JSON object")],
)  # fmt: skip
def test_a_damaged_stored_document_is_an_integrity_error(
    store_dir: Path, stored: str, message: str
) -> None:
    import sqlite3

    with PersistentStore(store_dir) as writer:
        writer.save_context(1, Context({"w": np.zeros(2)}, {"lr": 0.1}))
    conn = sqlite3.connect(store_dir / "index.db")
    with conn:
        conn.execute("UPDATE versions SET config = ?", (stored,))
    conn.close()
    with PersistentStore(store_dir, readonly=True) as reader:
        with pytest.raises(IntegrityError, match=message):
            reader.load_context(1)
        with pytest.raises(IntegrityError, match=message):
            reader.get_metadata(1)


def test_aliases_latest_and_rollback(store: PersistentStore) -> None:
    for i in range(3):
        store.save_context(1, Context({"w": np.full(2, i)}))
    assert store.set_alias(1, "best", 2) == 2
    assert store.load_context(1, "best").version == 2
    assert store.get_aliases(1) == {"best": 2, "latest": 3}
    assert store.rollback(1) == 2
    assert store.load_context(1).version == 2
    assert store.resolve(1, "latest") == 3
    assert store.rollback(1, 3) == 3
    assert store.save_context(1, Context({"w": np.zeros(2)})) == 4
    store.delete_alias(1, "best")
    with pytest.raises(NotFoundError, match="no alias 'best'"):
        store.load_context(1, "best")
    with pytest.raises(InvalidInputError, match="reserved"):
        store.set_alias(1, "latest", 1)


def test_retention_keeps_newest_pinned_aliased_and_current(store_dir: Path) -> None:
    with PersistentStore(store_dir, retention=2) as store:
        ctx = Context({"w": np.zeros(2)})
        store.save_context(1, ctx.set_metadata({"v": 1}))
        store.pin(1, 1)
        store.save_context(1, ctx.set_metadata({"v": 2}))
        store.set_alias(1, "keep", 2)
        for v in range(3, 8):
            store.save_context(1, ctx.set_metadata({"v": v}))
        assert [v.version for v in store.list_versions(1)] == [1, 2, 6, 7]
        store.rollback(1, 6)
        store.save_context(1, ctx)  # v8; current moved to 8, 6 no longer protected
        assert [v.version for v in store.list_versions(1)] == [1, 2, 7, 8]
        store.wait_background()  # the files of retired versions go in the background
        assert sorted(os.listdir(store_dir / "slots" / "1")) == ["1", "2", "7", "8"]
        store.unpin(1, 1)
        store.delete_alias(1, "keep")
        assert store.apply_retention(1) == [(1, 1), (1, 2)]
        assert store.verify() == []


def test_retention_respects_versions_readers_hold(store_dir: Path) -> None:
    with PersistentStore(store_dir, retention=1) as store:
        store.protected_versions = lambda slot: {1} if slot == 5 else set()
        for _ in range(3):
            store.save_context(5, Context({"w": np.zeros(1)}))
        assert [v.version for v in store.list_versions(5)] == [1, 3]


def test_removed_version_stays_valid_for_a_reader_that_maps_it(store_dir: Path) -> None:
    with PersistentStore(store_dir, retention=1) as store:
        store.save_context(1, Context({"w": np.arange(4096.0)}))
        held = store.load_context(1)["w"]
        store.save_context(1, Context({"w": np.zeros(4096)}))
        assert [v.version for v in store.list_versions(1)] == [2]
        assert held.sum() == np.arange(4096.0).sum()  # pages stay valid after unlink
        with pytest.raises(NotFoundError, match="no version 1"):
            store.load_context(1, 1)


def test_identical_tensors_are_hard_linked_not_rewritten(store: PersistentStore) -> None:
    big = np.random.default_rng(0).standard_normal(10_000)
    store.save_context(1, Context({"a": big, "b": np.zeros(3)}))
    store.save_context(1, Context({"a": big, "b": np.ones(3)}))
    store.save_context(2, Context({"x": np.zeros(3), "y": np.zeros(3)}))
    first = os.stat(store.root / "slots/1/1/0.npy")
    second = os.stat(store.root / "slots/1/2/0.npy")
    assert first.st_ino == second.st_ino and first.st_nlink == 2
    assert (
        os.stat(store.root / "slots/1/2/1.npy").st_ino
        != os.stat(store.root / "slots/1/1/1.npy").st_ino
    )
    # within one version, and across slots: slot 2's zeros are slot 1 v1's "b"
    x, y = (os.stat(store.root / f"slots/2/1/{i}.npy") for i in (0, 1))
    assert x.st_ino == y.st_ino == os.stat(store.root / "slots/1/1/1.npy").st_ino
    assert np.array_equal(store.load_context(1)["a"], big)


def test_published_files_are_read_only(store: PersistentStore) -> None:
    store.save_context(1, Context({"w": np.zeros(3)}))
    path = store.root / "slots/1/1/0.npy"
    assert os.stat(path).st_mode & 0o222 == 0
    assert wal_leftovers(store.root) == []


def test_list_slots_filters_by_model_type_and_group(store: PersistentStore) -> None:
    ctx = Context({"w": np.zeros(1)})
    store.save_context(1, ctx, model_type="llm")
    store.save_context(2, ctx, model_type="cnn")
    store.save_context(3, ctx, model_type="llm")
    store.hierarchy.add_to_group(3, "prod")
    assert [s.slot for s in store.list_slots()] == [1, 2, 3]
    assert [s.slot for s in store.list_slots(model_type="llm")] == [1, 3]
    assert [s.slot for s in store.list_slots(model_type="llm", group="prod")] == [3]
    info = store.list_slots(model_type="cnn")[0]
    assert (info.current_version, info.latest_version, info.n_versions) == (1, 1, 1)


def test_verify_names_each_kind_of_damage(store_dir: Path) -> None:
    with PersistentStore(store_dir) as store:
        for slot in (1, 2, 3, 4):
            store.save_context(slot, Context({"w": np.arange(100.0) + slot}))
        flipped = store_dir / "slots/1/1/0.npy"
        os.chmod(flipped, 0o644)
        with open(flipped, "r+b") as f:
            f.seek(200)
            byte = f.read(1)
            f.seek(200)
            f.write(bytes([byte[0] ^ 0xFF]))
        truncated = store_dir / "slots/2/1/0.npy"
        os.chmod(truncated, 0o644)
        os.truncate(truncated, 100)
        os.unlink(store_dir / "slots/3/1/0.npy")
        (store_dir / "slots/9/1").mkdir(parents=True)
        problems = {(p.kind, p.slot, p.version) for p in store.verify()}
        assert problems == {
            ("checksum_mismatch", 1, 1),
            ("wrong_size", 2, 1),
            ("missing_file", 3, 1),
            ("orphan", 9, 1),
        }
        assert store.verify(4) == []
        with pytest.raises(IntegrityError, match="has 100 bytes"):
            store.load_context(2)
        with pytest.raises(IntegrityError, match="files are missing"):
            store.load_context(3)


def test_recovery_removes_unrecorded_dirs_and_wal_leftovers(store_dir: Path) -> None:
    with PersistentStore(store_dir) as store:
        store.save_context(1, Context({"w": np.zeros(1)}))
    (store_dir / "wal" / "junk").mkdir()
    (store_dir / "wal" / "junk" / "0.npy").write_bytes(b"partial")
    (store_dir / "slots/1/2").mkdir()
    with PersistentStore(store_dir) as store:
        assert os.listdir(store_dir / "wal") == []
        assert sorted(os.listdir(store_dir / "slots/1")) == ["1"]
        assert store.recovery_problems == []
        assert store.save_context(1, Context({"w": np.ones(1)})) == 2


def test_recovery_reports_a_row_without_files(store_dir: Path) -> None:
    import shutil

    with PersistentStore(store_dir) as store:
        store.save_context(1, Context({"w": np.zeros(1)}))
    shutil.rmtree(store_dir / "slots/1/1")
    with PersistentStore(store_dir) as store:
        assert [(p.kind, p.slot, p.version) for p in store.recovery_problems] == [
            ("missing_version_dir", 1, 1)
        ]
        assert [p.kind for p in store.verify()] == ["missing_file", "missing_version_dir"]


def _snapshot(root: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda s: s.save_context(-1, Context()), InvalidInputError),
        (lambda s: s.save_context(2**31, Context()), InvalidInputError),
        (lambda s: s.save_context("1", Context()), InvalidInputError),
        (lambda s: s.save_context(1, {"w": np.zeros(1)}), InvalidInputError),
        (lambda s: s.save_context(1, Context(), model_type="../x"), InvalidInputError),
        (lambda s: s.save_context(1, Context(), aliases=("bad name",)), InvalidInputError),
        (lambda s: s.load_context(1, 99), NotFoundError),
        (lambda s: s.load_context(1, 0), InvalidInputError),
        (lambda s: s.load_context(1, "nope"), NotFoundError),
        (lambda s: s.load_context(42), NotFoundError),
        (lambda s: s.set_alias(1, "x", 99), NotFoundError),
        (lambda s: s.set_alias(1, "../../etc", 1), InvalidInputError),
        (lambda s: s.delete_alias(1, "missing"), NotFoundError),
        (lambda s: s.rollback(1), NotFoundError),
        (lambda s: s.rollback(1, 5), NotFoundError),
        (lambda s: s.pin(1, 5), NotFoundError),
        (lambda s: s.list_versions(42), NotFoundError),
        (lambda s: s.get_metadata(1, -3), InvalidInputError),
        (lambda s: s.list_slots(model_type="a b"), InvalidInputError),
        (lambda s: s.hierarchy.set_parent(1, 1), ConflictError),
        (lambda s: s.hierarchy.remove_from_group(1, "g"), NotFoundError),
        (lambda s: s.hierarchy.add_to_group(1, "bad/group"), InvalidInputError),
    ],
)
def test_invalid_calls_raise_and_leave_the_store_unchanged(
    store: PersistentStore, call: object, error: type[Exception]
) -> None:
    store.save_context(1, Context({"w": np.zeros(2)}))
    before = _snapshot(store.root / "slots"), store.list_versions(1), store.get_aliases(1)
    with pytest.raises(error):
        call(store)  # type: ignore[operator]
    after = _snapshot(store.root / "slots"), store.list_versions(1), store.get_aliases(1)
    assert before == after
    assert wal_leftovers(store.root) == []


def test_failing_pre_commit_hook_rejects_and_leaves_nothing(store: PersistentStore) -> None:
    def no_nan(slot: int, ctx: Context) -> None:
        if any(np.isnan(a).any() for a in ctx.weights.values()):
            raise InvalidInputError(f"slot {slot}: NaN in weights")

    store.pre_commit_hooks.append(no_nan)
    with pytest.raises(InvalidInputError, match="NaN"):
        store.save_context(1, Context({"w": np.array([np.nan])}))
    with pytest.raises(NotFoundError):
        store.load_context(1)
    assert not (store.root / "slots/1").exists()


def test_a_commit_that_cannot_place_its_directory_fails_whole_and_the_next_one_heals(
    store_dir: Path,
) -> None:
    """The writer remembers which slot directories exist; if one vanishes under it (damage
    from outside), that commit fails and leaves nothing, and the next commit recreates it."""
    with PersistentStore(store_dir) as store:
        assert store.save_context(1, Context({"w": np.arange(3)})) == 1
        slot_dir = store.root / "slots/1"
        for entry in slot_dir.iterdir():  # what an outside hand deleting the slot would do
            for file in entry.iterdir():
                file.unlink()
            entry.rmdir()
        slot_dir.rmdir()
        with pytest.raises(StorageError, match="cannot rename"):
            store.save_context(1, Context({"w": np.arange(4)}))
        assert [v.version for v in store.list_versions(1)] == [1]  # the failure left no row
        assert wal_leftovers(store.root) == []
        assert store.save_context(1, Context({"w": np.arange(5)})) == 2
        np.testing.assert_array_equal(store.load_context(1).weights["w"], np.arange(5))
        assert sorted(p.name for p in slot_dir.iterdir()) == ["2"]
        assert {(p.slot, p.version) for p in store.verify()} == {(1, 1)}  # only the damage


def test_readonly_store_refuses_writes_and_missing_store(store_dir: Path) -> None:
    with pytest.raises(NotFoundError, match="no ctxstore store"):
        PersistentStore(store_dir, readonly=True)
    with PersistentStore(store_dir) as writer:
        writer.save_context(1, Context({"w": np.zeros(1)}))
        with PersistentStore(store_dir, readonly=True) as reader:
            for write in ("save_context", "set_alias", "rollback"):
                assert not hasattr(reader, write)  # the view has no writes to call
            assert not hasattr(reader.hierarchy, "set_parent")
            writer.save_context(1, Context({"w": np.ones(1)}))
            assert reader.load_context(1).version == 2  # sees the writer's commits


def test_store_written_by_a_newer_schema_is_refused(store_dir: Path) -> None:
    import sqlite3

    with PersistentStore(store_dir):
        pass
    conn = sqlite3.connect(store_dir / "index.db")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(IntegrityError, match="schema version 99"):
        PersistentStore(store_dir)
    with pytest.raises(IntegrityError, match="schema version 99"):
        PersistentStore(store_dir, readonly=True)


def test_retention_below_one_is_refused(store_dir: Path) -> None:
    with pytest.raises(InvalidInputError, match="at least 1"):
        PersistentStore(store_dir, retention=0)


def test_recovery_reports_foreign_entries_it_will_not_delete(store_dir: Path) -> None:
    with PersistentStore(store_dir) as store:
        store.save_context(1, Context({"w": np.zeros(1)}))
    (store_dir / "slots/1/notes.txt").write_text("someone's file")
    with PersistentStore(store_dir) as store:
        assert [(p.kind, p.slot, p.version) for p in store.recovery_problems] == [
            ("stray_entry", 1, None)
        ]
    assert (store_dir / "slots/1/notes.txt").exists()


def _flip_byte(path: Path, at: int = 200) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_repair_moves_damaged_current_pointers_to_the_newest_intact_version(
    store_dir: Path,
) -> None:
    with PersistentStore(store_dir, retention=10) as store:
        for v in range(1, 5):
            store.save_context(1, Context({"w": np.arange(100.0) + v}))
        store.save_context(2, Context({"w": np.arange(100.0) - 1}))
        store.save_context(3, Context({"w": np.arange(100.0) - 2}))
        _flip_byte(store_dir / "slots/1/4/0.npy")  # current of slot 1
        os.unlink(store_dir / "slots/1/3/0.npy")  # the one before it too
        _flip_byte(store_dir / "slots/2/1/0.npy")  # slot 2 has nothing older
        repairs = store.repair()
        assert [(r.slot, r.from_version, r.to_version, r.damaged) for r in repairs] == [
            (1, 4, 2, [3, 4]),
            (2, 1, None, [1]),
        ]
        assert store.current_version(1) == 2
        assert np.array_equal(store.load_context(1)["w"], np.arange(100.0) + 2)
        assert store.current_version(3) == 1
        with pytest.raises(IntegrityError, match="does not match its recorded checksum"):
            store.load_context(1, 4, verify=True)  # a flipped byte: never wrong numbers
        assert store.load_context(1, 2, verify=True).version == 2
        assert store.repair() == [
            type(repairs[1])(2, 1, None, [1])
        ]  # idempotent: only what cannot be mended is left


def test_a_reader_gets_integrity_errors_not_wrong_numbers(store_dir: Path) -> None:
    with PersistentStore(store_dir) as store:
        store.save_context(1, Context({"w": np.arange(1000.0)}))
    os.chmod(store_dir / "slots/1/1/0.npy", 0o644)
    os.truncate(store_dir / "slots/1/1/0.npy", 300)
    with (
        PersistentStore(store_dir, readonly=True) as reader,
        pytest.raises(IntegrityError, match="has 300 bytes"),
    ):
        reader.load_context(1)
