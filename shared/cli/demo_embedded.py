"""``ctxstore demo`` without a daemon: build, commit and read back in one process.

It builds LLM and CNN contexts into a temporary store, commits several
versions of each, reads every version back zero-copy, verifies the store and
prints a summary. Everything lives in a temporary directory removed at exit.
"""

from __future__ import annotations

import mmap
import tempfile
import time
from pathlib import Path

from ctxstore.context import Context
from ctxstore.nodes import CNNNode, LLMNode
from ctxstore.store import PersistentStore

from .table import print_table

LLM_SLOT, CNN_SLOT = 1, 2


def _is_zero_copy(ctx: Context) -> bool:
    """Every array is a read-only view straight over an mmap of the stored file."""
    return all(
        not a.flags.writeable and isinstance(a.base, mmap.mmap) for a in ctx.weights.values()
    )


def run_demo(versions: int = 3) -> int:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ctxstore-demo-") as tmp:
        root = Path(tmp) / "store"
        print(f"demo store: {root}")
        with PersistentStore(root) as store:
            for slot, node_type, make in (
                (LLM_SLOT, "llm", lambda seed: LLMNode(LLM_SLOT, {"seed": seed})),
                (CNN_SLOT, "cnn", lambda seed: CNNNode(CNN_SLOT, {"seed": seed})),
            ):
                for seed in range(versions):
                    ctx = make(seed).build_context().set_metadata({"seed": seed})
                    start = time.perf_counter()
                    version = store.save_context(slot, ctx, model_type=node_type)
                    commit_ms = (time.perf_counter() - start) * 1e3
                    start = time.perf_counter()
                    loaded = store.load_context(slot, version)
                    load_us = (time.perf_counter() - start) * 1e6
                    same = loaded.equals(ctx)
                    rows.append(
                        (
                            slot,
                            node_type,
                            version,
                            len(loaded),
                            f"{loaded.nbytes / 2**20:.2f}",
                            f"{commit_ms:.2f}",
                            f"{load_us:.0f}",
                            "yes" if _is_zero_copy(loaded) and same else "NO",
                        )
                    )
            problems = store.verify()
    print_table(
        ("slot", "type", "version", "tensors", "MiB", "commit ms", "load us", "zero-copy+equal"),
        rows,
    )
    ok = not problems and all(row[-1] == "yes" for row in rows)
    print("verify: ok" if not problems else f"verify: {len(problems)} problem(s)")
    return 0 if ok else 1
