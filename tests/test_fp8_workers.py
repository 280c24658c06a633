"""An fp8 checkpoint end to end, in real processes (issue 17).

A block-quantized fp8 checkpoint directory (``float8_e4m3fn`` weights with a
``weight_scale_inv`` per 32x32 block, as DeepSeek-V3 and Qwen3's FP8 checkpoints
ship them, plus a ``float8_e5m2`` and a ``bfloat16`` tensor) is published through a
running daemon; two worker processes take their weights from a Reader as torch
tensors (no copy) and dequantize them. Their dequantized weights must equal, bit for
bit, what the same dequantization gives on the checkpoint read with the safetensors
library; a second version must reach both and match its own reference.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from support.daemon import running_daemon
from support.procs import dies_with_pytest

from ctxstore.client import publish

torch = pytest.importorskip("torch", reason="the test extra installs torch")

BLOCK = 32
CONFIG = {
    "architectures": ["TinyFp8Model"],
    "quantization_config": {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]},
}

# A worker: follow slot 1 to each version the parent names on stdin, answer with the
# sha256 of its dequantized weights (float32), and whether torch shares the maps.
WORKER = r"""
import hashlib, json, sys
import torch
from ctxstore.readers import Reader
from ctxstore.readers import torch as ctx_torch

BLOCK = int(sys.argv[3])

def dequantized(tensors):
    out = {}
    for name, t in tensors.items():
        if name.endswith(".weight_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        value = t.to(torch.float32)
        if scale is not None:
            value = value * scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
        out[name] = value
    return out

def digest(values):
    h = hashlib.sha256()
    for name in sorted(values):
        h.update(name.encode())
        h.update(values[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

with Reader(sys.argv[1], socket=sys.argv[2], name="fp8-worker") as reader:
    for line in sys.stdin:
        version = int(line)
        ctx = reader.wait_for(1, version, timeout=60)
        tensors = ctx_torch.state_dict(ctx)
        shared = all(t.data_ptr() == ctx[n].ctypes.data for n, t in tensors.items())
        dtypes = sorted({str(t.dtype) for t in tensors.values()})
        answer = {"version": ctx.version, "digest": digest(dequantized(tensors)),
                  "shared": shared, "dtypes": dtypes}
        print(json.dumps(answer), flush=True)
"""


def fp8_weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for layer in range(2):
        name = f"layers.{layer}.mlp.weight"
        weights[name] = (rng.standard_normal((64, 96)) * 8).astype(ml_dtypes.float8_e4m3fn)
        scale = rng.uniform(0.001, 0.02, (64 // BLOCK, 96 // BLOCK)).astype("<f4")
        weights[name + "_scale_inv"] = scale
    weights["lm_head.weight"] = rng.standard_normal((16, 32)).astype(ml_dtypes.float8_e5m2)
    weights["norm.weight"] = rng.standard_normal(32).astype(ml_dtypes.bfloat16)
    return weights


def write_checkpoint(directory: Path, weights: dict[str, np.ndarray]) -> Path:
    """Two shards and an index, as save_pretrained lays an fp8 checkpoint out."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(CONFIG))
    names = sorted(weights)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, shard_names in enumerate(shards, 1):
        shard = f"model-{i:05d}-of-00002.safetensors"
        safetensors.numpy.save_file({n: weights[n] for n in shard_names}, directory / shard)
        weight_map |= dict.fromkeys(shard_names, shard)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def reference_digest(directory: Path) -> str:
    """The dequantized weights as the checkpoint itself gives them (safetensors' torch
    loader, no ctxstore), in the worker's digest form."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors |= load_file(shard)
    digest = hashlib.sha256()
    for name in sorted(tensors):
        if name.endswith(".weight_scale_inv"):
            continue
        value = tensors[name].to(torch.float32)
        scale = tensors.get(name + "_scale_inv")
        if scale is not None:
            value = value * scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
        digest.update(name.encode())
        digest.update(value.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def ask(worker: subprocess.Popen[str], version: int) -> dict[str, object]:
    assert worker.stdin is not None and worker.stdout is not None
    worker.stdin.write(f"{version}\n")
    worker.stdin.flush()
    line = worker.stdout.readline()
    assert line, f"worker exited: {worker.wait(10)}"
    answer: dict[str, object] = json.loads(line)
    return answer


def test_fp8_checkpoint_reaches_torch_workers_dequantized_bit_for_bit(tmp_path: Path) -> None:
    with running_daemon(tmp_path) as daemon:
        first = write_checkpoint(tmp_path / "v1", fp8_weights(1))
        v1 = publish(1, first, socket=daemon.socket)
        args = (daemon.store, daemon.socket, BLOCK)
        workers = [
            subprocess.Popen(
                dies_with_pytest([sys.executable, "-c", WORKER, *map(str, args)]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        try:
            for worker in workers:
                answer = ask(worker, v1)
                assert answer["version"] == v1
                assert answer["shared"] is True
                assert answer["dtypes"] == [
                    "torch.bfloat16", "torch.float32", "torch.float8_e4m3fn", "torch.float8_e5m2",
                ]  # fmt: skip
                assert answer["digest"] == reference_digest(first)

            second = write_checkpoint(tmp_path / "v2", fp8_weights(2))
            v2 = publish(1, second, socket=daemon.socket)
            assert reference_digest(second) != reference_digest(first)
            for worker in workers:
                answer = ask(worker, v2)
                assert (answer["version"], answer["digest"]) == (v2, reference_digest(second))
        finally:
            for worker in workers:
                for pipe in (worker.stdin, worker.stdout):
                    if pipe is not None:
                        pipe.close()
                try:
                    worker.wait(20)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
