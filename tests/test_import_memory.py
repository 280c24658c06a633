"""Imports stream: the daemon's memory does not grow with what it imports.

The daemon's peak resident set (VmHWM, reset through /proc/PID/clear_refs before
each publish) is measured around publishes of a sharded checkpoint of random
data and of an .npz that inflates far beyond its size (issue 18 item 11): the rise
must stay well below the bytes imported. Reading a tensor into memory, as the
importers did before, raises it by at least the tensor's size.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from support.daemon import running_daemon

from ctxstore import PersistentStore, RemoteError
from ctxstore.client import publish
from ctxstore.nodes.files import DEFAULT_MAX_IMPORT_BYTES, machine_memory

MiB = 1 << 20


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def reset_peak(pid: int) -> int:
    """Start a new peak-RSS measurement of ``pid`` (Linux: clear_refs 5); returns the RSS now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return peak_rss(pid)


def random_checkpoint(directory: Path, shards: int, tensor_bytes: int) -> int:
    """A safetensors checkpoint of ``shards`` shards, one random float32 tensor each."""
    directory.mkdir()
    rng = np.random.default_rng(0)
    weight_map = {}
    for i in range(1, shards + 1):
        name = f"layers.{i}.weight"
        shard = f"model-{i:05d}-of-{shards:05d}.safetensors"
        header = json.dumps({name: {"dtype": "F32", "shape": [tensor_bytes // 4],
                                    "data_offsets": [0, tensor_bytes]}}).encode()  # fmt: skip
        with open(directory / shard, "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header)
            for _ in range(tensor_bytes // (8 * MiB)):
                f.write(rng.bytes(8 * MiB))
        weight_map[name] = shard
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text('{"hidden_size": 64}')
    return shards * tensor_bytes


def check_streamed_publish(tmp_path: Path, shards: int, tensor_bytes: int, bound: int) -> None:
    total = random_checkpoint(tmp_path / "ckpt", shards, tensor_bytes)
    with running_daemon(tmp_path) as daemon:
        pid = daemon.proc.pid
        before = reset_peak(pid)
        version = publish(1, tmp_path / "ckpt", socket=daemon.socket)
        rise = peak_rss(pid) - before
        assert rise < bound < total, f"peak RSS rose {rise / MiB:.0f} MiB importing {total / MiB}"
        with PersistentStore(daemon.store, readonly=True) as store:
            assert store.load_context(1, version).nbytes == total
            assert store.verify(1) == []


def test_a_sharded_checkpoint_is_streamed_in_bounded_memory(tmp_path: Path) -> None:
    check_streamed_publish(tmp_path, shards=3, tensor_bytes=16 * MiB, bound=16 * MiB)


@pytest.mark.slow
def test_a_checkpoint_several_times_the_memory_bound_is_streamed(tmp_path: Path) -> None:
    check_streamed_publish(tmp_path, shards=5, tensor_bytes=64 * MiB, bound=32 * MiB)


def zip_bomb(path: Path, inflated: int) -> None:
    """An honest .npz whose one member (zeros) inflates ~1000:1."""
    header = f"{{'descr': '|u1', 'fortran_order': False, 'shape': ({inflated},), }}"
    header += " " * (-(len(header) + 11) % 64) + "\n"
    prefix = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
    zeros = bytes(8 * MiB)
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("bomb.npy", "w", force_zip64=True) as member,
    ):
        member.write(prefix)
        for _ in range(inflated // len(zeros)):
            member.write(zeros)


def test_an_npz_bomb_is_inflated_to_disk_not_memory(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.npz"
    zip_bomb(bomb, 64 * MiB)
    assert bomb.stat().st_size < MiB
    with running_daemon(tmp_path) as daemon:
        pid = daemon.proc.pid
        before = reset_peak(pid)
        version = publish(1, bomb, socket=daemon.socket)
        assert peak_rss(pid) - before < 24 * MiB
        with PersistentStore(daemon.store, readonly=True) as store:
            assert store.load_context(1, version)["bomb"].nbytes == 64 * MiB


def test_an_npz_inflating_past_the_limit_is_refused_before_inflating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = tmp_path / "bomb.npz"
    zip_bomb(bomb, 32 * MiB)
    monkeypatch.setenv("CTXSTORE_IMPORT_MAX_BYTES", str(16 * MiB))
    with running_daemon(tmp_path) as daemon:
        pid = daemon.proc.pid
        before = reset_peak(pid)
        with pytest.raises(RemoteError, match=f"more than the limit of {16 * MiB} bytes"):
            publish(1, bomb, socket=daemon.socket)
        assert peak_rss(pid) - before < 8 * MiB
        assert daemon.proc.poll() is None


def test_the_default_import_limit_is_the_machines_memory() -> None:
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert DEFAULT_MAX_IMPORT_BYTES == machine_memory() <= physical
    assert DEFAULT_MAX_IMPORT_BYTES < 64 * 2**30 or physical >= 64 * 2**30
