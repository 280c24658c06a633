"""``python -m bench.hfworker``: one inference worker of the Hugging Face scenario.

It imports torch and transformers, opens a connected ctxstore ``Reader`` and
builds a ``LlamaForCausalLM`` on the slot's current version with
``ctxstore.readers.torch.build_model`` (no copy), then says ``ready`` and its
bare PSS (measured before the model was built). Then it obeys one line of
stdin at a time and answers one line on stdout for each:

* ``ctxstore VERSION``: wait until the Reader has VERSION (the daemon's
  announcement), re-point the live model's parameters at it
  (``swap_weights``, the documented hot-swap path), and answer
  ``served <time.time()> <cpu seconds since the command> <committed_at>``, the
  last from the daemon's announcement of VERSION (its COMMIT, data fsynced);
* ``pretrained DIR``: ``LlamaForCausalLM.from_pretrained(DIR)`` replaces the
  model, as a worker without ctxstore reloads;
* ``safeopen DIR``: ``safetensors.safe_open`` (mmap) on every shard of DIR,
  each tensor loaded, and the live model's ``load_state_dict(..., assign=True)``
  with them (the zero-copy way; a plain ``load_state_dict`` would copy 1 GiB
  into every worker);
* ``pss``: answers ``pss <bytes>``, its own PSS now.

Every answer to a load carries the wall-clock time the new weights were in
the model (``time.time()``, the clock the daemon stamps ``committed_at`` with)
and the process's CPU time (every thread) spent on the command. A forward
pass on a fixed input after each load checks the model runs (not timed: it
comes after the stamp).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: how long a served version's announcement may take to reach the callback thread
ANNOUNCE_TIMEOUT_S = 30.0


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _pss() -> int:
    import psutil

    return int(psutil.Process().memory_full_info().pss)


def _check(model: Any) -> None:
    import torch

    with torch.no_grad():
        logits = model(torch.arange(8).unsqueeze(0)).logits
    if not bool(torch.isfinite(logits.float()).all()):
        raise RuntimeError("the model produced non-finite logits")


def run(store: str, sock: str, slot: int, rehash: bool) -> int:
    import warnings

    import torch
    import transformers
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    from ctxstore.readers import Reader
    from ctxstore.readers import torch as ctx_torch

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    class RehashingReader(Reader):
        """A Reader as it was before the daemon verified once per host: it never takes the
        daemon's verified record, so it hashes every version it adopts."""

        def _vouched(self) -> bool:
            return False

    reader_class = RehashingReader if rehash else Reader
    committed: dict[int, float] = {}  # version -> committed_at, from the announcement
    announced = threading.Condition()

    def remember(event: Any) -> None:
        if event.committed_at is not None:
            with announced:
                committed[event.version] = event.committed_at
                announced.notify_all()

    def committed_at(version: int) -> float:
        """The announcement's committed_at for ``version``: its callback runs on the
        reader's callback thread, which may not have run yet when the swap is done."""
        with announced:
            if not announced.wait_for(lambda: version in committed, ANNOUNCE_TIMEOUT_S):
                raise RuntimeError(f"no announcement of version {version} reached the callback")
            return committed[version]

    with reader_class(store=store, socket=sock, name="hf-worker") as reader:
        reader.subscribe(slot, callback=remember)
        deadline = time.monotonic() + 120
        while not reader.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        bare = _pss()
        model = ctx_torch.build_model(reader.get(slot), LlamaForCausalLM)
        _check(model)
        _say(f"ready {bare}")
        for line in sys.stdin:
            how, _, arg = line.strip().partition(" ")
            cpu0 = time.process_time()
            if how == "ctxstore":
                reader.wait_for(slot, int(arg), timeout=300)
                ctx_torch.swap_weights(model, reader.get(slot))
            elif how == "pretrained":
                model = LlamaForCausalLM.from_pretrained(arg)
            elif how == "safeopen":
                state: dict[str, Any] = {}
                for shard in sorted(Path(arg).glob("*.safetensors")):
                    with safe_open(str(shard), "pt") as f:
                        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                            state[key] = f.get_tensor(key)
                model.load_state_dict(state, strict=False, assign=True)
                model.tie_weights()
            elif how == "pss":
                _say(f"pss {_pss()}")
                continue
            else:
                raise ValueError(f"unknown command {line!r}")
            served = time.time()
            cpu = time.process_time() - cpu0
            _check(model)
            start = committed_at(int(arg)) if how == "ctxstore" else 0.0
            _say(f"served {served!r} {cpu!r} {start!r}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hfworker")
    parser.add_argument("store")
    parser.add_argument("socket")
    parser.add_argument("slot", type=int)
    parser.add_argument("--rehash", action="store_true", help="hash every adopted version")
    args = parser.parse_args(argv)
    return run(args.store, args.socket, args.slot, args.rehash)


if __name__ == "__main__":
    raise SystemExit(main())
