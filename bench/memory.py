"""Memory: N readers of one context (N = 1, 8, 32; 256 MiB), as the kernel counts it.

A 256 MiB context (16 float32 tensors of 16 MiB) is committed to a store; a
real daemon (``ctxstore daemon``, ``--http off``) serves it. Each reader is a
process (``bench/peers.py memory``) that imports ``ctxstore.readers``, opens a
connected ``Reader``, and then holds the context one of three ways, reading
one byte of every page so that all of it is resident in the process:

* ctxstore: ``Reader.get(slot)``, read-only arrays over the store's mmapped
  files, the page cache shared by every reader;
* private copies: ``np.load`` of each tensor's .npy file, no mmap (each
  process reads the bytes into its own memory, as a worker without ctxstore
  does);
* ``multiprocessing.shared_memory``: one segment holding the same bytes,
  written once by this process; each reader attaches it and maps it whole.

The N readers of one approach run at the same time. Memory is read with
psutil ``memory_full_info`` (``/proc/<pid>/smaps_rollup``) of every reader
process, once before it loads anything (the bare reader: interpreter, numpy,
ctxstore, SQLite, socket thread) and once after every reader has touched
everything; the figures are sums over the N processes. PSS divides each shared
page among the processes that map it, so a fleet's total PSS is what it
really costs; USS counts only pages a process maps alone.

Goal (issue 3): 32 readers' total PSS <= 1.15 x (256 MiB + 32 x one bare
reader's PSS). "One bare reader's PSS" is measured in the same processes just
before they map the context (so it shares libraries with the same 31 others);
the ideal row is one copy of the context plus those N bare readers.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import IO

import numpy as np
import psutil

from ctxstore import Context
from ctxstore.client import wait_until_listening
from ctxstore.store import PersistentStore
from ctxstore.versiontable import segment_name

from . import plots
from .data import MIB
from .harness import Figure, FractionAtMost, Role, ScenarioResult, Stats, format_bytes
from .scenario import RunContext, Scenario

REPO = Path(__file__).resolve().parent.parent
FULL_READERS = (1, 8, 32)
QUICK_READERS = (1, 4)
FULL_TENSORS, FULL_TENSOR_BYTES = 16, 16 * MIB
QUICK_TENSORS, QUICK_TENSOR_BYTES = 4, 4 * MIB
SLOT = 1
START_TIMEOUT_S = 240.0
LOAD_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 20.0
GOAL_FACTOR = 1.15

CTXSTORE = "ctxstore Reader.get(), mmapped, shared page cache"
PRIVATE = "private copies (np.load, no mmap)"
SHM = "multiprocessing.shared_memory, one segment"
BARE = "the same readers before loading (bare)"
IDEAL = "ideal: one copy + the bare readers"
APPROACHES = {"ctxstore": CTXSTORE, "private": PRIVATE, "shm": SHM}


@dataclass(frozen=True, slots=True)
class Totals:
    """Sums over N reader processes, bytes."""

    pss: int
    uss: int


@dataclass(frozen=True, slots=True)
class Outcome:
    bare: Totals
    loaded: Totals


def run(ctx: RunContext) -> ScenarioResult:
    readers = QUICK_READERS if ctx.quick else FULL_READERS
    tensors, tensor_bytes = (
        (QUICK_TENSORS, QUICK_TENSOR_BYTES) if ctx.quick else (FULL_TENSORS, FULL_TENSOR_BYTES)
    )
    nbytes = tensors * tensor_bytes
    result = ScenarioResult()
    ctx.progress.expect(len(readers) * len(APPROACHES))
    with Fleet(ctx, tensors, tensor_bytes) as fleet:
        for i, n in enumerate(readers):
            names = list(APPROACHES)
            order = names[i % len(names) :] + names[: i % len(names)]
            outcomes: dict[str, Outcome] = {}
            for how in order:
                ctx.progress.step(f"memory N={n}: {how}")
                outcomes[how] = fleet.measure(how, n)
            result.figures += figures(n, nbytes, outcomes, goal=n == readers[-1])
    result.notes.append(
        f"context: {tensors} float32 tensors of {format_bytes(tensor_bytes)} "
        f"({format_bytes(nbytes)}); the approaches run in a rotated order for each N"
    )
    return result


def figures(n: int, nbytes: int, outcomes: dict[str, Outcome], *, goal: bool) -> list[Figure]:
    bare = outcomes["ctxstore"].bare
    pss = Figure(
        f"memory.pss.{n}",
        f"total PSS of {n} readers of a {format_bytes(nbytes)} context",
        params={"readers": n, "measure": "PSS", "bytes": nbytes},
        reference=IDEAL,
        goal=FractionAtMost(IDEAL, GOAL_FACTOR, f"issue 3 (32 readers of 256 MiB; here {n})")
        if goal
        else None,
    )
    uss = Figure(
        f"memory.uss.{n}",
        f"total USS of {n} readers of a {format_bytes(nbytes)} context",
        params={"readers": n, "measure": "USS", "bytes": nbytes},
        reference=BARE,
    )
    for how, label in APPROACHES.items():
        role: Role = "ctxstore" if how == "ctxstore" else "alternative"
        loaded = outcomes[how].loaded
        pss.add(label, role, Stats.single(loaded.pss), unit="bytes")
        uss.add(label, role, Stats.single(loaded.uss), unit="bytes")
    pss.add(IDEAL, "floor", Stats.single(nbytes + bare.pss), unit="bytes")
    pss.add(BARE, "floor", Stats.single(bare.pss), unit="bytes")
    uss.add(BARE, "floor", Stats.single(bare.uss), unit="bytes")
    pss.notes.append(
        f"one bare reader: {format_bytes(bare.pss / n)} PSS, {format_bytes(bare.uss / n)} USS "
        f"(mean of the {n} ctxstore readers before they mapped the context)"
    )
    extra = outcomes["ctxstore"].loaded.pss - bare.pss
    pss.notes.append(
        f"ctxstore readers added {format_bytes(extra)} of PSS by mapping the context: "
        f"{extra / nbytes:.3f}x one copy"
    )
    return [pss, uss]


class Fleet:
    """The store, its daemon, the shared-memory segment, and the reader processes of a phase."""

    def __init__(self, ctx: RunContext, tensors: int, tensor_bytes: int) -> None:
        self.ctx = ctx
        self.tensors = tensors
        self.tensor_bytes = tensor_bytes
        self.children: list[subprocess.Popen[str]] = []

    def __enter__(self) -> Fleet:
        self.store = self.ctx.data_dir / "store"
        rng = np.random.default_rng(self.ctx.seed)
        weights = {
            f"layers.{i}.weight": rng.standard_normal(self.tensor_bytes // 4, dtype=np.float32)
            for i in range(self.tensors)
        }
        with PersistentStore(self.store) as writer:
            version = writer.save_context(SLOT, Context(weights))
        self.version_dir = self.store / "slots" / str(SLOT) / str(version)
        self.segment = shared_memory.SharedMemory(
            create=True, size=self.tensors * self.tensor_bytes
        )
        try:
            buffer = np.ndarray((self.segment.size,), dtype=np.uint8, buffer=self.segment.buf)
            offset = 0
            for array in weights.values():
                buffer[offset : offset + array.nbytes] = array.view(np.uint8)
                offset += array.nbytes
            del buffer, weights
            self.segment.close()  # this process keeps no mapping: only the readers map it
            self.tmp = Path(tempfile.mkdtemp(prefix="ctxmem-"))
            self.sock = self.tmp / "ctx.sock"
            self.log = (self.ctx.data_dir / "daemon.log").open("wb")
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "ctxstore.cli", "daemon", "--store", str(self.store),
                 "--socket", str(self.sock), "--http", "off"],
                stdout=self.log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            wait_until_listening(self.sock, 60.0, alive=lambda: self.daemon.poll() is None)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        stop_processes(self.children)
        daemon = getattr(self, "daemon", None)
        if daemon is not None and daemon.poll() is None:
            daemon.terminate()  # a clean stop removes its socket and version table
            try:
                daemon.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(OSError):
            os.unlink("/dev/shm" + segment_name(self.store))
        if hasattr(self, "log"):
            self.log.close()
        if hasattr(self, "tmp"):
            shutil.rmtree(self.tmp, ignore_errors=True)
        segment = getattr(self, "segment", None)
        if segment is not None:
            segment.close()
            segment.unlink()

    def measure(self, how: str, n: int) -> Outcome:
        """Start N readers, measure them bare, let them load ``how``, measure again, stop them."""
        args = [how, str(self.store), str(self.sock), str(SLOT), str(self.version_dir),
                self.segment.name]  # fmt: skip
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.peers", "memory", *args],
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(n)
        ]
        self.children = procs
        try:
            expect_lines(procs, "bare", START_TIMEOUT_S)
            bare = _totals(procs)
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("load\n")
                proc.stdin.flush()
            loaded_bytes = expect_lines(procs, "loaded", LOAD_TIMEOUT_S)
            expected = self.tensors * self.tensor_bytes
            if any(int(b) != expected for b in loaded_bytes):
                raise RuntimeError(f"{how}: readers touched {loaded_bytes}, expected {expected}")
            loaded = _totals(procs)
        finally:
            stop_processes(procs)
            self.children = []
        return Outcome(bare, loaded)


def expect_lines(
    procs: Sequence[subprocess.Popen[str]], word: str, timeout: float, who: str = "memory readers"
) -> list[str]:
    """Wait until every process printed a line starting with ``word``; returns the rest of each."""
    deadline = time.monotonic() + timeout
    rest: dict[int, str] = {}
    streams: dict[IO[str], int] = {}
    for i, proc in enumerate(procs):
        assert proc.stdout is not None
        streams[proc.stdout] = i
    while len(rest) < len(procs):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{len(procs) - len(rest)} {who} never said {word!r}")
        waiting = [s for s, i in streams.items() if i not in rest]
        ready, _, _ = select.select(waiting, [], [], left)
        for stream in ready:
            line = stream.readline()
            if not line.startswith(word):
                raise RuntimeError(f"one of the {who} said {line!r} instead of {word!r}")
            rest[streams[stream]] = line[len(word) :].strip()
    return [rest[i] for i in range(len(procs))]


def _totals(procs: Sequence[subprocess.Popen[str]]) -> Totals:
    infos = [psutil.Process(p.pid).memory_full_info() for p in procs]
    return Totals(pss=sum(int(i.pss) for i in infos), uss=sum(int(i.uss) for i in infos))


def stop_processes(procs: Sequence[subprocess.Popen[str]]) -> None:
    """Close each child's stdin (its signal to exit), wait for it (kill past the timeout)."""
    for proc in procs:
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
    for proc in procs:
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
        if proc.stdout is not None:
            proc.stdout.close()


SCENARIO = Scenario(
    name="memory",
    title="Memory: total PSS and USS of N readers of one context",
    method=__doc__ or "",
    run=run,
    plots=(plots.memory_pss,),
)
