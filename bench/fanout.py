"""Fan-out: from commit to all N readers notified, and to all N acknowledged (N = 1, 4, 16, 64).

One real daemon (``ctxstore daemon``, ``--http off``) and N reader processes,
each a ``ctxstore.readers.Reader``. This process publishes versions of a
4-tensor, 64 KiB context with ``ctxstore.client.publish``, one at a time: the
next one once every reader has it (and, when they follow the slot, has
acknowledged it and run its callback), after a random 3-10 ms pause. Each
stage publishes 5 warm-up versions, then measures 200, or stops at 10 s once
it has 100 (a saturated machine commits slowly: 64 processes polling SQLite
every millisecond take both cores). The same reader processes run two stages:

1. subscribed only: ``subscribe(slot, callback)`` and nothing else, so an
   announcement costs a reader no more than decoding it and calling back;
2. following (the ctxstore figures): the reader has also ``get()`` the slot,
   as an inference worker does, so on each announcement it maps the new
   version (checksums verified), adopts it, acknowledges it to the daemon,
   then runs the callback.

What is measured, per version, from the same clock in every process
(``time.time()``, see ``bench/peers.py``):

* commit: when the store's SQLite COMMIT returned in the daemon (a probe at the
  ``committed`` crash point, right after it). The version's verified record
  went in with that COMMIT; the daemon then bumps the version table and hands
  the announcement to its event loop, from the commit thread; warming and
  retention follow it (issue 21).
* notified: the last of the N readers decoded the announcement (the frame
  handed to ``Reader.message_received``, stamped first thing there).
* acknowledged: the daemon's ``Fleet.ack`` received the last reader's ack (a
  probe in the daemon): the version is mapped, adopted and acked by all.
* visible (variant, issue 21): the daemon wrote the version to the
  shared-memory version table (a probe on ``VersionTableWriter.set``): from
  then on every reader's ``get()`` returns it (mapping it first if its
  announcement has not been adopted yet).
* callback (variant): the last reader's ``subscribe()`` callback ran; for a
  followed slot the reader maps and acks before it calls back.

Floor, same run: this process as a bare server writing an 8-byte frame to N
connected client processes (``socket.send`` in a loop; Python, like the
daemon), each blocked in ``recv``, stamping on receipt and sending the 8 bytes
back; "acknowledged" is when the server has read all N answers.
Alternatives, same run and same daemon commits: N processes polling
``SELECT current_version`` on the store's SQLite index (read-only
connection) with a 1 ms and a 10 ms sleep between polls.

Readers' CPU: the scheduler's account of the N reader processes (every
thread, ns resolution) over a stage (its warm-up versions included), per
second of the stage's wall time: what keeping up costs each approach at this
publication rate (the notes say how many versions a second that was, and the
CPU of the daemon and of each reader per version published). Approaches run
in a rotated order for each N. Goals (issue 3): N=16 p99 <= 1 ms, N=64 p99 <=
3 ms, and p50 within 1.3x of the floor, judged on notified and acknowledged
alike.

CPU floors, same run (issue 21's CPU goals: the daemon <= 1 ms per version at
N=16, a following reader <= 80 us; ``bench/floors.py``). Each N's notes set
each goal beside the bare work under it on this machine:

* durable-commit floor, measured once before the first N: the CPU of
  committing this same version the bare way (a new directory, its .npy files
  created with O_EXCL and fsynced, the directory and its parent fsynced, one
  SQLite COMMIT with the store's settings, WAL and synchronous=FULL, the
  version 3 back removed), in a child process that counts only its commits,
  with the same 3-10 ms pauses between them; two kinds alternate: all 4 files
  written, and (as the store commits this version) the changed tensor written
  and the 3 others hard-linked. Beside the daemon's CPU per version.
* the bare fan-out server's CPU per version (this process's thread clock
  around each version: N sends, N answers read, its selector's waits and its
  stamps), also beside the daemon's.
* each floor client's CPU per version (recv 8 bytes, stamp, send 8 bytes
  back), beside a following reader's.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import psutil

from ctxstore import Context
from ctxstore.client import publish, wait_until_listening
from ctxstore.versiontable import segment_name

from . import floors, plots
from .harness import (
    AllOf,
    AtMost,
    Figure,
    Goal,
    RatioAtMost,
    Role,
    ScenarioResult,
    Stats,
    format_ns,
)
from .peers import (
    ACKED,
    ANNOUNCE_END,
    ANNOUNCE_START,
    CALLBACK,
    COMMIT,
    CONTROL,
    FOLLOWING,
    READY,
    RECEIVED,
    STOP,
    VISIBLE,
    Stamps,
)
from .scenario import RunContext, Scenario

REPO = Path(__file__).resolve().parent.parent
FULL_READERS = (1, 4, 16, 64)
QUICK_READERS = (1, 4)
#: measured versions per stage: up to FULL_VERSIONS, fewer (not under MIN) past the stage budget
FULL_VERSIONS, FULL_MIN_VERSIONS, FULL_STAGE_BUDGET_S = 200, 100, 10.0
QUICK_VERSIONS, QUICK_MIN_VERSIONS, QUICK_STAGE_BUDGET_S = 8, 8, 1.0
FULL_WARMUP = 5
QUICK_WARMUP = 2
GAP_S = (0.003, 0.010)
VERSION_TIMEOUT_S = 3.0
START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 20.0
TENSORS, TENSOR_BYTES = 4, 16 << 10
#: p99 goals of issue 3 by N
P99_GOALS_NS = {16: 1e6, 64: 3e6}
FLOOR_FACTOR = 1.3
#: issue 21's CPU goals: the daemon's per version at DAEMON_CPU_GOAL_N, a following reader's
DAEMON_CPU_GOAL_S, DAEMON_CPU_GOAL_N, READER_CPU_GOAL_S = 1e-3, 16, 80e-6
#: bare durable commits of each kind measured for the commit floor (bench.floors)
FULL_FLOOR_COMMITS, QUICK_FLOOR_COMMITS = 150, 10

CTX_NOTIFIED = "ctxstore: every Reader received the announcement"
CTX_CALLBACK = "ctxstore: every subscribe() callback ran (mapped + acked first)"
CTX_ACKED = "ctxstore: the daemon received every reader's ack"
CTX_SUBSCRIBED = "ctxstore: subscribe()-only Readers received it (nothing mapped or acked)"
CTX_VISIBLE = "ctxstore: version table bumped (every reader's get() returns it)"
CTX_CPU = "ctxstore Readers following the slot"
CTX_SUBSCRIBED_CPU = "ctxstore Readers subscribed only (callback, no get())"
FLOOR_NOTIFIED = "floor: bare Unix-socket fan-out (8-byte frame)"
FLOOR_ACKED = "floor: bare fan-out + 8-byte answer read back"
FLOOR_CPU = "floor clients (recv + answer)"
POLL = {0.001: "SQLite polling every 1 ms", 0.010: "SQLite polling every 10 ms"}


def goal_for(readers: int, floor: str) -> Goal:
    ratio = RatioAtMost(floor, FLOOR_FACTOR, "issue 3")
    limit = P99_GOALS_NS.get(readers)
    if limit is None:
        return ratio
    return AllOf((AtMost(limit, "issue 3", stat="p99"), ratio), "issue 3")


@dataclass
class Phase:
    """One approach with N readers: per-version latencies (ns) and the readers' CPU."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    cpu_ns_per_s: float = 0.0
    versions_per_s: float = 0.0
    #: CPU seconds per published version: of each reader, and of the daemon or bare server
    reader_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    missing: int = 0
    notes: list[str] = field(default_factory=list)


def run(ctx: RunContext) -> ScenarioResult:
    readers = QUICK_READERS if ctx.quick else FULL_READERS
    result = ScenarioResult()
    skew_before = time.time() - time.monotonic()
    ctx.progress.expect(1 + len(readers) * (2 + len(POLL)))
    with Bench(ctx) as bench:
        ctx.progress.step("fan-out: durable-commit floor")
        commit_floor = bench.commit_floor()
        for i, n in enumerate(readers):
            phases: list[tuple[str, Callable[[int], dict[str, Phase]]]] = [
                ("ctxstore", bench.ctxstore),
                ("floor", lambda n: {"floor": bench.floor(n)}),
                *((POLL[s], _poll_phase(bench, s)) for s in POLL),
            ]
            done: dict[str, Phase] = {}
            for name, measure in phases[i % len(phases) :] + phases[: i % len(phases)]:
                ctx.progress.step(f"fan-out N={n}: {name}")
                done.update(measure(n))
            result.figures += figures(n, done, commit_floor)
        result.notes.append(floors.describe_commit_floor(commit_floor, TENSORS, _format_s))
        result.notes += bench.notes
    skew = (time.time() - time.monotonic()) - skew_before
    if abs(skew) > 1e-3:
        result.notes.append(
            f"the wall clock moved {skew * 1e3:+.1f} ms against CLOCK_MONOTONIC during the "
            "scenario (a clock step): cross-process latencies may be off by as much"
        )
    return result


def _poll_phase(bench: Bench, interval: float) -> Callable[[int], dict[str, Phase]]:
    return lambda n: {POLL[interval]: bench.polling(n, interval)}


# -- figures -----------------------------------------------------------------------------------


def figures(
    n: int, phases: dict[str, Phase], commit_floor: dict[str, floors.CommitCpu]
) -> list[Figure]:
    ours, subscribed, floor = phases["ctxstore"], phases["subscribed"], phases["floor"]
    notified = Figure(
        f"fanout.notified.{n}",
        f"commit to all {n} readers notified",
        params={"readers": n, "event": "notified"},
        goal=goal_for(n, FLOOR_NOTIFIED),
        reference=FLOOR_NOTIFIED,
    )
    _add(notified, CTX_NOTIFIED, "ctxstore", ours, "notified")
    _add(notified, CTX_CALLBACK, "variant", ours, "callback")
    _add(notified, CTX_SUBSCRIBED, "variant", subscribed, "notified")
    _add(notified, CTX_VISIBLE, "variant", ours, "visible")
    _add(notified, FLOOR_NOTIFIED, "floor", floor, "notified")
    for label in POLL.values():
        _add(notified, label, "alternative", phases[label], "notified")
    notified.notes += ours.notes + subscribed.notes + floor.notes
    for label in POLL.values():
        notified.notes += phases[label].notes
    notified.notes.append(cpu_goals_note(n, ours, floor, commit_floor))
    acked = Figure(
        f"fanout.acked.{n}",
        f"commit to all {n} readers acknowledged",
        params={"readers": n, "event": "acked"},
        goal=goal_for(n, FLOOR_ACKED),
        reference=FLOOR_ACKED,
    )
    _add(acked, CTX_ACKED, "ctxstore", ours, "acked")
    _add(acked, FLOOR_ACKED, "floor", floor, "acked")
    cpu = Figure(
        f"fanout.cpu.{n}",
        f"CPU time of the {n} readers per second of wall time",
        params={"readers": n, "event": "cpu"},
        reference=FLOOR_CPU,
    )
    entries: list[tuple[str, Role, Phase]] = [
        (CTX_CPU, "ctxstore", ours),
        (CTX_SUBSCRIBED_CPU, "variant", subscribed),
        (FLOOR_CPU, "floor", floor),
    ]
    entries += [(label, "alternative", phases[label]) for label in POLL.values()]
    for label, role, phase in entries:
        cpu.add(
            label,
            role,
            Stats.single(phase.cpu_ns_per_s),
            note=f"{phase.cpu_ns_per_s / 1e7:.1f}% of one core, "
            f"{phase.versions_per_s:.0f} versions/s",
        )
    return [notified, acked, cpu]


def _add(figure: Figure, label: str, role: Role, phase: Phase, what: str) -> None:
    samples = phase.latencies.get(what)
    if samples:
        figure.add(label, role, Stats.of(samples))


def cpu_goals_note(
    n: int, ours: Phase, floor: Phase, commit_floor: dict[str, floors.CommitCpu]
) -> str:
    """Issue 21's two CPU goals, each beside what this machine's bare work costs."""
    linked, written = commit_floor[floors.ONE_WRITTEN], commit_floor[floors.ALL_WRITTEN]
    return (
        f"N={n}, issue 21's CPU goals beside this machine's floors: the daemon "
        f"{_format_s(ours.server_cpu_s)} a version (goal <= {_format_s(DAEMON_CPU_GOAL_S)} "
        f"at N={DAEMON_CPU_GOAL_N}; a bare durable commit of this version (an old one retired) "
        f"{_format_s(linked.per_commit_s)} with the unchanged tensors hard-linked, "
        f"{_format_s(written.per_commit_s)} with all written; the bare fan-out server "
        f"{_format_s(floor.server_cpu_s)}); each following reader "
        f"{_format_s(ours.reader_cpu_s)} a version (goal <= {_format_s(READER_CPU_GOAL_S)}; "
        f"a bare floor client {_format_s(floor.reader_cpu_s)})"
    )


def _format_s(seconds: float) -> str:
    return format_ns(seconds * 1e9)


# -- the run -----------------------------------------------------------------------------------


class Bench:
    """The probed daemon, a temporary directory for sockets and stamps, and every child process."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.versions = QUICK_VERSIONS if ctx.quick else FULL_VERSIONS
        self.min_versions = QUICK_MIN_VERSIONS if ctx.quick else FULL_MIN_VERSIONS
        self.stage_budget_s = QUICK_STAGE_BUDGET_S if ctx.quick else FULL_STAGE_BUDGET_S
        self.warmup = QUICK_WARMUP if ctx.quick else FULL_WARMUP
        self.notes: list[str] = []
        self.children: list[subprocess.Popen[bytes]] = []
        self.rng = random.Random(ctx.seed)
        self.weights = {
            f"layers.{i}.weight": np.random.default_rng(ctx.seed + i).standard_normal(
                TENSOR_BYTES // 4, dtype=np.float32
            )
            for i in range(TENSORS)
        }
        self._slots = iter(range(1, 1_000_000))

    def commit_floor(self) -> dict[str, floors.CommitCpu]:
        """The durable-commit floor (``bench.floors``), on the store's filesystem."""
        return floors.measure_commit_floor(
            floors.FloorRun(
                self.ctx.data_dir / "commit-floor",
                QUICK_FLOOR_COMMITS if self.ctx.quick else FULL_FLOOR_COMMITS,
                seed=self.ctx.seed,
                gap_s=GAP_S,
                tensors=TENSORS,
                tensor_bytes=TENSOR_BYTES,
            )
        )

    def next_slot(self) -> int:
        """A slot no phase has used yet (each phase publishes to its own)."""
        return next(self._slots)

    def __enter__(self) -> Bench:
        shm = Path("/dev/shm")
        self.tmp = Path(tempfile.mkdtemp(prefix="ctxfan-", dir=shm if shm.is_dir() else None))
        self.store = self.ctx.data_dir / "store"
        self.sock = self.tmp / "ctx.sock"
        self.log = (self.ctx.data_dir / "daemon.log").open("wb")
        self.daemon = self.spawn(
            ["daemon", str(self.store), str(self.sock), str(self.tmp)], stdout=self.log
        )
        try:
            wait_until_listening(self.sock, 60.0, alive=lambda: self.daemon.poll() is None)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for child in self.children:
            if child is not self.daemon and child.poll() is None:
                child.kill()
        if self.daemon.poll() is None:
            self.daemon.terminate()  # a clean stop removes its socket and version table
            try:
                self.daemon.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
        with contextlib.suppress(OSError):
            os.unlink("/dev/shm" + segment_name(self.store))
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(STOP_TIMEOUT_S)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def spawn(
        self,
        args: Sequence[str],
        *,
        stdin: int | None = None,
        stdout: int | IO[bytes] | None = None,
    ) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.peers", *args],
            cwd=REPO,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if stdout is not None else None,
        )
        self.children.append(child)
        return child

    # -- phases ------------------------------------------------------------------------------

    def stamps_for(self, slot: int, readers: int, *, stages: int = 1, extra: int = 0) -> Stamps:
        """A stamps grid for ``stages`` stages of this run's size, plus ``extra`` versions."""
        versions = 2 + stages * (self.warmup + self.versions) + extra
        return Stamps.create(self.tmp / f"{slot}.stamps", readers, versions)

    def publish(self, slot: int, k: int) -> int:
        weights = dict(self.weights)
        first = next(iter(weights))
        weights[first] = weights[first].copy()
        weights[first][0] = k  # a new tensor per version; the others are hard-linked
        return publish(slot, Context(weights), socket=self.sock, timeout=60.0)

    def ctxstore(self, n: int) -> dict[str, Phase]:
        """N Readers: first subscribed only, then (same processes) following the slot."""
        slot = self.next_slot()
        stamps = self.stamps_for(slot, n, stages=2)
        self.publish(slot, 1)
        procs = [
            self.spawn(
                ["reader", str(self.store), str(self.sock), str(slot), str(i), str(stamps.path)],
                stdin=subprocess.PIPE,
            )
            for i in range(n)
        ]

        def heard(k: int) -> bool:
            return stamps.count(RECEIVED, k) == n and stamps.count(CALLBACK, k) == n

        def acked(k: int) -> bool:
            return stamps.count(ACKED, k) == n and stamps.count(CALLBACK, k) == n

        try:
            self.wait_flag(stamps, procs, READY)
            with _cpu(procs) as cpu_a:
                stage_a = self._publish_versions(slot, 2, heard)
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(b"follow\n")
                proc.stdin.flush()
            self.wait_flag(stamps, procs, FOLLOWING)
            with _cpu(procs) as cpu_b, _cpu([self.daemon]) as daemon_cpu:
                stage_b = self._publish_versions(slot, stage_a.next, acked)
        finally:
            for proc in procs:
                if proc.stdin is not None:
                    with contextlib.suppress(OSError):
                        proc.stdin.close()
            reap(procs)
        subscribed = phase_of(stamps, stage_a, cpu_a.seconds, ("notified", RECEIVED))
        following = phase_of(
            stamps,
            stage_b,
            cpu_b.seconds,
            ("notified", RECEIVED),
            ("callback", CALLBACK),
            ("acked", ACKED),
        )
        following.latencies["visible"] = _visible(stamps, stage_b.measured)
        following.server_cpu_s = daemon_cpu.seconds / stage_b.published
        following.notes += _breakdown(stamps, stage_b.measured, n)
        following.notes.append(
            f"N={n}: the daemon used {_format_s(following.server_cpu_s)} of CPU per version "
            "(publish request, commit, announce, acks, heartbeats); each reader "
            f"{_format_s(following.reader_cpu_s)} (decode, map, adopt, ack, callback); "
            f"subscribed only, each reader {_format_s(subscribed.reader_cpu_s)} "
            "(decode, callback)"
        )
        _note_missing(subscribed, f"N={n} ctxstore subscribed only")
        _note_missing(following, f"N={n} ctxstore following")
        stamps.close()
        return {"ctxstore": following, "subscribed": subscribed}

    def polling(self, n: int, interval: float) -> Phase:
        slot = self.next_slot()
        stamps = self.stamps_for(slot, n)
        self.publish(slot, 1)
        db = str(self.store / "index.db")
        procs = [
            self.spawn(["poller", db, str(slot), str(i), str(interval), str(stamps.path)])
            for i in range(n)
        ]
        try:
            self.wait_flag(stamps, procs, READY)
            with _cpu(procs) as readers_cpu:
                stage = self._publish_versions(slot, 2, lambda k: stamps.count(RECEIVED, k) == n)
        finally:
            stamps.put(CONTROL, 0, STOP, 1.0)
            reap(procs)
        phase = phase_of(stamps, stage, readers_cpu.seconds, ("notified", RECEIVED))
        _note_missing(phase, f"N={n} {POLL[interval]}")
        stamps.close()
        return phase

    def floor(self, n: int) -> Phase:
        slot = self.next_slot()  # only names the stamps file
        stamps = self.stamps_for(slot, n)
        path = self.tmp / f"floor-{slot}.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(path))
            server.listen(n)
            server.settimeout(START_TIMEOUT_S)
            procs = [
                self.spawn(["floor-client", str(path), str(i), str(stamps.path)]) for i in range(n)
            ]
            conns: list[tuple[socket.socket, int]] = []
            try:
                for _ in range(n):
                    conn, _addr = server.accept()
                    conn.settimeout(START_TIMEOUT_S)
                    conns.append((conn, int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "little")))
                with _cpu(procs) as readers_cpu:
                    stage, server_cpu_s = self._floor_versions(stamps, conns)
            finally:
                for conn, _index in conns:
                    conn.close()
                reap(procs)
        phase = phase_of(
            stamps, stage, readers_cpu.seconds, ("notified", RECEIVED), ("acked", ACKED)
        )
        _note_missing(phase, f"N={n} floor")
        phase.server_cpu_s = server_cpu_s / stage.published
        sends = [stamps.get(ANNOUNCE_END, 0, k) - stamps.get(COMMIT, 0, k) for k in stage.measured]
        phase.notes.append(
            f"N={n} floor: the server's {n} sends take {format_ns(statistics.median(sends) * 1e9)}"
            f" (p50); the bare server spends {_format_s(phase.server_cpu_s)} of CPU per version "
            f"({n} sends, {n} answers read, its selector's waits and its stamps: its own "
            f"thread's CPU clock); each floor client {_format_s(phase.reader_cpu_s)} (recv 8 "
            "bytes, stamp, send 8 bytes back)"
        )
        stamps.close()
        return phase

    # -- helpers -----------------------------------------------------------------------------

    def wait_flag(self, stamps: Stamps, procs: list[subprocess.Popen[bytes]], flag: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while stamps.count(CONTROL, flag) < len(procs):
            dead = [p.pid for p in procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"fan-out child processes {dead} exited while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"fan-out readers not ready after {START_TIMEOUT_S:g} s")
            time.sleep(0.01)

    def versions_until(
        self, first: int, send: Callable[[int], bool], *, min_seconds: float = 0.0
    ) -> Stage:
        """Warm-up, then measured versions from ``first`` until enough or the stage's time is up.

        ``send(k)`` publishes version k and waits until it arrived; False if it timed out.
        With ``min_seconds`` the stage goes on for at least that long, however many versions.
        """
        stage = Stage(measured=[], next=first)
        began = time.perf_counter()
        for _ in range(self.warmup):
            send(stage.next)
            stage.next += 1
            time.sleep(self.rng.uniform(*GAP_S))
        started = time.perf_counter()
        while True:
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds and (
                stage.count >= self.versions
                or (stage.count >= self.min_versions and elapsed > self.stage_budget_s)
            ):
                break
            if not send(stage.next):
                stage.missing += 1
            stage.measured.append(stage.next)
            stage.next += 1
            time.sleep(self.rng.uniform(*GAP_S))
        stage.wall_s = time.perf_counter() - started
        stage.span_s = time.perf_counter() - began
        stage.published = stage.next - first
        return stage

    def _publish_versions(self, slot: int, first: int, done: Callable[[int], bool]) -> Stage:
        def send(k: int) -> bool:
            version = self.publish(slot, k)
            if version != k:
                raise RuntimeError(f"slot {slot}: published version {version}, expected {k}")
            return wait_until(functools.partial(done, k), VERSION_TIMEOUT_S)

        return self.versions_until(first, send)

    def _floor_versions(
        self, stamps: Stamps, conns: list[tuple[socket.socket, int]]
    ) -> tuple[Stage, float]:
        """The floor's stage, and the CPU seconds this thread spent serving its versions
        (each send and its answers, not the pauses between versions)."""
        cpu_s = 0.0
        with selectors.DefaultSelector() as sel:
            for conn, index in conns:
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, index)

            def send(k: int) -> bool:
                nonlocal cpu_s
                began = time.thread_time()
                frame = k.to_bytes(8, "little")
                stamps.put(COMMIT, 0, k, time.time())
                for conn, _index in conns:
                    conn.send(frame)
                stamps.put(ANNOUNCE_END, 0, k, time.time())
                answered = _read_answers(sel, stamps, k, len(conns))
                cpu_s += time.thread_time() - began
                return answered

            stage = self.versions_until(2, send)
        return stage, cpu_s


@dataclass
class Stage:
    """The versions one stage published and measured."""

    measured: list[int]
    next: int
    #: the measured versions' time
    wall_s: float = 0.0
    #: warm-up included, as the CPU windows around a stage are, and the versions in it
    span_s: float = 0.0
    published: int = 0
    missing: int = 0

    @property
    def count(self) -> int:
        return len(self.measured)


def phase_of(
    stamps: Stamps,
    stage: Stage,
    cpu_s: float,
    *events: tuple[str, int],
    readers: Sequence[int] | None = None,
) -> Phase:
    """Per version: the last reader's stamp in each event's plane minus the commit stamp.

    ``readers`` limits "the last reader" to those readers (default: all).
    """
    commit = stamps.plane(COMMIT)[0]
    phase = Phase(missing=stage.missing)
    for what, plane in events:
        rows = stamps.plane(plane)
        if readers is not None:
            rows = [rows[i] for i in readers]
        samples = []
        for k in stage.measured:
            times = [row[k] for row in rows]
            if commit[k] and all(times):
                samples.append((max(times) - commit[k]) * 1e9)
        phase.latencies[what] = samples
    if stage.span_s > 0:
        phase.cpu_ns_per_s = cpu_s / stage.span_s * 1e9
        phase.versions_per_s = stage.published / stage.span_s
    if stage.published:
        phase.reader_cpu_s = cpu_s / stage.published / stamps.readers
    return phase


def _note_missing(phase: Phase, what: str) -> None:
    if phase.missing:
        phase.notes.append(f"{what}: {phase.missing} versions timed out (not counted)")


def _read_answers(sel: selectors.BaseSelector, stamps: Stamps, k: int, n: int) -> bool:
    answered = 0
    deadline = time.monotonic() + VERSION_TIMEOUT_S
    while answered < n:
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            return False
        for key, _mask in sel.select(timeout):
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            data = conn.recv(8)
            received = time.time()
            if len(data) == 8:
                stamps.put(ACKED, key.data, int.from_bytes(data, "little"), received)
                answered += 1
    return True


def _visible(stamps: Stamps, versions: Sequence[int]) -> list[float]:
    """Per version, ns from COMMIT until the version table named it (commit-to-visible)."""
    commit, visible = stamps.plane(COMMIT)[0], stamps.plane(VISIBLE)[0]
    return [(visible[k] - commit[k]) * 1e9 for k in versions if commit[k] and visible[k]]


def _breakdown(stamps: Stamps, versions: Sequence[int], n: int) -> list[str]:
    """Where the time goes from COMMIT to the last ack (medians over the measured versions)."""
    commit, start, end = (stamps.plane(p)[0] for p in (COMMIT, ANNOUNCE_START, ANNOUNCE_END))
    received, acked = stamps.plane(RECEIVED), stamps.plane(ACKED)
    steps = (
        "COMMIT -> announce begins (version table, thread to loop)",
        f"announce() itself ({n} subscribers)",
        "announce begins -> first reader decoded it",
        "announce begins -> last reader decoded it",
        "one reader: decoded -> its ack read by the daemon",
        "last reader decoded -> last ack read by the daemon",
    )
    parts: dict[str, list[float]] = {step: [] for step in steps}
    for k in versions:
        got = [row[k] for row in received]
        acks = [row[k] for row in acked]
        if not (commit[k] and all(got) and all(acks)):
            continue
        parts[steps[0]].append(start[k] - commit[k])
        parts[steps[1]].append(end[k] - start[k])
        parts[steps[2]].append(min(got) - start[k])
        parts[steps[3]].append(max(got) - start[k])
        parts[steps[4]] += [a - g for a, g in zip(acks, got, strict=True)]
        parts[steps[5]].append(max(acks) - max(got))
    shown = [f"{step}: {format_ns(statistics.median(v) * 1e9)}" for step, v in parts.items() if v]
    return [f"N={n} ctxstore, where the time goes (p50 of each step): " + "; ".join(shown)]


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


@dataclass
class _CpuWindow:
    seconds: float = 0.0


@contextlib.contextmanager
def _cpu(procs: Sequence[subprocess.Popen[bytes]]) -> Iterator[_CpuWindow]:
    """CPU seconds (user + system, every thread) the processes used inside the ``with`` block."""
    before = [cpu_seconds(p.pid) for p in procs]
    window = _CpuWindow()
    yield window
    window.seconds = sum(cpu_seconds(p.pid) - b for p, b in zip(procs, before, strict=True))


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (every thread, those that ended included), in ns.

    psutil's ``cpu_times`` counts clock ticks (10 ms here): too coarse for a
    reader that spends tens of microseconds per version. Linux gives any
    process's scheduler clock as a CPU-time clock (``clock_gettime`` on
    ``MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)``), exact and inclusive of
    threads that exited (summing ``/proc/<pid>/task/*/schedstat`` would lose
    them); psutil is the fallback where it is refused.
    """
    try:
        return time.clock_gettime_ns(((~pid) << 3) | 2) / 1e9
    except OSError:
        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)


def reap(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)


SCENARIO = Scenario(
    name="fanout",
    title="Fan-out: commit to N readers notified and acknowledged",
    method=__doc__ or "",
    run=run,
    plots=(plots.fanout_latency,),
)
