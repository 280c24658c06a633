"""How an import copies a checkpoint into the store (issue 17's publish cost).

Each tensor byte of a safetensors shard is read once, into one buffer the
commit reuses, hashed and written from there; each staged tensor file's fsync
starts as soon as it is written (the disk writes one tensor while the next is
copied), and the commit protocol still holds: every file fsynced before the
rename, the rename before COMMIT.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from support.checkpoints import SHARDS, tensors, write_checkpoint
from support.commit_order import Recorder, check_commit_order

import ctxstore.store.staging as store_module
from ctxstore import PersistentStore
from ctxstore.daemon.committer import Committer
from ctxstore.nodes import open_import

BOUND = 30.0  # seconds; only a commit that never starts an fsync early gets near it


def test_an_import_reads_each_tensor_byte_once_into_one_reused_buffer(
    store: PersistentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt", tensors(), SHARDS)
    into: list[tuple[int, int]] = []  # (id of the buffer read into, bytes)
    fresh: list[int] = []  # bytes read into a new bytes object
    real_preadv, real_pread = os.preadv, os.pread

    def preadv(fd: int, buffers: list[Any], offset: int) -> int:
        got = real_preadv(fd, buffers, offset)
        into.append((id(memoryview(buffers[0]).obj), got))
        return got

    def pread(fd: int, n: int, offset: int) -> bytes:
        data = real_pread(fd, n, offset)
        fresh.append(len(data))
        return data

    with open_import(ckpt) as imported:
        nbytes = imported.nbytes
        with monkeypatch.context() as patch:
            patch.setattr(os, "preadv", preadv)
            patch.setattr(os, "pread", pread)
            version = store.save_import(1, imported)
    assert sum(got for _, got in into) == nbytes  # every byte read once, none twice
    assert len({buffer for buffer, _ in into}) == 1  # all through one buffer
    assert sum(fresh) == 0  # no chunk allocated per read
    ctx = store.load_context(1, version, verify=True)
    for name, array in tensors().items():
        assert ctx[name].dtype == array.dtype and ctx[name].tobytes() == array.tobytes(), name


def test_an_imports_files_are_fsynced_as_they_are_written_and_before_the_rename(
    store: PersistentStore,
    tmp_path: Path,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fsync of the first tensor's staged file starts before the last tensor is
    written: the last write waits (bounded) until that fsync is seen, which a commit
    syncing everything only after staging never does. The protocol's order holds."""
    weights = tensors()
    ckpt = write_checkpoint(tmp_path / "ckpt", weights, SHARDS)
    written: list[str] = []
    first_synced = threading.Event()
    synced_before_last: list[bool] = []
    real_write = store_module.write_streamed
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        if written and os.readlink(f"/proc/self/fd/{fd}") == written[0]:
            first_synced.set()

    def write_streamed(path: str, header: bytes, chunks: Any) -> str:
        if len(written) == len(weights) - 1:
            synced_before_last.append(first_synced.wait(BOUND))
        written.append(path)
        return real_write(path, header, chunks)

    monkeypatch.setattr(os, "fsync", fsync)  # under the recorder's: both see every fsync
    monkeypatch.setattr(store_module, "write_streamed", write_streamed)
    recorder.events.clear()
    assert store._conn is not None
    store._conn.set_trace_callback(lambda sql: recorder.add("sql", sql.strip()))
    committer = Committer(store, None, lambda _: recorder.add("announce", ""))
    try:
        asyncio.run(committer.commit(1, open_import(ckpt)))
    finally:
        store._conn.set_trace_callback(None)
    assert len(written) == len(weights)
    assert synced_before_last == [True], "the first tensor was not fsynced before the last's write"
    assert check_commit_order(recorder.events) == [], recorder.events
