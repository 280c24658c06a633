"""Open a context of 1, 30 and 300 tensors: ctxstore against the usual ways to store tensors.

Every implementation stores the same tensors (float32, 1-64 KiB each) on the
same filesystem and returns a mapping of name -> numpy array:

* ctxstore ``PersistentStore.load_context`` (read-only store): the tensor table
  from SQLite, then ``os.open`` + ``mmap`` + ``np.ndarray`` per file;
* ``np.load(mmap_mode="r")`` per .npy file, and ``np.load`` (a copy) per file,
  file names known in advance;
* safetensors, one file per context: ``safe_open(framework="numpy")`` +
  ``get_tensor`` for each name, and ``safetensors.numpy.load_file``;
* LMDB (py-lmdb), one value per tensor plus a JSON manifest, read zero-copy in a
  ``begin(buffers=True)`` transaction (the arrays are valid while it is open, so
  opening includes beginning it and releasing includes aborting it);
* pickle of the dict of arrays (protocol 5), one file per context.

Warm: the files were read just before. Cold: before every repetition every file
the implementation reads (tensor files, index, LMDB data file) gets
``posix_fadvise(DONTNEED)``, after a sync and after every mapping of the
previous repetition was released (LMDB's environment is reopened, untimed, so
its map pins no page). Long-lived handles stay open across repetitions, as in a
serving process: ctxstore's read-only store keeps its SQLite connection (and
SQLite's own page cache), LMDB its environment. Cold figures come twice: open only (what mmap-based
readers pay up front) and open plus reading one byte of every page (what they
pay before they have really read the data).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from ctxstore import Context
from ctxstore.store import PersistentStore
from ctxstore.store import layout as store_layout

from . import plots
from .data import Array, drop_page_cache, layer_weights, resident_fraction, touch, weights_nbytes
from .harness import AtMost, Candidate, Figure, Role, ScenarioResult, format_bytes
from .scenario import RunContext, Scenario

CTXSTORE = "ctxstore load_context"
NP_MMAP = "np.load(mmap_mode='r') per file"
NP_COPY = "np.load (copy) per file"
ST_OPEN = "safetensors safe_open + get_tensor"
ST_LOAD = "safetensors load_file (numpy)"
LMDB_GET = "LMDB zero-copy get (buffers=True)"
PICKLE = "pickle.load (dict of arrays)"

LMDB_RESIDUE = (
    "LMDB's open environment maps its meta pages, and the kernel maps their neighbours "
    "with them (fault-around): mapped pages cannot be dropped"
)

FULL_COUNTS = (1, 30, 300)
QUICK_COUNTS = (1, 10, 30)
CACHE_MODES = ("warm", "cold", "cold+read")

Loaded = Mapping[str, Array]


@dataclass
class Approach:
    """One way to open a stored context, with what it needs for the cold runs."""

    label: str
    role: Role
    files: list[str]
    open: Callable[[], Any]
    arrays: Callable[[Any], Iterable[Array]]
    release: Callable[[Any], None]
    reset: Callable[[], None] | None = None
    #: dropped with ``files`` for the cold runs but not checked for residency (the index)
    extra_files: tuple[str, ...] = ()


def _values(loaded: Loaded) -> Iterable[Array]:
    return loaded.values()


def _nothing(_loaded: object) -> None:
    return None


def _lmdb_get(txn: lmdb.Transaction, key: str) -> memoryview | bytes:
    value = txn.get(key.encode())
    if value is None:
        raise KeyError(f"LMDB has no value under {key!r}")
    return value


class Stores:
    """Every implementation's copy of the contexts, under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store_dir = root / "ctxstore"
        self.lmdb_dir = root / "lmdb"
        self.reader: PersistentStore | None = None
        self.env: lmdb.Environment | None = None

    def write(self, counts: Iterable[int], rng: np.random.Generator) -> dict[int, dict[str, Array]]:
        contexts = {n: layer_weights(n, rng) for n in counts}
        with PersistentStore(self.store_dir) as writer:
            for n, weights in contexts.items():
                writer.save_context(n, Context(weights=weights, config={"tensors": n}))
        map_size = 2 * sum(weights_nbytes(w) for w in contexts.values()) + (64 << 20)
        env = lmdb.open(str(self.lmdb_dir), map_size=map_size)
        try:
            for n, weights in contexts.items():
                self._write_others(n, weights, env)
        finally:
            env.close()
        os.sync()
        self.reader = PersistentStore(self.store_dir, readonly=True)
        self.open_env()
        return contexts

    def _write_others(self, n: int, weights: dict[str, Array], env: lmdb.Environment) -> None:
        npy_dir = self.root / f"npy-{n}"
        npy_dir.mkdir()
        for name, array in weights.items():
            np.save(npy_dir / f"{name}.npy", array)
        save_file(weights, str(self.root / f"{n}.safetensors"))
        with open(self.root / f"{n}.pickle", "wb") as f:
            pickle.dump(weights, f, protocol=5)
        manifest = [(name, a.dtype.str, a.shape) for name, a in weights.items()]
        with env.begin(write=True) as txn:
            txn.put(f"{n}/manifest".encode(), json.dumps(manifest).encode())
            for i, array in enumerate(weights.values()):
                txn.put(f"{n}/{i}".encode(), array.tobytes())

    def open_env(self) -> None:
        if self.env is not None:
            self.env.close()
        self.env = lmdb.open(str(self.lmdb_dir), readonly=True, create=False)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        if self.env is not None:
            self.env.close()

    def approaches(self, n: int, names: list[str]) -> list[Approach]:
        reader = self.reader
        assert reader is not None
        version = reader.resolve(n)
        index = str(store_layout.index_path(self.store_dir))
        store_files = [
            store_layout.tensor_path_str(str(self.store_dir), n, version, i)
            for i in range(len(names))
        ]
        index_files = tuple(p for p in (index, index + "-wal") if os.path.exists(p))
        npy = [str(self.root / f"npy-{n}" / f"{name}.npy") for name in names]
        st_path = str(self.root / f"{n}.safetensors")
        pickle_path = self.root / f"{n}.pickle"

        def ctxstore_open() -> Loaded:
            return reader.load_context(n).weights

        def np_mmap() -> Loaded:
            return {name: np.load(p, mmap_mode="r") for name, p in zip(names, npy, strict=True)}

        def np_copy() -> Loaded:
            return {name: np.load(p) for name, p in zip(names, npy, strict=True)}

        def st_open() -> Loaded:
            with safe_open(st_path, framework="numpy") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)

        def st_load() -> Loaded:
            loaded: Loaded = load_file(st_path)
            return loaded

        def pickle_load() -> Loaded:
            with open(pickle_path, "rb") as f:
                loaded: Loaded = pickle.load(f)
            return loaded

        def lmdb_open() -> tuple[lmdb.Transaction, Loaded]:
            assert self.env is not None
            txn = self.env.begin(buffers=True)
            manifest = json.loads(bytes(_lmdb_get(txn, f"{n}/manifest")))
            arrays = {
                name: np.frombuffer(_lmdb_get(txn, f"{n}/{i}"), dtype=dtype).reshape(shape)
                for i, (name, dtype, shape) in enumerate(manifest)
            }
            return txn, arrays

        def lmdb_release(loaded: tuple[lmdb.Transaction, Loaded]) -> None:
            txn, arrays = loaded
            del arrays
            txn.abort()

        return [
            Approach(
                CTXSTORE,
                "ctxstore",
                store_files,
                ctxstore_open,
                _values,
                _nothing,
                extra_files=index_files,
            ),
            Approach(NP_MMAP, "alternative", npy, np_mmap, _values, _nothing),
            Approach(NP_COPY, "alternative", npy, np_copy, _values, _nothing),
            Approach(ST_OPEN, "alternative", [st_path], st_open, _values, _nothing),
            Approach(ST_LOAD, "alternative", [st_path], st_load, _values, _nothing),
            Approach(
                LMDB_GET,
                "alternative",
                [str(self.lmdb_dir / "data.mdb")],
                lmdb_open,
                lambda loaded: loaded[1].values(),
                lmdb_release,
                reset=self.open_env,
            ),
            Approach(PICKLE, "alternative", [str(pickle_path)], pickle_load, _values, _nothing),
        ]


def run(ctx: RunContext) -> ScenarioResult:
    counts = QUICK_COUNTS if ctx.quick else FULL_COUNTS
    result = ScenarioResult()
    stores = Stores(ctx.data_dir)
    try:
        contexts = stores.write(counts, np.random.default_rng(ctx.seed))
        ctx.progress.expect(len(counts) * len(CACHE_MODES))
        for n, weights in contexts.items():
            approaches = stores.approaches(n, list(weights))
            size = format_bytes(weights_nbytes(weights))
            for mode in CACHE_MODES:
                result.figures.append(_figure(ctx, n, size, mode, approaches))
    finally:
        stores.close()
        shutil.rmtree(ctx.data_dir, ignore_errors=True)
    result.notes.append(
        f"Tensors: float32, 1-64 KiB each (seeded); contexts of {', '.join(map(str, counts))} "
        "tensors. Warm figures time the open only; each result is released untimed."
    )
    return result


GOALS = {1: AtMost(40_000, "issue 2"), 300: AtMost(1_500_000, "issue 2")}


def _figure(ctx: RunContext, n: int, size: str, mode: str, approaches: list[Approach]) -> Figure:
    title = f"open {n} tensor{'s' if n > 1 else ''} ({size}), {mode} page cache"
    if mode == "cold+read":
        title = f"open {n} tensor{'s' if n > 1 else ''} ({size}) and read every page, cold"
    figure = Figure(
        key=f"open.{mode}.{n}",
        title=title,
        params={"tensors": n, "cache": mode},
        reference=NP_MMAP,
        goal=GOALS.get(n) if mode == "warm" else None,
    )
    residues: dict[str, float] = {}
    candidates = [_candidate(approach, mode, residues) for approach in approaches]
    budget = ctx.budget(1.0, 100) if mode == "warm" else ctx.budget(1.0, 20)
    stats = ctx.compare(f"open {n} {mode}", candidates, budget)
    for approach in approaches:
        figure.add(approach.label, approach.role, stats[approach.label])
    if residues:
        left = {label: share for label, share in residues.items() if share > 0}
        detail = "; ".join(f"{label}: {share:.1%}" for label, share in left.items())
        figure.notes.append(
            "pages still cached right after the drop (mincore, worst repetition): "
            + (detail or "none for every implementation")
            + (f"; {LMDB_RESIDUE}" if LMDB_GET in left else "")
        )
    return figure


def _candidate(approach: Approach, mode: str, residues: dict[str, float]) -> Candidate[Any]:
    if mode == "warm":
        return Candidate(approach.label, approach.open, after=approach.release)

    def cold() -> None:
        if approach.reset is not None:
            approach.reset()
        drop_page_cache([*approach.files, *approach.extra_files])
        fraction = resident_fraction(approach.files)
        if fraction is not None:
            residues[approach.label] = max(fraction, residues.get(approach.label, 0.0))

    if mode == "cold":
        return Candidate(approach.label, approach.open, before=cold, after=approach.release)

    def open_and_read() -> Any:
        loaded = approach.open()
        touch(approach.arrays(loaded))
        return loaded

    return Candidate(approach.label, open_and_read, before=cold, after=approach.release)


SCENARIO = Scenario(
    name="open",
    title="Open a context (warm and cold page cache)",
    method=__doc__ or "",
    run=run,
    plots=(plots.open_latency,),
)
