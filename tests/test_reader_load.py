"""The reader's mapping of a version: done once per version, with checks done once per file.

Counted, never timed: how many times a version is mapped, and how many .npy
headers are parsed or read, when several threads ask together, when files are
written by ctxstore, and when a vouched-for version's files were checked before.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import ctxstore.store.decode
import ctxstore.store.npyfile
from ctxstore import Context, IntegrityError, PersistentStore
from ctxstore.errors import StorageError
from ctxstore.readers import Reader

DEADLINE_S = 30.0  # a safety net for waits on other threads, never a measured time


def context(version: int) -> Context:
    return Context({"w": np.arange(512, dtype="f4") + version, "b": np.full(8, version, "i8")})


def test_threads_asking_for_one_new_version_map_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket thread adopting an announcement and a thread in get()/wait_for() that saw
    the version table first ask for the same version: one maps it, the other waits."""
    store_dir = tmp_path / "store"
    with PersistentStore(store_dir) as writer:
        writer.save_context(1, context(1))
    with Reader(store=store_dir, socket=tmp_path / "none.sock", connect=False) as reader:
        real = reader._store.load_context
        calls: list[tuple[Any, ...]] = []
        first_in, second_in, release = threading.Event(), threading.Event(), threading.Event()

        def blocking_load(*args: Any, **kwargs: Any) -> Context:
            calls.append(args)
            (second_in if first_in.is_set() else first_in).set()
            assert release.wait(DEADLINE_S)
            return real(*args, **kwargs)

        monkeypatch.setattr(reader._store, "load_context", blocking_load)
        reader_module = __import__("ctxstore.readers.adoption", fromlist=["_PendingLoad"])
        pending_class = getattr(reader_module, "_PendingLoad", None)
        if pending_class is not None:  # know when the second thread waits for the first

            class Watched(pending_class):  # type: ignore[misc, valid-type]
                def __init__(self) -> None:
                    super().__init__()
                    wait = self.done.wait

                    def announce_wait(timeout: float | None = None) -> bool:
                        second_in.set()
                        return bool(wait(timeout))

                    self.done.wait = announce_wait  # type: ignore[method-assign]

            monkeypatch.setattr(reader_module, "_PendingLoad", Watched)
        got: list[Context] = []
        threads = [threading.Thread(target=lambda: got.append(reader.get(1))) for _ in range(2)]
        threads[0].start()
        assert first_in.wait(DEADLINE_S)
        threads[1].start()
        assert second_in.wait(DEADLINE_S)  # waiting for the first, or mapping it again
        release.set()
        for thread in threads:
            thread.join(DEADLINE_S)
        assert len(calls) == 1
        assert [ctx.version for ctx in got] == [1, 1]
        assert got[0] is got[1]


def test_a_failed_mapping_leaves_the_waiting_thread_to_try_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_dir = tmp_path / "store"
    with PersistentStore(store_dir) as writer:
        writer.save_context(1, context(1))
    with Reader(store=store_dir, socket=tmp_path / "none.sock", connect=False) as reader:
        real = reader._store.load_context
        calls: list[int] = []

        def fails_once(*args: Any, **kwargs: Any) -> Context:
            calls.append(1)
            if len(calls) == 1:
                raise StorageError("the disk hiccupped")
            return real(*args, **kwargs)

        monkeypatch.setattr(reader._store, "load_context", fails_once)
        with pytest.raises(StorageError):
            reader.get(1)
        assert reader.get(1).version == 1
        assert not reader._loading  # nothing left pending


def _count_parses(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    parsed: list[bytes] = []
    real = ctxstore.store.npyfile.parse_npy_header

    def counting(header: bytes) -> Any:
        parsed.append(header)
        return real(header)

    monkeypatch.setattr(ctxstore.store.npyfile, "parse_npy_header", counting)
    return parsed


def test_a_header_as_ctxstore_writes_it_is_accepted_without_parsing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed = _count_parses(monkeypatch)
    for dtype, shape in ((np.dtype("f4"), (3, 4)), (np.dtype("<i8"), ()), (np.dtype("u1"), (0,))):
        header = ctxstore.store.npyfile.npy_header(dtype, shape)
        ctxstore.store.npyfile.check_npy_header(header, dtype, shape, len(header))
    assert parsed == []
    header = ctxstore.store.npyfile.npy_header(np.dtype("f4"), (3, 4))
    with pytest.raises(IntegrityError, match="shape"):  # a different record is still caught
        ctxstore.store.npyfile.check_npy_header(header, np.dtype("f4"), (4, 3), len(header))
    # the same header as another numpy may space it: parsed, and accepted
    spaced = header.replace(b", }", b",  }", 1)[: len(header) - 1] + b"\n"
    assert spaced != header and len(spaced) == len(header)
    ctxstore.store.npyfile.check_npy_header(spaced, np.dtype("f4"), (3, 4), len(header))
    assert len(parsed) == 2  # the reshaped record and the spaced header


def test_a_vouched_version_reads_each_files_header_once_per_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Served on a writer's verified record, a version's headers are compared with its
    index rows; the same files (same identity and rows) are not read again, a changed
    index row is."""
    monkeypatch.setattr(ctxstore.store.decode, "_HEADERS_AGREED", {})
    checked: list[str] = []
    real = ctxstore.store.decode._check_mapped_header

    def counting(slot: int, version: int, name: str, *args: Any, **kwargs: Any) -> None:
        checked.append(name)
        real(slot, version, name, *args, **kwargs)

    monkeypatch.setattr(ctxstore.store.decode, "_check_mapped_header", counting)
    with PersistentStore(tmp_path / "store") as writer:
        writer.save_context(1, context(1))
        assert writer.record_check(1, 1, rehash=False) == []
        with PersistentStore(writer.root, readonly=True) as reader:
            for _ in range(3):
                ctx = reader.load_context(1, verify=True, trust_verified=True)
                assert float(ctx.weights["w"][1]) == 2.0
            assert reader.versions_trusted == 3
            assert sorted(checked) == ["b", "w"]
            # the same files under another record (w's shape [512] as [256, 2]): read again
            _reshape_first_tensor(writer.root, [256, 2])
            with pytest.raises(IntegrityError, match=r"\.npy header disagrees"):
                reader.load_context(1, verify=True, trust_verified=True)
            assert sorted(checked) == ["b", "w", "w"]


def _reshape_first_tensor(store_dir: Path, shape: list[int]) -> None:
    """Change the recorded shape of version 1's first tensor (same element count)."""
    conn = sqlite3.connect(store_dir / "index.db")
    with conn:
        (blob,) = conn.execute(
            "SELECT manifest FROM versions WHERE slot = 1 AND version = 1"
        ).fetchone()
        entries = msgpack.unpackb(blob)
        entries[0][2] = shape
        conn.execute(
            "UPDATE versions SET manifest = ? WHERE slot = 1 AND version = 1",
            (msgpack.packb(entries),),
        )
    conn.close()
