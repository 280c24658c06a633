"""Worker CPU per hot swap of a 218-tensor Llama-shaped version, split into its parts.

``python -m bench.swap_cpu [--rounds 20] [--profile]``: a one-off measurement (not
part of ``python -m bench``). A private daemon runs on a temporary store (HTTP
off); a small bf16 checkpoint with the 218 tensor names of the hfserve scenario's
model (24 layers, tiny widths: the cost is per tensor, not per byte) is published
``rounds`` times. In this process a Reader follows the slot and a
``LlamaForCausalLM`` is built on it; for each new version the figures are the
process CPU time (``time.process_time``) of the Reader's adoption
(``reader.get``: manifest decode, opens, maps, header checks) and of
``swap_weights``. Medians over the rounds. ``--profile``: cProfile of both,
top entries.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ctxstore import Context
from ctxstore.client import publish

from .hfdata import base_weights, llama_config, tensor_shapes

CONFIG = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 24,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    "tie_word_embeddings": True, "max_position_embeddings": 128,
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    import torch
    from transformers import LlamaForCausalLM

    from ctxstore.readers import Reader
    from ctxstore.readers import torch as ctx_torch

    torch.set_num_threads(1)
    config = llama_config(CONFIG)
    shapes = tensor_shapes(config)
    stored = {**CONFIG, "model_type": "llama"}
    contexts = [Context(base_weights(shapes, seed), config=stored) for seed in range(2)]
    with tempfile.TemporaryDirectory(prefix="ctxstore-swap-") as tmp:
        store, sock = Path(tmp, "store"), Path(tmp, "ctx.sock")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "ctxstore.cli", "daemon", "--store", str(store),
             "--socket", str(sock), "--http", "off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            while not sock.exists():
                time.sleep(0.05)
            publish(1, contexts[0], socket=sock)
            with Reader(str(store), str(sock), follow=False) as reader:
                model = ctx_torch.build_model(reader.get(1), LlamaForCausalLM)
                adopt, swap, views, walks = [], [], [], []
                prof = cProfile.Profile() if args.profile else None
                for round_ in range(args.rounds):
                    version = publish(1, contexts[(round_ + 1) % 2], socket=sock)
                    time.sleep(0.2)  # let the daemon verify and record it
                    if prof:
                        prof.enable()
                    t0 = time.process_time()
                    ctx = reader.get(1)
                    t1 = time.process_time()
                    ctx_torch.swap_weights(model, ctx)
                    t2 = time.process_time()
                    if prof:
                        prof.disable()
                    assert ctx.version == version
                    adopt.append(t1 - t0)
                    swap.append(t2 - t1)
                    t3 = time.process_time()
                    ctx_torch.state_dict(ctx)
                    t4 = time.process_time()
                    model.state_dict(keep_vars=True)
                    views.append(t4 - t3)
                    walks.append(time.process_time() - t4)
                stats = reader.stats()
        finally:
            daemon.terminate()
            daemon.wait(30)
    print(f"{len(shapes)} tensors, {args.rounds} rounds (hashed {stats.hashed}, "
          f"trusted {stats.trusted}): adoption {statistics.median(adopt) * 1e3:.2f} ms, "
          f"swap_weights {statistics.median(swap) * 1e3:.2f} ms CPU (medians; of which "
          f"torch.state_dict {statistics.median(views) * 1e3:.2f} ms, model.state_dict "
          f"{statistics.median(walks) * 1e3:.2f} ms)")  # fmt: skip
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
