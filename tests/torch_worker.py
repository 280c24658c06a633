"""Inference workers for tests/test_torch_workers.py: a Reader, a transformers model
built on its mapped tensors, swapped to each new version it is told to follow.

``python tests/torch_worker.py STORE SOCKET SLOT IN,OUT [IN,OUT ...]`` imports torch
and transformers once, then forks one worker per pair of pipe descriptors (as a
preloading server such as gunicorn does; a fresh interpreter each would spend
seconds of CPU on imports, four at once on a small machine) and waits for them.
Each worker dies with this process (PR_SET_PDEATHSIG), builds the model from the
slot's first version and writes one JSON line to OUT, then answers one command
a line from IN, one JSON line each, until EOF:

``follow V``  wait for the subscription to announce version V, swap the live model to it
``write``     write in place to a mapped weight with torch, then try it with numpy
``logits``    the current model's logits again

Every answer carries the version served, whether every model tensor is the
mapped array itself (same data pointer), and the sha256 of the logits' bytes on a
fixed input, so the parent can check they are bit-identical to its reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import queue
import sys
import traceback
from typing import IO, Any

import torch
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, LlamaConfig

from ctxstore import Context
from ctxstore.readers import Reader, VersionEvent
from ctxstore.readers import torch as ctx_torch

TOKENS = torch.arange(12).unsqueeze(0)
MODEL_FOR_CAUSAL_LM_MAPPING[LlamaConfig]  # imports the Llama model code once, before the forks


def logits_digest(model: torch.nn.Module) -> str:
    with torch.no_grad():
        logits = model(TOKENS).logits
    return hashlib.sha256(logits.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def shares_the_maps(model: torch.nn.Module, ctx: Context) -> bool:
    tensors = model.state_dict()
    return set(tensors) == set(ctx.names) and all(
        tensor.data_ptr() == ctx[name].ctypes.data for name, tensor in tensors.items()
    )


def answer(out: IO[str], ctx: Context, model: torch.nn.Module, **extra: Any) -> None:
    line = {"version": ctx.version, "shared": shares_the_maps(model, ctx), **extra}
    out.write(json.dumps({**line, "logits": logits_digest(model)}) + "\n")
    out.flush()


def in_place_writes(ctx: Context, model: Any) -> dict[str, Any]:
    """A torch write to a mapped weight (private to this process), then a numpy one."""
    weight = model.model.norm.weight
    before = float(ctx["model.norm.weight"][0])
    with torch.no_grad():
        weight.add_(1.0)
    seen = float(ctx["model.norm.weight"][0])  # the same pages, in this process
    try:
        ctx["model.norm.weight"][0] = 0.0
        numpy_error = ""
    except ValueError as exc:
        numpy_error = str(exc)
    return {"torch_delta": seen - before, "numpy_error": numpy_error}


def serve(store: str, socket: str, slot: int, name: str, inp: IO[str], out: IO[str]) -> None:
    torch.set_num_threads(1)  # the parent's reference runs on one thread too: same sums
    announced: queue.Queue[int] = queue.Queue()

    def on_version(event: VersionEvent) -> None:
        announced.put(event.version)

    with Reader(store=store, socket=socket, name=name) as reader:
        reader.subscribe(slots=[slot], callback=on_version)
        ctx = reader.wait_for(slot, 1, timeout=60)
        model = ctx_torch.build_model(ctx)
        answer(out, ctx, model)
        for line in inp:
            command, *args = line.split()
            if command == "follow":
                wanted = int(args[0])
                while announced.get(timeout=60) < wanted:
                    pass
                ctx = reader.wait_for(slot, wanted, timeout=60)
                ctx_torch.swap_weights(model, ctx)
                answer(out, ctx, model)
            elif command == "write":
                answer(out, ctx, model, **in_place_writes(ctx, model))
            elif command == "logits":
                answer(out, ctx, model)


def main(store: str, socket: str, slot: int, pairs: list[str]) -> int:
    fds = [tuple(map(int, pair.split(","))) for pair in pairs]
    children = []
    for i, (inp, out) in enumerate(fds):
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL: die with this process
                for j, pair in enumerate(fds):
                    if j != i:
                        os.close(pair[0])
                        os.close(pair[1])
                with open(inp) as commands, open(out, "w") as answers:
                    serve(store, socket, slot, f"w{i}", commands, answers)
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        children.append(pid)
    for inp, out in fds:
        os.close(inp)
        os.close(out)
    return max(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0 for pid in children)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]))
