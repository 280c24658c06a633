"""Slow and dead readers: does one bad reader slow everybody else down?

One real daemon (``ctxstore daemon``, ``--http off``, default timeouts) and 16
reader processes following one slot (``get()``, so each maps, adopts and
acknowledges every version, as in the fan-out scenario). This process
publishes a 4-tensor, 64 KiB context with ``ctxstore.client.publish``, one
version at a time: the next one once every healthy reader has acknowledged it,
after a random 3-10 ms pause. Two stages, same daemon, same readers:

1. undisturbed: all 16 readers healthy;
2. disturbed: reader 0 is SIGSTOPped before the first version (it holds its
   socket and its version, and answers nothing: the daemon drops it when it has
   been silent for ``silent_timeout``, 10 s by default); two peers that never
   read join: an attached Reader that never calls ``get()`` and a raw socket
   that subscribes to the slot and then never reads it again (announcements
   pile up in its buffer); halfway through the stage reader 1 is SIGKILLed
   right after a publish returned, while it maps the announced version.

Each stage publishes 5 warm-up versions, then measures 200, or stops at 10 s
once it has 100. Measured per version: the publish round trip as the
publisher sees it (``publish()``: stage the tensors, request, commit, reply:
the commit latency of issue 7), and from the daemon's COMMIT to the last
healthy reader's ack read by the daemon (probes as in the fan-out scenario).
The daemon's RSS and open file descriptors are read after each stage, and its
status after the disturbed one: the killed reader must be gone from it.
Goal (issue 7): disturbed p50 and p99 within 1.2x of undisturbed, for both;
the daemon's RSS after the disturbed stage within 1.2x of its RSS after the
undisturbed one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import psutil

from ctxstore.client import DaemonClient

from . import plots
from .fanout import START_TIMEOUT_S, Bench, Stage, phase_of, reap, wait_until
from .harness import (
    AllOf,
    Figure,
    FractionAtMost,
    Goal,
    RatioAtMost,
    ScenarioResult,
    Stats,
    format_bytes,
    format_ns,
)
from .peers import ACKED, CONTROL, FOLLOWING, READY
from .scenario import RunContext, Scenario

FULL_READERS, QUICK_READERS = 16, 4
FACTOR = 1.2
STOPPED, KILLED = 0, 1
GONE_TIMEOUT_S = 10.0
#: how long the readers have to settle after the disturbance (a dropped one reconnects)
SETTLE_TIMEOUT_S = 60.0
UNDISTURBED = "undisturbed: every reader healthy"
DISTURBED = "disturbed: 1 SIGSTOPped, 1 SIGKILLed mid-read, 2 peers that never read"


def ratio_goal(reference: str) -> Goal:
    return AllOf(
        (
            RatioAtMost(reference, FACTOR, "issue 7"),
            RatioAtMost(reference, FACTOR, "issue 7", stat="p99"),
        ),
        "issue 7",
    )


@dataclass
class Outcome:
    """One stage: publish round trips (ns), commit-to-acked (ns), and the daemon afterwards."""

    publish_ns: list[float] = field(default_factory=list)
    acked_ns: list[float] = field(default_factory=list)
    rss: int = 0
    fds: int = 0
    notes: list[str] = field(default_factory=list)


def run(ctx: RunContext) -> ScenarioResult:
    n = QUICK_READERS if ctx.quick else FULL_READERS
    ctx.progress.expect(2)
    with Bench(ctx) as bench:
        calm, rough = Disturbance(bench, n).run()
    return ScenarioResult(figures=figures(n, calm, rough), notes=calm.notes + rough.notes)


def figures(n: int, calm: Outcome, rough: Outcome) -> list[Figure]:
    publish = Figure(
        "disturbed.publish",
        f"publish() round trip with {n} readers following",
        params={"readers": n, "event": "publish"},
        goal=ratio_goal(UNDISTURBED),
        reference=UNDISTURBED,
    )
    acked = Figure(
        "disturbed.acked",
        "commit to every healthy reader acknowledged",
        params={"readers": n, "event": "acked"},
        goal=ratio_goal(UNDISTURBED),
        reference=UNDISTURBED,
    )
    for figure, calm_samples, rough_samples in (
        (publish, calm.publish_ns, rough.publish_ns),
        (acked, calm.acked_ns, rough.acked_ns),
    ):
        if rough_samples:
            figure.add(DISTURBED, "ctxstore", Stats.of(rough_samples))
        if calm_samples:
            figure.add(UNDISTURBED, "variant", Stats.of(calm_samples))
    memory = Figure(
        "disturbed.daemon_rss",
        "the daemon's RSS after each stage",
        params={"readers": n, "event": "rss"},
        goal=FractionAtMost(UNDISTURBED, FACTOR, "issue 7"),
        reference=UNDISTURBED,
    )
    memory.add(
        DISTURBED, "ctxstore", Stats.single(rough.rss), unit="bytes", note=f"{rough.fds} open fds"
    )
    memory.add(
        UNDISTURBED, "variant", Stats.single(calm.rss), unit="bytes", note=f"{calm.fds} open fds"
    )
    return [publish, acked, memory]


class Disturbance:
    """The stages on one Bench: its daemon, its reader processes, the peers that never read."""

    def __init__(self, bench: Bench, n: int) -> None:
        self.bench = bench
        self.n = n
        self.slot = bench.next_slot()
        self.stamps = bench.stamps_for(self.slot, n, stages=4)
        self.daemon = psutil.Process(bench.daemon.pid)
        self.readers: list[subprocess.Popen[bytes]] = []

    def run(self) -> tuple[Outcome, Outcome]:
        """Undisturbed, disturbed, undisturbed again (drift is not charged to one side)."""
        bench, everyone = self.bench, set(range(self.n))
        bench.publish(self.slot, 1)
        peers: list[subprocess.Popen[bytes]] = []
        try:
            self.readers = [self._reader(i) for i in range(self.n)]
            self._follow(range(self.n))
            bench.ctx.progress.step(f"disturbed readers: {self.n} undisturbed")
            before = self._stage(everyone, 2, disturb=None)
            peers = self._never_reading_peers()
            os.kill(self.readers[STOPPED].pid, signal.SIGSTOP)
            bench.ctx.progress.step(f"disturbed readers: {self.n} with 1 stopped, 1 killed")
            rough = self._stage(everyone - {STOPPED, KILLED}, before.next_version,
                                disturb=self.readers[KILLED])  # fmt: skip
            self._check_status(rough)
            next_version = self._restore(peers, rough.next_version)
            bench.ctx.progress.step(f"disturbed readers: {self.n} undisturbed again")
            after = self._stage(everyone, next_version, disturb=None)
        finally:
            for proc in self.readers:
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGCONT)
            for proc in self.readers + peers:
                if proc.stdin is not None and not proc.stdin.closed:
                    proc.stdin.close()
            reap(self.readers + peers)
            self.stamps.close()
        calm = before.outcome
        calm.publish_ns += after.outcome.publish_ns
        calm.acked_ns += after.outcome.acked_ns
        calm.notes += after.outcome.notes
        return calm, rough.outcome

    def _reader(self, index: int) -> subprocess.Popen[bytes]:
        bench, stamps = self.bench, self.stamps.path
        args = [str(bench.store), str(bench.sock), str(self.slot), str(index), str(stamps)]
        return bench.spawn(["reader", *args], stdin=subprocess.PIPE)

    def _follow(self, indices: Iterable[int]) -> None:
        """Wait until these readers are ready, tell them to follow, wait until they do."""
        indices = list(indices)
        deadline = time.monotonic() + START_TIMEOUT_S
        for flag in (READY, FOLLOWING):
            for i in indices:
                while not self.stamps.get(CONTROL, i, flag):
                    if self.readers[i].poll() is not None:
                        raise RuntimeError(f"reader {i} exited while starting")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"reader {i} not following after {START_TIMEOUT_S:g} s")
                    time.sleep(0.01)
                if flag == READY:
                    stdin = self.readers[i].stdin
                    assert stdin is not None
                    stdin.write(b"follow\n")
                    stdin.flush()

    def _restore(self, peers: list[subprocess.Popen[bytes]], version: int) -> int:
        """Let the stopped reader go on, send the never-reading peers away, replace the dead one.

        Returns the next version to publish, once every reader acknowledged one (untimed).
        """
        os.kill(self.readers[STOPPED].pid, signal.SIGCONT)
        for peer in peers:
            assert peer.stdin is not None
            peer.stdin.close()
        reap(peers)
        for flag in (READY, FOLLOWING):
            self.stamps.put(CONTROL, KILLED, flag, 0.0)
        self.readers[KILLED] = self._reader(KILLED)
        self._follow([KILLED])
        self.bench.publish(self.slot, version)
        everyone = range(self.n)
        settled = wait_until(
            lambda: all(self.stamps.get(ACKED, i, version) for i in everyone), SETTLE_TIMEOUT_S
        )
        if not settled:
            raise RuntimeError(
                f"not every reader acknowledged version {version} within {SETTLE_TIMEOUT_S:g} s "
                "after the disturbance ended"
            )
        return version + 1

    def _never_reading_peers(self) -> list[subprocess.Popen[bytes]]:
        bench = self.bench
        peers = [
            bench.spawn(
                ["idle", str(bench.store), str(bench.sock)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            ),
            bench.spawn(
                ["mute", str(bench.sock), str(self.slot)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            ),
        ]
        for peer in peers:
            assert peer.stdout is not None
            if peer.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"a never-reading peer (pid {peer.pid}) did not start")
        return peers

    def _stage(
        self, healthy: set[int], first: int, *, disturb: subprocess.Popen[bytes] | None
    ) -> _StageRun:
        """Publish versions from ``first``; each waits for ``healthy`` readers' acks."""
        bench, stamps = self.bench, self.stamps
        run = _StageRun()
        kill_at = first + bench.warmup + bench.min_versions // 2

        def acked(k: int) -> bool:
            return all(stamps.get(ACKED, i, k) != 0.0 for i in healthy)

        def send(k: int) -> bool:
            started = time.perf_counter_ns()
            version = bench.publish(self.slot, k)
            run.publish_ns[k] = time.perf_counter_ns() - started
            if version != k:
                raise RuntimeError(f"slot {self.slot}: published version {version}, expected {k}")
            if disturb is not None and k == kill_at:
                disturb.kill()  # the announcement is on its way: the reader is mapping it
                run.killed_at = time.monotonic()
            return wait_until(lambda: acked(k), 3.0)

        stage = bench.versions_until(first, send)
        run.stage = stage
        run.next_version = stage.next
        run.outcome.publish_ns = [run.publish_ns[k] for k in stage.measured]
        phase = phase_of(stamps, stage, 0.0, ("acked", ACKED), readers=sorted(healthy))
        run.outcome.acked_ns = phase.latencies["acked"]
        if stage.missing:
            run.outcome.notes.append(
                f"{len(healthy)} healthy readers: {stage.missing} versions not acked by all "
                "within 3 s (left out of the figures)"
            )
        run.outcome.rss = self.daemon.memory_info().rss
        run.outcome.fds = self.daemon.num_fds()
        run.outcome.notes.append(
            f"{'disturbed' if disturb else 'undisturbed'}: {stage.count} versions measured in "
            f"{stage.wall_s:.1f} s; daemon RSS {format_bytes(run.outcome.rss)}, "
            f"{run.outcome.fds} fds"
        )
        return run

    def _check_status(self, rough: _StageRun) -> None:
        """Note how long the killed reader stayed in status, and whether the stopped one did."""
        killed, stopped = self.readers[KILLED].pid, self.readers[STOPPED].pid
        with DaemonClient(self.bench.sock, name="bench-status", role="admin") as client:
            deadline = time.monotonic() + GONE_TIMEOUT_S
            while True:
                pids = {row.get("pid") for row in client.status().readers}
                if killed not in pids or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        if killed in pids:
            raise RuntimeError(
                f"the SIGKILLed reader (pid {killed}) is still in the daemon's status "
                f"{GONE_TIMEOUT_S:g} s after it died"
            )
        gone_after = time.monotonic() - (rough.killed_at or time.monotonic())
        rough.outcome.notes.append(
            f"the SIGKILLed reader was gone from status {format_ns(gone_after * 1e9)} after the "
            "kill (at most, measured after the stage); the SIGSTOPped reader was "
            + ("still listed" if stopped in pids else "dropped (silent past the limit)")
            + f" when the stage ended, after {rough.stage.wall_s:.1f} s"
        )


@dataclass
class _StageRun:
    publish_ns: dict[int, float] = field(default_factory=dict)
    outcome: Outcome = field(default_factory=Outcome)
    stage: Stage = field(default_factory=lambda: Stage(measured=[], next=0))
    next_version: int = 0
    killed_at: float | None = None


SCENARIO = Scenario(
    name="disturbed",
    title="Slow and dead readers: commit latency beside an undisturbed run",
    method=__doc__ or "",
    run=run,
    plots=(plots.disturbed_latency,),
)
