"""Serving a Hugging Face checkpoint: publish a bf16 checkpoint directory, hot-swap N workers.

The checkpoint (``bench/hfdata.py``) is Llama-shaped with a real config's
shapes (Qwen2.5-0.5B's, as a ``LlamaConfig``): 0.92 GiB of bfloat16 in 4
safetensors shards with ``model.safetensors.index.json``, ``config.json`` and
``generation_config.json``, as ``save_pretrained`` writes it. Every version
changes every tensor, so nothing deduplicates. One real daemon (``ctxstore
daemon``, ``--http off``) serves the store.

Publish: ``ctxstore.client.publish(slot, DIR)`` of a new checkpoint directory
through the daemon (it imports the shards, streaming, into one version and
commits it), beside ``save_pretrained`` of the same model (its files fsynced,
as a commit's are) and beside copying the directory (``shutil.copytree``, each
file and the directory fsynced: the floor). The source directory is in the
page cache for all three.

Hot swap, N = 1, 4, 16 worker processes (``bench/hfworker.py``), each with
torch and transformers imported and a ``LlamaForCausalLM`` built on the
slot's current version with ``ctxstore.readers.torch.build_model`` (no copy):
the time from a new version's commit until every worker serves it in its live
model, and the workers' total CPU for it. ctxstore: the worker waits for the
daemon's announcement and re-points each parameter at the newly mapped tensor
(``swap_weights``); "commit" is the ``committed_at`` of the daemon's announcement
(stamped after the COMMIT, the version's data fsynced before it).
The anchors, on the same workers: each worker reloading with
``LlamaForCausalLM.from_pretrained(DIR)``, and each doing ``safe_open`` (mmap)
on the shards and ``load_state_dict(assign=True)``; their "commit" is the
moment the new directory was complete and fsynced. A variant fleet of N
workers whose Readers hash every version they adopt (the behaviour before
the daemon verified once per host) shows what that costs. Memory: the
workers' total PSS after a swap, beside one copy of the weights plus the N
bare workers (measured before they built the model).

Goals (issue 17): publish <= 1.2x the copy; every N serving within 0.25x the
``from_pretrained`` anchor and 0.5x the ``safe_open`` anchor at the same N;
total reader CPU at N=16 <= 1.5x that at N=1; total PSS <= 1.15x the ideal.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctxstore.client import publish, wait_until_listening
from ctxstore.versiontable import segment_name

from . import hfdata
from .harness import (
    AllOf,
    Candidate,
    FractionAtMost,
    RatioAtMost,
    Role,
    ScenarioResult,
    Stats,
    format_bytes,
)
from .harness import Figure as Fig
from .memory import expect_lines, stop_processes
from .scenario import RunContext, Scenario

REPO = Path(__file__).resolve().parent.parent
SLOT = 1
FULL_WORKERS = (1, 4, 16)
QUICK_WORKERS = (1,)  # the test suite runs every scenario quick: one worker shows the path
FULL_SWAPS, QUICK_SWAPS = 3, 1
START_TIMEOUT_S = 600.0
LOAD_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 30.0

PUB_CTX = "ctxstore publish DIR through the daemon"
PUB_SAVE = "save_pretrained of the same model (+ fsync)"
PUB_COPY = "copy the directory (copytree + fsync)"
SWAP_CTX = "ctxstore: announcement, swap_weights onto the new maps"
SWAP_REHASH = "ctxstore, every Reader re-hashing what it adopts"
SWAP_PRETRAINED = "each worker from_pretrained(DIR)"
SWAP_SAFEOPEN = "each worker safe_open (mmap) + load_state_dict(assign=True)"
CPU_N1 = "ctxstore workers at N=1"
IDEAL = "ideal: one copy + the bare workers"
BARE = "the same workers before building the model (bare)"


@dataclass
class Swaps:
    """Per-version results of one approach on one fleet: seconds until all served, CPU s."""

    latency: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def run(ctx: RunContext) -> ScenarioResult:
    workers = QUICK_WORKERS if ctx.quick else FULL_WORKERS
    result = ScenarioResult()
    ctx.progress.expect(1 + (2 if ctx.quick else 3) * len(workers))
    with Bench(ctx) as bench:
        result.figures.append(bench.publish_figure())
        cpu_by_n: dict[int, Stats] = {}
        for n in workers:
            result.figures += bench.swap_figures(n, cpu_by_n)
        if len(cpu_by_n) > 1:
            result.figures.append(cpu_scaling_figure(cpu_by_n))
        result.notes += bench.notes
    return result


def cpu_scaling_figure(cpu_by_n: dict[int, Stats]) -> Fig:
    first, last = min(cpu_by_n), max(cpu_by_n)
    figure = Fig(
        "hfserve.cpu_scaling",
        f"total worker CPU per swapped version, N={last} against N={first}",
        params={"workers": last},
        reference=CPU_N1.replace("N=1", f"N={first}"),
        goal=RatioAtMost(CPU_N1.replace("N=1", f"N={first}"), 1.5, "issue 17"),
    )
    figure.add(f"ctxstore workers at N={last}", "ctxstore", cpu_by_n[last])
    figure.add(CPU_N1.replace("N=1", f"N={first}"), "variant", cpu_by_n[first])
    return figure


class Bench:
    """The checkpoint source, the store and its daemon, and a counter of versions."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.notes: list[str] = []
        self.config = hfdata.llama_config(hfdata.QUICK_CONFIG if ctx.quick else hfdata.FULL_CONFIG)
        self.swaps = QUICK_SWAPS if ctx.quick else FULL_SWAPS
        self.counter = itertools.count(1)

    def __enter__(self) -> Bench:
        self.store = self.ctx.data_dir / "store"
        self.src = self.ctx.data_dir / "checkpoints"
        self.src.mkdir()
        self.base = hfdata.base_weights(hfdata.tensor_shapes(self.config), self.ctx.seed)
        self.nbytes = sum(a.nbytes for a in self.base.values())
        self.tmp = Path(tempfile.mkdtemp(prefix="ctxhf-"))
        self.sock = self.tmp / "ctx.sock"
        self.log = (self.ctx.data_dir / "daemon.log").open("wb")
        self.daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ctxstore.cli",
                "daemon",
                "--store",
                str(self.store),
                "--socket",
                str(self.sock),
                "--http",
                "off",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_listening(self.sock, 60.0, alive=lambda: self.daemon.poll() is None)
            first = self.checkpoint()
            self.published = publish(SLOT, first, socket=self.sock)
            shutil.rmtree(first)
        except BaseException:
            self.__exit__()
            raise
        self.notes.append(
            f"checkpoint: {len(self.base)} bfloat16 tensors, {format_bytes(self.nbytes)}, "
            f"shapes of {'a tiny Llama' if self.ctx.quick else 'Qwen2.5-0.5B as a Llama'}"
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(OSError):
            os.unlink("/dev/shm" + segment_name(self.store))
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- data -----------------------------------------------------------------------------

    def weights(self) -> dict[str, Any]:
        return hfdata.version_of(self.base, next(self.counter))

    def checkpoint(self) -> Path:
        """A new version's checkpoint directory, written and fsynced (untimed)."""
        directory = self.src / f"v{next(self.counter)}"
        hfdata.write_checkpoint(
            directory, hfdata.version_of(self.base, int(directory.name[1:])), self.config
        )
        return directory

    # -- publish ----------------------------------------------------------------------------

    def publish_figure(self) -> Fig:
        pending: list[Path] = []
        model: list[Any] = []

        def fresh_dir() -> None:
            pending.append(self.checkpoint())

        def fresh_model() -> None:
            model.append(_model_over(self.config, self.weights()))

        def drop(_: object) -> None:
            while pending:
                shutil.rmtree(pending.pop(), ignore_errors=True)
            model.clear()

        def ctxstore_publish() -> int:
            self.published = publish(SLOT, pending[0], socket=self.sock)
            return self.published

        def save() -> None:
            out = self.src / f"saved{next(self.counter)}"
            pending.append(out)
            model[0].save_pretrained(out, max_shard_size=hfdata.SHARD_BYTES)
            hfdata.sync_tree(out)

        def copy() -> None:
            out = self.src / f"copy{next(self.counter)}"
            pending.append(out)
            shutil.copytree(pending[0], out)
            hfdata.sync_tree(out)

        figure = Fig(
            "hfserve.publish",
            f"publish a {format_bytes(self.nbytes)} bf16 checkpoint directory",
            params={"bytes": self.nbytes},
            reference=PUB_COPY,
            goal=RatioAtMost(PUB_COPY, 1.2, "issue 17"),
        )
        budget = self.ctx.budget(30.0, 3, max_reps=6, warmup=1, rewarm=0)
        stats = self.ctx.compare(
            "hf publish",
            [
                Candidate(PUB_CTX, ctxstore_publish, before=fresh_dir, after=drop),
                Candidate(PUB_SAVE, save, before=fresh_model, after=drop),
                Candidate(PUB_COPY, copy, before=fresh_dir, after=drop),
            ],
            budget,
            rounds=min(self.ctx.rounds, 3),
        )
        figure.add(PUB_CTX, "ctxstore", stats[PUB_CTX])
        figure.add(PUB_SAVE, "alternative", stats[PUB_SAVE])
        figure.add(PUB_COPY, "floor", stats[PUB_COPY])
        return figure

    # -- hot swap ---------------------------------------------------------------------------

    def swap_figures(self, n: int, cpu_by_n: dict[int, Stats]) -> list[Fig]:
        results: dict[str, Swaps] = {}
        with Workers(self, n, rehash=False) as fleet:
            self.ctx.progress.step(f"hf swap N={n}: workers up")
            self.swap(fleet, SWAP_CTX)  # every worker now maps a version it swapped to
            pss = fleet.pss()
            bare = sum(fleet.bare)
            approaches = [SWAP_CTX, SWAP_PRETRAINED, SWAP_SAFEOPEN]
            for r in range(self.swaps):
                rotated = approaches[r % 3 :] + approaches[: r % 3]
                for how in rotated:
                    done = self.swap(fleet, how)
                    results.setdefault(how, Swaps()).latency.append(done[0])
                    results[how].cpu.append(done[1])
        if self.ctx.quick:  # quick runs show the path works, not what hashing costs
            return self.figures(n, results, pss, bare, cpu_by_n)
        with Workers(self, n, rehash=True) as fleet:
            self.ctx.progress.step(f"hf swap N={n}: re-hashing workers")
            for _ in range(self.swaps):
                latency, spent = self.swap(fleet, SWAP_REHASH)
                results.setdefault(SWAP_REHASH, Swaps()).latency.append(latency)
                results[SWAP_REHASH].cpu.append(spent)
        return self.figures(n, results, pss, bare, cpu_by_n)

    def figures(
        self, n: int, results: dict[str, Swaps], pss: int, bare: int, cpu_by_n: dict[int, Stats]
    ) -> list[Fig]:
        serving = Fig(
            f"hfserve.swap.{n}",
            f"commit to all {n} workers serving a new {format_bytes(self.nbytes)} version",
            params={"workers": n},
            reference=SWAP_PRETRAINED,
            goal=AllOf(
                (
                    RatioAtMost(SWAP_PRETRAINED, 0.25, "issue 17"),
                    RatioAtMost(SWAP_SAFEOPEN, 0.5, "issue 17"),
                ),
                "issue 17",
            ),
        )
        cpu = Fig(
            f"hfserve.cpu.{n}",
            f"total CPU of {n} workers per swapped version",
            params={"workers": n},
            reference=SWAP_SAFEOPEN,
        )
        roles: tuple[tuple[str, Role], ...] = (
            (SWAP_CTX, "ctxstore"),
            (SWAP_REHASH, "variant"),
            (SWAP_PRETRAINED, "alternative"),
            (SWAP_SAFEOPEN, "alternative"),
        )
        for how, role in roles:
            if how not in results:
                continue
            swaps = results[how]
            serving.add(how, role, Stats.of([s * 1e9 for s in swaps.latency]))
            cpu.add(how, role, Stats.of([s * 1e9 for s in swaps.cpu]))
        cpu_by_n[n] = Stats.of([s * 1e9 for s in results[SWAP_CTX].cpu])
        memory = Fig(
            f"hfserve.pss.{n}",
            f"total PSS of {n} workers serving a {format_bytes(self.nbytes)} model",
            params={"workers": n, "measure": "PSS"},
            reference=IDEAL,
            goal=FractionAtMost(IDEAL, 1.15, "issue 17") if n == max(FULL_WORKERS) else None,
        )
        memory.add("ctxstore workers after a swap", "ctxstore", Stats.single(pss), unit="bytes")
        memory.add(IDEAL, "floor", Stats.single(self.nbytes + bare), unit="bytes")
        memory.add(BARE, "floor", Stats.single(bare), unit="bytes")
        self.ctx.progress.step(f"hf swap N={n}: done")
        return [serving, cpu, memory]

    def swap(self, fleet: Workers, how: str) -> tuple[float, float]:
        """One new version reaches every worker ``how``; returns (seconds until all served,
        total CPU seconds)."""
        directory = self.checkpoint()
        try:
            if how in (SWAP_CTX, SWAP_REHASH):
                version = self.published + 1
                fleet.send(f"ctxstore {version}")
                self.published = publish(SLOT, directory, socket=self.sock)
                if self.published != version:
                    raise RuntimeError(f"published {self.published}, expected {version}")
                start = 0.0  # the announcement's committed_at, from the workers' answers
            else:
                start = time.time()
                fleet.send(
                    ("pretrained " if how == SWAP_PRETRAINED else "safeopen ") + str(directory)
                )
            answers = fleet.expect("served", LOAD_TIMEOUT_S)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        served = max(float(a.split()[0]) for a in answers)
        if how in (SWAP_CTX, SWAP_REHASH):
            start = min(float(a.split()[2]) for a in answers)
        return served - start, sum(float(a.split()[1]) for a in answers)


def _model_over(config: Any, weights: dict[str, Any]) -> Any:
    """A LlamaForCausalLM whose parameters are ``weights`` (bf16 numpy), built on meta."""
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    tensors = {
        name: torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
        for name, array in weights.items()
    }
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    return model


class Workers:
    """N ``bench.hfworker`` processes on the bench's store and daemon."""

    def __init__(self, bench: Bench, n: int, *, rehash: bool) -> None:
        self.bench = bench
        self.n = n
        self.rehash = rehash
        self.procs: list[subprocess.Popen[str]] = []
        self.bare: list[int] = []

    def __enter__(self) -> Workers:
        argv = [
            sys.executable,
            "-m",
            "bench.hfworker",
            str(self.bench.store),
            str(self.bench.sock),
            str(SLOT),
            *(["--rehash"] if self.rehash else []),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        try:
            for _ in range(self.n):
                self.procs.append(
                    subprocess.Popen(
                        argv,
                        cwd=REPO,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                        env=env,
                    )
                )
            self.bare = [int(b) for b in self.expect("ready", START_TIMEOUT_S)]
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        stop_processes(self.procs)

    def send(self, line: str) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(line + "\n")
            proc.stdin.flush()

    def pss(self) -> int:
        self.send("pss")
        return sum(int(x) for x in self.expect("pss", LOAD_TIMEOUT_S))

    def expect(self, word: str, timeout: float) -> list[str]:
        return expect_lines(self.procs, word, timeout, "workers")


SCENARIO = Scenario(
    name="hfserve",
    title="Serving a Hugging Face checkpoint: publish and hot swap to N workers",
    method=__doc__ or "",
    run=run,
)
