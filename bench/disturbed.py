"""Slow and dead readers: does one bad reader slow everybody else down?

One real daemon (``ctxstore daemon``, ``--http off``, default timeouts) and 16
reader processes following one slot (``get()``, so each maps, adopts and
acknowledges every version, as in the fan-out scenario). This process
publishes a 4-tensor, 64 KiB context with ``ctxstore.client.publish``, one
version at a time: the next one once every healthy reader has acknowledged it,
after a random 3-10 ms pause. Three stages, same daemon, same readers:

1. undisturbed: all 16 readers healthy;
2. disturbed: reader 0 is SIGSTOPped before the first version (it holds its
   socket and its version, and answers nothing: the daemon drops it when it has
   been silent for ``silent_timeout``, 10 s by default, so this stage lasts at
   least 11 s and the drop happens while publishing goes on); two peers that
   never read join: an attached Reader that never calls ``get()`` and a raw
   socket that subscribes to the slot and then never reads it again
   (announcements pile up in its buffer); after 50 measured versions reader 1
   is SIGKILLed right after a publish returned, while it maps the announced
   version, and the daemon's status is polled every 2 ms until it is gone;
3. undisturbed again: reader 0 continued (it reconnects and catches up), the
   two peers gone, a fresh reader in place of the killed one. Stages 1 and 3
   together are the undisturbed figures, so drift over the run is not charged
   to one side.
4. hostile: all 16 readers healthy, beside 100 slowloris connections and 50
   ping flooders (``bench.peers``: one process each). A slowloris says hello,
   begins a frame announcing almost ``max_frame_size`` bytes with its first
   16 KiB and then sends one byte a second; the daemon drops it at its frame
   deadline (``limits.frame_timeout``, 10 s) and it connects again. A flooder
   says hello and sends pings as fast as the daemon takes them, reading and
   dropping the pongs. The stage lasts at least ``frame_timeout`` + 1 s, so
   the drops and reconnections happen while publishing goes on. (The bulk
   variant, 1 MiB partial frames, is bounded by ``limits.partial_bytes``:
   tests/test_hostile.py.)

Undisturbed stages publish 5 warm-up versions, then measure 200, or stop at
10 s once they have 100. Measured per version: the publish round trip as the
publisher sees it (``publish()``: stage the tensors, request, commit, reply:
the commit latency of issue 7), and from the daemon's COMMIT to the last
healthy reader's ack read by the daemon (probes as in the fan-out scenario).
The daemon's RSS and open file descriptors are read after each stage.
Goal (issue 7): disturbed p50 and p99 within 1.2x of undisturbed, for both;
the daemon's RSS after the disturbed stage within 1.2x of its RSS after the
first undisturbed one. Goal (issue 18): in the hostile stage, commit to every
reader's ack p99 within 1.5x of undisturbed, and the daemon's RSS at its end
(attackers still connected) within 1.2x of its RSS after the first
undisturbed stage. ``--quick``: 4 readers, 8 versions a stage, no minimum
length (the stopped reader is not dropped, no slowloris reaches its
deadline), 10 slowloris and 5 flooders.
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
from ctxstore.daemon.config import DaemonConfig

from . import plots
from .fanout import (
    GAP_S,
    START_TIMEOUT_S,
    VERSION_TIMEOUT_S,
    Bench,
    Stage,
    phase_of,
    reap,
    wait_until,
)
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
#: issue 18: commit-to-acked p99 beside hostile peers, against undisturbed
HOSTILE_FACTOR = 1.5
FULL_SLOWLORIS, QUICK_SLOWLORIS = 100, 10
FULL_FLOODERS, QUICK_FLOODERS = 50, 5
STOPPED, KILLED = 0, 1
GONE_TIMEOUT_S = 10.0
#: how long the readers have to settle after the disturbance (a dropped one reconnects)
SETTLE_TIMEOUT_S = 60.0
UNDISTURBED = "undisturbed: every reader healthy"
DISTURBED = "disturbed: 1 SIGSTOPped, 1 SIGKILLed mid-read, 2 peers that never read"


def hostile_label(slowloris: int, flooders: int) -> str:
    return f"hostile: {slowloris} slowloris and {flooders} ping flooders"


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
    ctx.progress.expect(4)  # undisturbed, disturbed, undisturbed again, hostile
    with Bench(ctx) as bench:
        disturbance = Disturbance(bench, n)
        calm, rough, hostile = disturbance.run()
    result = figures(n, calm, rough)
    result += hostile_figures(n, calm, hostile, disturbance.hostile)
    return ScenarioResult(figures=result, notes=calm.notes + rough.notes + hostile.notes)


def hostile_figures(n: int, calm: Outcome, hostile: Outcome, label: str) -> list[Figure]:
    """Issue 18's goals: acked p99 <= 1.5x undisturbed, RSS <= 1.2x, beside hostile peers."""
    acked = Figure(
        "disturbed.hostile_acked",
        "commit to every reader acknowledged, beside hostile peers",
        params={"readers": n, "event": "acked", "peers": label},
        goal=RatioAtMost(UNDISTURBED, HOSTILE_FACTOR, "issue 18", stat="p99"),
        reference=UNDISTURBED,
    )
    if hostile.acked_ns:
        acked.add(label, "ctxstore", Stats.of(hostile.acked_ns))
    if calm.acked_ns:
        acked.add(UNDISTURBED, "variant", Stats.of(calm.acked_ns))
    memory = Figure(
        "disturbed.hostile_rss",
        "the daemon's RSS at the end of the hostile stage (attackers connected)",
        params={"readers": n, "event": "rss", "peers": label},
        goal=FractionAtMost(UNDISTURBED, FACTOR, "issue 18"),
        reference=UNDISTURBED,
    )
    memory.add(label, "ctxstore", Stats.single(hostile.rss), unit="bytes",
               note=f"{hostile.fds} open fds")  # fmt: skip
    memory.add(UNDISTURBED, "variant", Stats.single(calm.rss), unit="bytes",
               note=f"{calm.fds} open fds")  # fmt: skip
    return [acked, memory]


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
        #: the disturbed stage lasts past the daemon's silence limit, so the stopped reader's
        #: drop happens while publishing goes on (not in --quick)
        self.rough_seconds = 0.0 if bench.ctx.quick else DaemonConfig().silent_timeout + 1.0
        quick = bench.ctx.quick
        self.slowloris = QUICK_SLOWLORIS if quick else FULL_SLOWLORIS
        self.flooders = QUICK_FLOODERS if quick else FULL_FLOODERS
        self.hostile = hostile_label(self.slowloris, self.flooders)
        #: the hostile stage lasts past the frame deadline, so slowloris drops happen in it
        self.hostile_seconds = 0.0 if quick else DaemonConfig().frame_timeout + 1.0
        longest = int(self.rough_seconds / GAP_S[0]) + 1  # each version sleeps at least GAP_S[0]
        longest += int(self.hostile_seconds / GAP_S[0]) + 1
        self.stamps = bench.stamps_for(self.slot, n, stages=5, extra=longest)
        self.daemon = psutil.Process(bench.daemon.pid)
        self.readers: list[subprocess.Popen[bytes]] = []
        #: readers replaced by a fresh one (the killed one), reaped at the end
        self.replaced: list[subprocess.Popen[bytes]] = []

    def run(self) -> tuple[Outcome, Outcome, Outcome]:
        """Undisturbed, disturbed, undisturbed again (drift is not charged to one side), hostile."""
        bench, everyone = self.bench, set(range(self.n))
        bench.publish(self.slot, 1)
        peers: list[subprocess.Popen[bytes]] = []
        try:
            self.readers = [self._reader(i) for i in range(self.n)]
            self._follow(range(self.n))
            bench.ctx.progress.step(f"disturbed readers: {self.n} undisturbed")
            before = self._stage(everyone, 2, disturb=None)
            self._never_reading_peers(peers)
            os.kill(self.readers[STOPPED].pid, signal.SIGSTOP)
            bench.ctx.progress.step(f"disturbed readers: {self.n} with 1 stopped, 1 killed")
            rough = self._stage(
                everyone - {STOPPED, KILLED},
                before.stage.next,
                disturb=self.readers[KILLED],
                min_seconds=self.rough_seconds,
            )
            self._note_stopped(rough)
            next_version = self._restore(peers, rough.stage.next)
            bench.ctx.progress.step(f"disturbed readers: {self.n} undisturbed again")
            after = self._stage(everyone, next_version, disturb=None)
            bench.ctx.progress.step(f"disturbed readers: {self.n} beside {self.hostile}")
            self._hostile_peers(peers)
            hostile = self._stage(
                everyone, after.stage.next, disturb=None, min_seconds=self.hostile_seconds
            )
            hostile.outcome.notes[-1] = hostile.outcome.notes[-1].replace(
                "undisturbed:", f"{self.hostile}:", 1
            )
        finally:
            for proc in self.readers:
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGCONT)
            everybody = self.readers + self.replaced + peers
            for proc in everybody:
                if proc.stdin is not None and not proc.stdin.closed:
                    proc.stdin.close()
            reap(everybody)
            for proc in everybody:
                if proc.stdout is not None:
                    proc.stdout.close()
            self.stamps.close()
        calm = before.outcome
        calm.publish_ns += after.outcome.publish_ns
        calm.acked_ns += after.outcome.acked_ns
        calm.notes += after.outcome.notes
        return calm, rough.outcome, hostile.outcome

    def _hostile_peers(self, peers: list[subprocess.Popen[bytes]]) -> None:
        """Start the slowloris and flooder processes into ``peers`` (the caller reaps them)."""
        bench = self.bench
        for role, count in (("slowloris", self.slowloris), ("flooder", self.flooders)):
            peer = bench.spawn([role, str(bench.sock), str(count)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
            peers.append(peer)
            assert peer.stdout is not None
            if peer.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"the {role} peers (pid {peer.pid}) did not start")

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
        self.replaced.append(self.readers[KILLED])
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

    def _never_reading_peers(self, peers: list[subprocess.Popen[bytes]]) -> None:
        """Start an idle Reader and a mute socket into ``peers`` (the caller reaps them)."""
        bench = self.bench
        peers += [
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

    def _stage(
        self,
        healthy: set[int],
        first: int,
        *,
        disturb: subprocess.Popen[bytes] | None,
        min_seconds: float = 0.0,
    ) -> _StageRun:
        """Publish versions from ``first``; each waits for ``healthy`` readers' acks.

        With ``disturb``, that reader is SIGKILLed halfway, right after a publish returned.
        """
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
                run.gone_after_s = self._time_until_gone(disturb.pid)
            return wait_until(lambda: acked(k), VERSION_TIMEOUT_S)

        stage = bench.versions_until(first, send, min_seconds=min_seconds)
        run.stage = stage
        run.outcome.publish_ns = [run.publish_ns[k] for k in stage.measured]
        phase = phase_of(stamps, stage, 0.0, ("acked", ACKED), readers=sorted(healthy))
        run.outcome.acked_ns = phase.latencies["acked"]
        if stage.missing:
            run.outcome.notes.append(
                f"{len(healthy)} healthy readers: {stage.missing} versions not acked by all "
                f"within {VERSION_TIMEOUT_S:g} s (counted if acked later, left out if never)"
            )
        run.outcome.rss = self.daemon.memory_info().rss
        run.outcome.fds = self.daemon.num_fds()
        run.outcome.notes.append(
            f"{'disturbed' if disturb else 'undisturbed'}: {stage.count} versions measured in "
            f"{stage.wall_s:.1f} s; daemon RSS {format_bytes(run.outcome.rss)}, "
            f"{run.outcome.fds} fds"
        )
        return run

    def _status_client(self) -> DaemonClient:
        return DaemonClient(self.bench.sock, name="bench-status", role="admin")

    def _time_until_gone(self, pid: int) -> float:
        """Seconds from now (just after the kill) until ``pid`` is no longer in the status."""
        killed = time.monotonic()
        with self._status_client() as client:
            while pid in _reader_pids(client):
                if time.monotonic() - killed > GONE_TIMEOUT_S:
                    raise RuntimeError(
                        f"the SIGKILLed reader (pid {pid}) is still in the daemon's status "
                        f"{GONE_TIMEOUT_S:g} s after it died"
                    )
                time.sleep(0.002)
        return time.monotonic() - killed

    def _note_stopped(self, rough: _StageRun) -> None:
        """Note when the killed reader left the status, and whether the stopped one had."""
        with self._status_client() as client:
            pids = _reader_pids(client)
        stopped = "still listed" if self.readers[STOPPED].pid in pids else "dropped"
        rough.outcome.notes.append(
            f"the SIGKILLed reader left the daemon's status {format_ns(rough.gone_after_s * 1e9)}"
            f" after the kill (status polled every 2 ms); the SIGSTOPped reader was {stopped} "
            f"when the {rough.stage.wall_s:.1f} s stage ended (the daemon drops a peer silent "
            f"for {DaemonConfig().silent_timeout:g} s)"
        )


def _reader_pids(client: DaemonClient) -> set[object]:
    return {row.get("pid") for row in client.status().readers}


@dataclass
class _StageRun:
    publish_ns: dict[int, float] = field(default_factory=dict)
    outcome: Outcome = field(default_factory=Outcome)
    stage: Stage = field(default_factory=lambda: Stage(measured=[], next=0))
    gone_after_s: float = 0.0


SCENARIO = Scenario(
    name="disturbed",
    title="Slow and dead readers: commit latency beside an undisturbed run",
    method=__doc__ or "",
    run=run,
    plots=(plots.disturbed_latency,),
)
