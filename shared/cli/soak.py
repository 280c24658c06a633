"""``ctxstore soak``: continuous commits under a reader fleet, resources sampled over time.

A private daemon (a child process, HTTP off) runs on a temporary store (or
``--store DIR``) and socket; N reader processes built on
``ctxstore.readers.Reader`` read a few slots in a loop and check every context
whole; this process commits small and medium contexts to those slots back to
back. Every ``interval`` seconds it samples what a leak would grow: the
daemon's RSS and open file descriptors, the readers' total RSS and PSS, the
shared memory of this run's segments, the store's disk use. At the end it
compares the mean of the last third of the samples after warm-up with the
first third: each metric may grow by its tolerance, no more. Exit 0 when
everything stayed flat, no reader saw a torn context, the daemon stopped
cleanly (socket and segment removed) and the store verifies; 1 otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctxstore.client import publish, wait_until_listening
from ctxstore.context import Context
from ctxstore.errors import DaemonUnavailableError
from ctxstore.store import StoreView
from ctxstore.versiontable import segment_name

from .soak_samples import HEADERS, SHM_DIR, Sample, Trend, row, take_sample, trends
from .table import format_table

SLOTS = (1, 2, 3)
MEDIUM_SLOT = 2  # 1 MiB a version; the others 4 KiB
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0

READER_PROGRAM = textwrap.dedent(
    """
    import json, sys, threading, time
    from ctxstore.readers import Reader
    store, sock, name = sys.argv[1:4]
    slots = [int(s) for s in sys.argv[4].split(",")]
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    reads, torn, backwards, errors, last = 0, 0, 0, [], {}
    with Reader(store=store, socket=sock, name=name) as reader:
        print("ready", flush=True)
        while not stop.is_set():
            for slot in slots:
                try:
                    ctx = reader.get(slot)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                stamp = float(ctx.metadata["stamp"])
                torn += any(float(a[0]) != stamp or float(a[-1]) != stamp
                            for a in ctx.weights.values())
                backwards += ctx.version < last.get(slot, 0)
                last[slot] = ctx.version
                reads += 1
            stop.wait(0.002)
    print(json.dumps({"name": name, "reads": reads, "torn": torn, "backwards": backwards,
                      "n_errors": len(errors), "errors": errors[:5]}), flush=True)
    """
)


# -- the fleet --------------------------------------------------------------------------------


def _context(slot: int, stamp: int) -> Context:
    size = (256 << 10) // 4 if slot == MEDIUM_SLOT else 256
    weights = {f"t{i}": np.full(size, float(stamp), "f4") for i in range(4)}
    return Context(weights, {"soak": True}, {"stamp": stamp})


def _start_daemon(store: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "ctxstore.cli", "daemon", "--store", str(store),
             "--socket", str(sock), "--http", "off", "--log-level", "WARNING"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until_listening(sock, START_TIMEOUT, alive=lambda: daemon.poll() is None)
    except DaemonUnavailableError:
        _kill(daemon)
        raise RuntimeError(f"the daemon did not start: {log.read_text()[-2000:]}") from None
    return daemon


def _start_readers(n: int, store: Path, sock: Path) -> list[subprocess.Popen[str]]:
    slots = ",".join(map(str, SLOTS))
    procs = []
    for i in range(n):
        argv = [sys.executable, "-c", READER_PROGRAM, str(store), str(sock), f"soak-{i}", slots]
        procs.append(
            subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        )
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"reader pid {proc.pid} did not start")
    return procs


def _stop_readers(procs: Sequence[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    for proc in procs:
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.write("stop\n")
            proc.stdin.flush()
    reports = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=STOP_TIMEOUT)
            reports.append(json.loads(out.strip().splitlines()[-1]))
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            _kill(proc)
            reports.append({"name": f"pid {proc.pid}", "torn": None, "failed": True})
    return reports


def _kill(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_TIMEOUT)


def _stop_daemon(daemon: subprocess.Popen[bytes]) -> int:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill(daemon)
        return -signal.SIGKILL


@dataclass
class Run:
    """What one soak measured and found."""

    minutes: float
    readers: int
    interval: float
    samples: list[Sample]
    trends: list[Trend]
    reader_reports: list[dict[str, Any]]
    daemon_exit: int | None = None
    leftovers: list[str] | None = None
    problems: list[str] | None = None

    @property
    def flat(self) -> bool:
        return bool(self.trends) and all(t.flat for t in self.trends)

    @property
    def whole(self) -> bool:
        return all(r.get("torn") == 0 and r.get("backwards") == 0 for r in self.reader_reports)

    @property
    def ok(self) -> bool:
        return (self.flat and self.whole and self.daemon_exit == 0
                and self.leftovers == [] and self.problems == [])  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "minutes": self.minutes, "readers": self.readers, "interval": self.interval,
            "machine": {"host": platform.node(), "cpus": os.cpu_count(),
                        "python": platform.python_version(), "kernel": platform.release()},
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "samples": [asdict(s) for s in self.samples],
            "trends": [asdict(t) for t in self.trends],
            "readers_reports": self.reader_reports, "daemon_exit": self.daemon_exit,
            "leftovers": self.leftovers, "problems": self.problems,
            "flat": self.flat, "whole": self.whole, "ok": self.ok,
        }  # fmt: skip


@contextlib.contextmanager
def _workspace(store: Path | None) -> Iterator[tuple[Path, Path]]:
    with tempfile.TemporaryDirectory(prefix="ctxstore-soak-") as tmp:
        yield (store or Path(tmp) / "store"), Path(tmp) / "ctxstore.sock"


def run_soak(
    minutes: float,
    readers: int = 16,
    interval: float = 5.0,
    json_path: Path | None = None,
    store: Path | None = None,
) -> int:
    """Soak a private daemon for ``minutes``; print the samples and the verdict; 0 when flat."""
    duration = minutes * 60.0
    run = Run(minutes, readers, interval, [], [], [])
    with _workspace(store) as (store_dir, sock):
        print(f"soak: {minutes:g} min, {readers} readers, store {store_dir}", flush=True)
        daemon = _start_daemon(store_dir, sock, sock.with_name("daemon.log"))
        procs: list[subprocess.Popen[str]] = []
        try:
            for slot in SLOTS:  # every slot exists before a reader asks for it
                publish(slot, _context(slot, 0), socket=sock, timeout=START_TIMEOUT)
            procs = _start_readers(readers, store_dir, sock)
            _commit_and_sample(
                run, duration, daemon=daemon.pid, procs=procs, store=store_dir, sock=sock
            )
        finally:
            run.reader_reports = _stop_readers(procs)
            run.daemon_exit = _stop_daemon(daemon)
        run.leftovers = [str(p) for p in (sock, SHM_DIR / segment_name(store_dir)[1:])
                         if p.exists()]  # fmt: skip
        with StoreView(store_dir) as check:
            run.problems = [str(p) for p in check.verify()]
    run.trends = trends(run.samples, warmup=min(30.0, 0.2 * duration))
    _report(run)
    if json_path is not None:
        json_path.write_text(json.dumps(run.to_json(), indent=2) + "\n")
    return 0 if run.ok else 1


def _commit_and_sample(
    run: Run, duration: float, *, daemon: int, procs: Sequence[subprocess.Popen[str]],
    store: Path, sock: Path,
) -> None:  # fmt: skip
    pids = [p.pid for p in procs]
    start = time.monotonic()
    due = start
    commits = 0
    print(format_table(HEADERS, []), flush=True)
    while True:
        now = time.monotonic()
        if now >= due:
            sample = take_sample(now - start, commits, daemon, pids, store)
            run.samples.append(sample)
            print(format_table(HEADERS, [row(sample)]).splitlines()[-1], flush=True)
            due += run.interval
            if now - start >= duration:
                return
        slot = SLOTS[commits % len(SLOTS)]
        commits += 1
        publish(slot, _context(slot, commits), socket=sock, timeout=START_TIMEOUT)


def _report(run: Run) -> None:
    print(format_table(HEADERS, [row(s) for s in run.samples]))
    print("\ntrend (mean of the last third vs the first third after warm-up):")
    for t in run.trends:
        verdict = "flat" if t.flat else "GROWING"
        print(
            f"  {t.metric:12} {t.first:>14,.0f} -> {t.last:>14,.0f}  "
            f"({t.last - t.first:+,.0f}, limit +{t.limit:,.0f})  {verdict}"
        )
    if not run.trends:
        print("  not enough samples after warm-up: run longer or sample more often")
    reads = sum(int(r.get("reads", 0)) for r in run.reader_reports)
    torn = sum(int(r.get("torn") or 0) for r in run.reader_reports)
    print(f"readers: {reads} reads, {torn} torn, all whole and in order: {run.whole}")
    print(f"daemon exit {run.daemon_exit}; left behind: {run.leftovers or 'nothing'}; "
          f"store verify: {run.problems or 'clean'}")  # fmt: skip
    print(f"soak: {'PASS: flat' if run.ok else 'FAIL'}")


__all__ = ["Run", "run_soak"]
