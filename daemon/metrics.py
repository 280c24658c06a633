"""Prometheus metrics of the daemon, in a registry of its own (one per API app).

Two kinds:

- event metrics, observed where things happen: commits and their duration
  and bytes (from the commit thread, through ``Committer.on_commit``), the
  time from a commit to each reader's ack (``Fleet.on_ack`` against the
  announcements the daemon sent), verification runs;
- state metrics, read at scrape time by :class:`LiveCollector`: connected
  peers, each reader's lag and memory, the job queue, the daemon process'
  CPU time and memory, and integrity: readers' damage reports by outcome,
  new versions hashed after their commit, versions recorded damaged.

Bytes written and bytes saved by dedup are measured on disk after each
commit: the new version's files are grouped by inode; an inode with more
links than the version itself holds existed before (a hard link to a stored
identical tensor: its bytes were saved), every other inode was written once.
A stored duplicate retired by retention in the same commit is counted as
written.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ctxstore.store import layout
from ctxstore.wire import Announce

from .status_rows import reader_rows

if TYPE_CHECKING:
    from .server import Daemon

log = logging.getLogger("ctxstore.daemon")

COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ACK_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
#: announcements remembered for commit-to-ack latency (older ones are forgotten)
MAX_TRACKED_ANNOUNCEMENTS = 1024


def version_bytes(root: Path, slot: int, version: int) -> tuple[int, int]:
    """(bytes written, bytes saved by hard links) of one stored version, from its inodes."""
    inodes: dict[int, tuple[int, int, int]] = {}  # inode -> (size, links, seen in this version)
    with os.scandir(layout.version_dir(root, slot, version)) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            size, links, seen = inodes.get(st.st_ino, (st.st_size, st.st_nlink, 0))
            inodes[st.st_ino] = (size, links, seen + 1)
    written = saved = 0
    for size, links, seen in inodes.values():
        if links > seen:  # linked to a file another version already held
            saved += size * seen
        else:
            written += size
            saved += size * (seen - 1)
    return written, saved


class DaemonMetrics:
    """The event metrics, the live collector, and the text exposition."""

    def __init__(
        self,
        daemon: Daemon | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.daemon = daemon
        self._clock = clock
        self.registry = CollectorRegistry()
        r = self.registry
        self.commits = Counter("ctxstore_commits", "Versions committed by this daemon", registry=r)
        self.commit_seconds = Histogram(
            "ctxstore_commit_duration_seconds",
            "Store commit time: validate, write, fsync, COMMIT, warm, retention",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.written_bytes = Counter(
            "ctxstore_commit_written_bytes", "Bytes of new tensor files written", registry=r
        )
        self.saved_bytes = Counter(
            "ctxstore_commit_deduplicated_bytes",
            "Bytes not written because an identical tensor file was hard-linked",
            registry=r,
        )
        self.ack_seconds = Histogram(
            "ctxstore_commit_to_ack_seconds",
            "From an announced commit to each reader's acknowledgement of it",
            buckets=ACK_BUCKETS,
            registry=r,
        )
        self.verify_runs = Counter(
            "ctxstore_verify_runs", "Verification runs by result", ["result"], registry=r
        )
        self.verify_problems = Counter(
            "ctxstore_verify_problems", "Problems found by verification runs", registry=r
        )
        for result in ("ok", "failed"):  # both series exist from the start, for alerts
            self.verify_runs.labels(result=result)
        self._announced: OrderedDict[tuple[int, int], tuple[float, set[int]]] = OrderedDict()
        if daemon is not None:
            r.register(LiveCollector(daemon))

    # -- observations ---------------------------------------------------------------------

    def observe_commit(self, slot: int, version: int, seconds: float) -> None:
        """A version was committed (called in the commit thread)."""
        self.commits.inc()
        self.commit_seconds.observe(seconds)
        store = self.daemon.store if self.daemon is not None else None
        if store is None:
            return
        try:
            written, saved = version_bytes(store.root, slot, version)
        except OSError as exc:  # retired already, or unreadable: the counts are best effort
            log.debug("metrics: cannot size slot %d version %d: %s", slot, version, exc)
            return
        self.written_bytes.inc(written)
        self.saved_bytes.inc(saved)

    def announced(self, announce: Announce, sessions: Iterable[int]) -> None:
        """Remember when ``announce`` was committed and which sessions were told."""
        told = set(sessions)
        if not told:
            return
        key = (announce.slot, announce.version)
        self._announced.pop(key, None)
        self._announced[key] = (announce.committed_at, told)
        while len(self._announced) > MAX_TRACKED_ANNOUNCEMENTS:
            self._announced.popitem(last=False)

    def observe_ack(self, session: int, slot: int, version: int) -> None:
        """A reader acknowledged a version: one latency sample per reader and announcement."""
        entry = self._announced.get((slot, version))
        if entry is None or session not in entry[1]:
            return
        committed_at, waiting = entry
        waiting.discard(session)
        if not waiting:
            del self._announced[(slot, version)]
        self.ack_seconds.observe(max(0.0, self._clock() - committed_at))

    def observe_verify(self, problems: int) -> None:
        self.verify_runs.labels(result="ok" if problems == 0 else "failed").inc()
        self.verify_problems.inc(problems)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


class LiveCollector(Collector):
    """State read at scrape time: peers, reader lag and memory, jobs, the daemon process."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def collect(self) -> Iterator[Metric]:
        yield from self._peers()
        yield from self._jobs()
        yield from self._integrity()
        yield from self._process()
        yield from self._cluster()

    def _peers(self) -> Iterator[Metric]:
        daemon = self._daemon
        peers = daemon.fleet.snapshot()
        connected = GaugeMetricFamily(
            "ctxstore_peers_connected", "Connected peers by role", labels=["role"]
        )
        for role in ("reader", "publisher", "admin"):
            connected.add_metric([role], sum(1 for p in peers if p.role == role))
        yield connected
        current = daemon.store.current_versions() if daemon.store is not None else {}
        lag = GaugeMetricFamily(
            "ctxstore_reader_lag_versions",
            "Largest lag (current - held) over the slots a reader holds",
            labels=["session", "pid", "name"],
        )
        uss = GaugeMetricFamily(
            "ctxstore_reader_uss_bytes", "Reader USS", labels=["session", "pid", "name"]
        )
        pss = GaugeMetricFamily(
            "ctxstore_reader_pss_bytes", "Reader PSS", labels=["session", "pid", "name"]
        )
        for row in reader_rows(peers, current, self._now()):
            if row["role"] != "reader":
                continue
            labels = [str(row["session"]), str(row["pid"]), str(row["name"])]
            lags = list(row["lag"].values())
            lag.add_metric(labels, max(lags, key=abs) if lags else 0)
            uss.add_metric(labels, row["uss"])
            pss.add_metric(labels, row["pss"])
        yield from (lag, uss, pss)

    @staticmethod
    def _now() -> float:
        return time.time()

    def _jobs(self) -> Iterator[Metric]:
        jobs: Any = getattr(self._daemon, "jobs", None)
        if jobs is None:
            return
        try:
            depth, counts = int(jobs.depth()), dict(jobs.counts())
        except Exception:  # the queue's trouble must not break the scrape
            log.exception("metrics: cannot read the job queue")
            return
        yield GaugeMetricFamily("ctxstore_jobs_queue_depth", "Jobs waiting to run", value=depth)
        states = GaugeMetricFamily("ctxstore_jobs", "Jobs by state", labels=["state"])
        for state, count in sorted(counts.items()):
            states.add_metric([str(state)], int(count))
        yield states

    def _integrity(self) -> Iterator[Metric]:
        daemon = self._daemon
        desk: Any = getattr(daemon, "damage", None)
        if desk is not None:
            reports = CounterMetricFamily(
                "ctxstore_damage_reports",
                "Damage reports from readers, by what the daemon's own hash made of them",
                labels=["outcome"],
            )
            for outcome, count in desk.counts.items():
                reports.add_metric([outcome], count)
            yield reports
        committer: Any = getattr(daemon, "committer", None)
        if committer is not None:
            checks = CounterMetricFamily(
                "ctxstore_commit_checks",
                "New versions hashed once after their commit, by result",
                labels=["result"],
            )
            for result, count in committer.checked_after_commit.items():
                checks.add_metric([result], count)
            yield checks
        if daemon.store is None:
            return
        try:
            damaged = daemon.store.damaged_versions()
        except Exception:  # the index's trouble must not break the scrape
            log.exception("metrics: cannot read the damaged versions")
            return
        yield GaugeMetricFamily(
            "ctxstore_versions_damaged", "Stored versions recorded damaged", value=len(damaged)
        )
        each = GaugeMetricFamily(
            "ctxstore_version_damaged",
            "1 for each stored version recorded damaged (see ctxstore verify)",
            labels=["slot", "version"],
        )
        for slot, version in damaged:
            each.add_metric([str(slot), str(version)], 1)
        yield each

    def _cluster(self) -> Iterator[Metric]:
        """The scale-out role (docs/scale-out.md), when the daemon has one."""
        summary = self._daemon.cluster.summary()
        if summary is None:
            return
        info = GaugeMetricFamily("ctxstore_cluster_info", "This daemon's scale-out role",
                                 labels=["role", "origin", "feed"])  # fmt: skip
        info.add_metric([summary["role"], summary["origin"] or "", summary["feed"] or ""], 1)
        yield info
        if summary["feed_connected"] is not None:
            yield GaugeMetricFamily("ctxstore_cluster_feed_connected",
                                    "1 while the NATS feed is connected",
                                    value=int(bool(summary["feed_connected"])))  # fmt: skip
        if "outbox" in summary:
            if summary["outbox"] is not None:
                yield GaugeMetricFamily("ctxstore_cluster_outbox_depth",
                                        "Slots whose origin head is not up to date yet",
                                        value=summary["outbox"])  # fmt: skip
            yield CounterMetricFamily("ctxstore_cluster_uploaded_bytes",
                                      "Bytes of objects uploaded to the origin",
                                      value=summary["bytes_uploaded"])  # fmt: skip
            heads = GaugeMetricFamily("ctxstore_cluster_head_version",
                                      "Version the origin's head names, as this writer moved it",
                                      labels=["slot"])  # fmt: skip
            for slot, version in summary["heads"].items():
                heads.add_metric([slot], version)
            yield heads
        if "applied" in summary:
            yield CounterMetricFamily("ctxstore_cluster_downloaded_bytes",
                                      "Bytes downloaded from the origin (objects and records)",
                                      value=summary["bytes_downloaded"])  # fmt: skip
            yield CounterMetricFamily("ctxstore_cluster_refused",
                                      "Pulls refused (an object not what its name says)",
                                      value=summary["refused"])  # fmt: skip
            yield GaugeMetricFamily("ctxstore_cluster_poll_failures",
                                    "Polls of the origin's heads failed in a row",
                                    value=summary["poll_failures"])  # fmt: skip
            applied = GaugeMetricFamily("ctxstore_cluster_applied_version",
                                        "Version of the last origin head applied, per slot",
                                        labels=["slot"])  # fmt: skip
            for slot, version in summary["applied"].items():
                applied.add_metric([slot], version)
            yield applied

    def _process(self) -> Iterator[Metric]:
        # cpu_times and memory_info read /proc/self only: they work under ProcSubset=pid
        try:
            process = psutil.Process()
            cpu, memory = process.cpu_times(), process.memory_info()
        except (psutil.Error, OSError) as exc:
            log.debug("metrics: cannot read this process: %s", exc)
            return
        seconds = CounterMetricFamily(
            "ctxstore_daemon_cpu_seconds", "Daemon CPU time", labels=["mode"]
        )
        seconds.add_metric(["user"], cpu.user)
        seconds.add_metric(["system"], cpu.system)
        yield seconds
        resident = GaugeMetricFamily(
            "ctxstore_daemon_memory_bytes", "Daemon memory", labels=["kind"]
        )
        resident.add_metric(["rss"], memory.rss)
        resident.add_metric(["vms"], memory.vms)
        yield resident
