"""The fan-out's CPU floors: what the bare work under issue 21's two CPU goals costs here.

Issue 21 asks the daemon for at most 1 ms of CPU per version at N=16 and a
following reader for at most 80 us. Whether those are reachable depends on the
machine: on a VM with slow system calls the durable commit alone may cost more.
The fan-out scenario therefore measures, in the same run:

* the durable-commit floor (this module): the fan-out's version (4 float32
  tensors of ``TENSOR_BYTES``, .npy files) committed the bare way, in a child
  process that accounts only its commits' CPU (``getrusage`` around each one,
  not the pauses between them), so none of the bench's own work is counted.
  Two kinds of commit alternate:

  - all written: a new directory, each of the 4 files created with ``O_EXCL``,
    written and fsynced, the directory and its parent fsynced, one SQLite
    transaction (the store's own ``connect``: WAL, ``synchronous=FULL``) that
    inserts the version's row and deletes the row of the version 3 back, its
    COMMIT, then that old version's directory removed;
  - as the store commits this version: the same, but only the changed tensor
    written and fsynced, the 3 unchanged ones hard-linked from the previous
    version (the store's dedup does the same).

  Between commits the same random pause as the fan-out's (3-10 ms), so the
  CPU comes back from idle as the daemon's does.
* the bare fan-out server's and floor clients' CPU per version: measured by
  ``bench.fanout`` itself around its floor stage.

``python -m bench.floors ROOT COMMITS SEED GAP_LO GAP_HI TENSORS TENSOR_BYTES``
runs the commits under ROOT (which must not exist; it is removed at the end)
and prints one JSON object: per kind, the commits and their user and system CPU
seconds in all.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctxstore.store.db import connect, transaction
from ctxstore.store.npyfile import npy_header

#: the two kinds of commit, in the order they alternate
ALL_WRITTEN, ONE_WRITTEN = "all written", "one written, the others hard-linked"
#: commits of each kind before the counted ones (the first has no version to link from)
WARMUP = 3
KEEP_BACK = 3
RUN_TIMEOUT_S = 300.0
#: Linux splits CPU time into user and system by timer ticks (4 ms at HZ=250): below this
#: much CPU in all, a kind's split rests on too few ticks to be stated
SPLIT_MIN_S = 0.2


@dataclass(frozen=True)
class CommitCpu:
    """The CPU one kind of bare commit took, in all, over ``commits`` commits."""

    commits: int
    user_s: float
    system_s: float

    @property
    def per_commit_s(self) -> float:
        return (self.user_s + self.system_s) / max(self.commits, 1)


@dataclass(frozen=True)
class FloorRun:
    """One commit-floor measurement: where, how many commits of each kind, of what.

    ``root`` must be on the store's filesystem (an fsync's cost is the filesystem's)
    and must not exist yet; the run removes it.
    """

    root: Path
    commits: int
    seed: int
    gap_s: tuple[float, float]
    tensors: int
    tensor_bytes: int

    def argv(self) -> list[str]:
        """The child's command-line arguments (:func:`main` reads them back)."""
        lo, hi = self.gap_s
        return [str(self.root), str(self.commits), str(self.seed), str(lo), str(hi),
                str(self.tensors), str(self.tensor_bytes)]  # fmt: skip


def measure_commit_floor(run: FloorRun) -> dict[str, CommitCpu]:
    """Run ``run``'s bare commits of each kind in a child process."""
    argv = run.argv()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.floors", *argv],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the commit floor's child failed ({proc.returncode}): {proc.stderr}")
    return {kind: CommitCpu(**cpu) for kind, cpu in json.loads(proc.stdout).items()}


def describe_commit_floor(
    floor: dict[str, CommitCpu], tensors: int, format_s: Callable[[float], str]
) -> str:
    """The scenario's note on the commit floor; ``format_s`` renders seconds."""
    what = {
        ALL_WRITTEN: f"all {tensors} files written and fsynced",
        ONE_WRITTEN: "as the store commits it: the changed tensor's file written and fsynced, "
        f"the {tensors - 1} others hard-linked from the previous version",
    }
    parts = []
    for kind, cpu in floor.items():
        if cpu.user_s + cpu.system_s >= SPLIT_MIN_S:
            split = (
                f"user {format_s(cpu.user_s / cpu.commits)}, "
                f"system {format_s(cpu.system_s / cpu.commits)}"
            )
        else:
            split = "too few commits for a user/system split"
        parts.append(f"{format_s(cpu.per_commit_s)} ({what[kind]}; {split})")
    return (
        "durable-commit floor: a bare commit of this version (a new directory and its files "
        "created with O_EXCL, the directory and its parent fsynced, one SQLite COMMIT in WAL "
        f"mode with synchronous=FULL, the version {KEEP_BACK} back removed) costs this "
        f"machine {' or '.join(parts)} of CPU; means over {floor[ALL_WRITTEN].commits} "
        "commits of each kind, alternating, with the fan-out's pauses between them, in a "
        "child process that counts only its commits"
    )


# -- the child ---------------------------------------------------------------------------------


class BareCommits:
    """Versions of one slot committed the bare way into ``root``, recorded in ``conn``."""

    def __init__(
        self, root: Path, conn: sqlite3.Connection, slot: int, payloads: list[bytes]
    ) -> None:
        self.dir, self.conn, self.slot, self.payloads = root, conn, slot, payloads
        root.mkdir()

    def commit(self, version: int, *, link: bool) -> None:
        """Version ``version``; with ``link``, every file but the first is hard-linked from
        the previous version (the content is the same every time: the filesystem's work
        does not depend on it)."""
        new, previous = self.dir / str(version), self.dir / str(version - 1)
        os.mkdir(new)
        for i, payload in enumerate(self.payloads):
            path = new / f"{i}.npy"
            if link and i > 0 and previous.is_dir():
                os.link(previous / f"{i}.npy", path)
                continue
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        for directory in (new, self.dir):
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        with transaction(self.conn) as conn:
            conn.execute(
                "INSERT INTO versions(slot, version, manifest) VALUES (?, ?, ?)",
                (self.slot, version, bytes(64 * len(self.payloads))),
            )
            conn.execute(
                "DELETE FROM versions WHERE slot = ? AND version = ?",
                (self.slot, version - KEEP_BACK),
            )
        shutil.rmtree(self.dir / str(version - KEEP_BACK), ignore_errors=True)


def run_commits(run: FloorRun) -> dict[str, dict[str, float]]:
    """Alternate the two kinds of commit, ``run.commits`` counted of each; their CPU, pauses
    excluded.

    Each kind commits in a thread of its own, started for it: the total is the
    thread's CPU clock around each commit (ns resolution), and the user/system
    split is that of the thread's whole life (``RUSAGE_THREAD``), which is its
    commits. Linux splits a total by the timer ticks that landed in user or
    kernel mode since the thread began, so deltas of a process's own split
    would carry the interpreter's start-up along.
    """
    rng = np.random.default_rng(run.seed)
    payloads = []
    for _ in range(run.tensors):
        data = rng.standard_normal(run.tensor_bytes // 4, dtype=np.float32)
        payloads.append(npy_header(data.dtype, data.shape) + data.tobytes())
    run.root.mkdir()
    try:
        conn = connect(run.root / "index.db", readonly=False)  # the store's own settings
        try:
            conn.execute(
                "CREATE TABLE versions(slot INTEGER, version INTEGER, manifest BLOB, "
                "PRIMARY KEY (slot, version))"
            )
            kinds = {
                ALL_WRITTEN: BareCommits(run.root / "all", conn, 1, payloads),
                ONE_WRITTEN: BareCommits(run.root / "linked", conn, 2, payloads),
            }
            cpu = dict.fromkeys(kinds, 0.0)
            threads = {kind: ThreadPoolExecutor(1) for kind in kinds}
            pause = random.Random(run.seed)
            for version in range(1, WARMUP + run.commits + 1):
                for kind, slot in kinds.items():
                    spent = threads[kind].submit(_timed, slot.commit, version, kind == ONE_WRITTEN)
                    if version > WARMUP:
                        cpu[kind] += spent.result()
                    spent.result()
                    time.sleep(pause.uniform(*run.gap_s))
            shares = {kind: threads[kind].submit(_user_share).result() for kind in kinds}
            for thread in threads.values():
                thread.shutdown()
        finally:
            conn.close()
    finally:
        shutil.rmtree(run.root, ignore_errors=True)
    return {
        kind: {
            "commits": run.commits,
            "user_s": cpu[kind] * shares[kind],
            "system_s": cpu[kind] * (1 - shares[kind]),
        }
        for kind in kinds
    }


def _timed(commit: Callable[..., None], version: int, link: bool) -> float:
    """One commit; the calling thread's CPU seconds it took."""
    before = time.thread_time()
    commit(version, link=link)
    return time.thread_time() - before


def _user_share() -> float:
    """The share of this thread's CPU so far that Linux accounts as user time."""
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime / max(usage.ru_utime + usage.ru_stime, 1e-9)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floors")
    parser.add_argument("root", type=Path)
    parser.add_argument("commits", type=int)
    parser.add_argument("seed", type=int)
    parser.add_argument("gap_lo", type=float)
    parser.add_argument("gap_hi", type=float)
    parser.add_argument("tensors", type=int)
    parser.add_argument("tensor_bytes", type=int)
    args = parser.parse_args(argv)
    gap_s = (args.gap_lo, args.gap_hi)
    run = FloorRun(args.root, args.commits, args.seed, gap_s, args.tensors, args.tensor_bytes)
    cpu = run_commits(run)
    print(json.dumps(cpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
