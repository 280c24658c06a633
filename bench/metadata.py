"""Metadata lookup: ``PersistentStore.get_metadata`` against a bare SQLite primary-key SELECT.

The store holds a 30-tensor context with an LLM-like config and metadata.
ctxstore's lookup resolves the slot's current version, reads the version row
and its aliases in one read snapshot and decodes config and metadata (and, with
``tensors=True``, the tensor table). The floor is what any SQLite-backed index
pays at least: one ``SELECT config, metadata FROM versions WHERE slot = ? AND
version = ?`` (the primary key, version known in advance) on its own read-only
connection to the same database; with the tensor table, plus one SELECT of
the version's tensor rows. A bare SELECT followed by ``json.loads`` of both
documents is shown as well: the least a lookup that returns Python objects does.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from typing import Any

import numpy as np

from ctxstore import Context
from ctxstore.store import PersistentStore
from ctxstore.store import layout as store_layout

from .data import layer_weights
from .harness import AtMost, Candidate, Figure, ScenarioResult
from .scenario import RunContext, Scenario

SLOT = 11
TENSORS = 30

CTX_LOOKUP = "ctxstore get_metadata(tensors=False)"
CTX_TABLE = "ctxstore get_metadata(tensors=True)"
BARE = "bare SQLite PK SELECT"
BARE_JSON = "bare PK SELECT + json.loads"
BARE_TABLE = "bare PK SELECT + tensor rows SELECT"

CONFIG = {
    "vocab_size": 32000,
    "d_model": 512,
    "n_layers": 8,
    "n_heads": 8,
    "dtype": "float16",
    "temperature": 0.7,
    "top_p": 0.95,
    "max_tokens": 2048,
    "learning_rate": 0.0003,
    "stop": ["</s>", "<|end|>"],
}
METADATA = {"run": "bench", "step": 120000, "loss": 1.873, "tags": ["nightly", "eval"]}


def run(ctx: RunContext) -> ScenarioResult:
    result = ScenarioResult()
    root = ctx.data_dir / "store"
    try:
        with PersistentStore(root) as writer:
            weights = layer_weights(TENSORS, np.random.default_rng(ctx.seed))
            context = Context(weights=weights, config=CONFIG, metadata=METADATA)
            version = writer.save_context(SLOT, context, model_type="llm")
        with PersistentStore(root, readonly=True) as reader:
            conn = sqlite3.connect(f"file:{store_layout.index_path(root)}?mode=ro", uri=True)
            try:
                result.figures += _measure(ctx, reader, conn, version)
            finally:
                conn.close()
    finally:
        shutil.rmtree(ctx.data_dir, ignore_errors=True)
    return result


def _measure(
    ctx: RunContext, reader: PersistentStore, conn: sqlite3.Connection, version: int
) -> list[Figure]:
    key = (SLOT, version)

    def bare() -> Any:
        return conn.execute(
            "SELECT config, metadata FROM versions WHERE slot = ? AND version = ?", key
        ).fetchone()

    def bare_json() -> Any:
        config, metadata = bare()
        return json.loads(config), json.loads(metadata)

    def bare_table() -> Any:
        row = bare()
        rows = conn.execute(
            "SELECT position, name, dtype, shape, nbytes, checksum FROM tensors "
            "WHERE slot = ? AND version = ? ORDER BY position",
            key,
        ).fetchall()
        return row, rows

    if bare() is None or len(bare_table()[1]) != TENSORS:
        raise AssertionError("the bare queries found no row: the schema changed under the bench")
    ctx.progress.expect(2)
    budget = ctx.budget(1.0, 200)
    goal = AtMost(20_000, "issue 2")
    lookup = ctx.measure_figure(
        Figure("metadata.lookup", "metadata lookup, current version", reference=BARE, goal=goal),
        [
            ("ctxstore", Candidate(CTX_LOOKUP, lambda: reader.get_metadata(SLOT, tensors=False))),
            ("alternative", Candidate(BARE_JSON, bare_json)),
            ("floor", Candidate(BARE, bare)),
        ],
        budget,
    )
    table = ctx.measure_figure(
        Figure(
            "metadata.table",
            f"metadata lookup with the tensor table ({TENSORS} tensors)",
            reference=BARE_TABLE,
            goal=goal,
        ),
        [
            ("ctxstore", Candidate(CTX_TABLE, lambda: reader.get_metadata(SLOT))),
            ("floor", Candidate(BARE_TABLE, bare_table)),
        ],
        budget,
    )
    return [lookup, table]


SCENARIO = Scenario(
    name="metadata",
    title="Metadata lookup",
    method=__doc__ or "",
    run=run,
)
