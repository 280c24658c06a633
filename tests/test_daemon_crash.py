"""Crash consistency of the real daemon: SIGKILLs while a publisher commits and readers read.

One store, one socket, one daemon process after another. A publisher thread
commits tiny stamped contexts through ``ctxstore.client.publish`` and logs each
version it was told is committed; Reader processes read every slot in a loop
and check each context whole (every tensor and the metadata carry the same
stamp) and never going backwards. The daemon is SIGKILLed at random instants,
or kills itself at a named commit step (CTXSTORE_CRASH_AT, shared/faults.py),
and restarted on the same store and socket. After each restart, with the
publisher paused:

- the new daemon started: the stale socket and shared-memory table were reclaimed,
  and the table holds every slot's current version;
- recovery left nothing half-committed: verify() == [], wal/ is empty, every
  version directory has its row and every row its directory;
- every version reported committed is there with its own stamp, and every new
  row (reported or committed just before the kill) loads whole.

At the end: no reader saw a torn context or went backwards, SIGTERM stops the
last daemon with exit 0 and removes its socket and segment, and a full re-hash
verify() is clean. Retention is huge, so nothing is ever retired.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from support.daemon import start_daemon, wait_for_socket
from support.procs import dies_with_pytest
from support.store import wal_leftovers

from ctxstore import Context, CtxStoreError
from ctxstore.client import SHM_PREFIX, publish
from ctxstore.faults import COMMIT_POINTS
from ctxstore.store import PersistentStore, layout
from ctxstore.versiontable import VersionTable, segment_name

SLOTS = (1, 2, 3)
N_READERS = 3
RETENTION = "100000"
#: "retiring" needs retention to retire something; with nothing retired it never fires
#: (tests/test_store_crash.py kills there at the store level)
POINTS = tuple(p for p in COMMIT_POINTS if p != "retiring")
MAX_AFTER = {"staging": 9}  # "staging" passes once per tensor (3 a commit)

READER = textwrap.dedent(
    """
    import json, sys, threading, time
    from ctxstore.readers import Reader
    store, sock, name = sys.argv[1:4]
    slots = [int(s) for s in sys.argv[4].split(",")]
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    reads, torn, backwards, errors, last, went_back = 0, 0, 0, [], {}, []
    with Reader(store=store, socket=sock, name=name, reconnect_backoff=(0.02, 0.2)) as reader:
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
                if ctx.version < last.get(slot, 0):
                    backwards += 1
                    went_back.append((slot, last[slot], ctx.version, time.time()))
                last[slot] = ctx.version
                reads += 1
            stop.wait(0.001)
    print(json.dumps({"name": name, "reads": reads, "torn": torn, "backwards": backwards,
                      "n_errors": len(errors), "errors": errors[:5],
                      "went_back": went_back[:5]}), flush=True)
    """
)


def stamped(stamp: int) -> Context:
    weights = {f"t{i}": np.full(16, float(stamp), "f4") for i in range(3)}
    return Context(weights, {"stamp": stamp}, {"stamp": stamp})


def check_whole(ctx: Context, stamp: int | None = None) -> None:
    got = int(ctx.metadata["stamp"])
    assert stamp is None or got == stamp, f"v{ctx.version}: stamp {got}, reported {stamp}"
    for name, array in ctx.weights.items():
        assert np.all(array == float(got)), f"slot {ctx.slot} v{ctx.version} {name} torn"


class Publisher(threading.Thread):
    """Commits continuously while ``go`` is set; logs every version reported committed."""

    def __init__(self, sock: Path) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.go = threading.Event()
        self.idle = threading.Event()
        self.done = False
        self.reported: list[tuple[int, int, int]] = []  # (slot, version, stamp)
        self.failed = 0
        self.stamp = 0

    def run(self) -> None:
        while not self.done:
            if not self.go.is_set():
                self.idle.set()
                self.go.wait(0.05)
                continue
            self.idle.clear()
            if not self.go.is_set():
                continue
            self.stamp += 1
            slot = SLOTS[self.stamp % len(SLOTS)]
            try:
                version = publish(slot, stamped(self.stamp), socket=self.sock, timeout=20)
            except (CtxStoreError, OSError):
                self.failed += 1  # the daemon died under it: never reported
                time.sleep(0.005)
                continue
            self.reported.append((slot, version, self.stamp))

    def pause(self) -> None:
        self.go.clear()
        self.idle.clear()
        assert self.idle.wait(30), "publisher did not pause"


@dataclass
class Rig:
    """The store, the socket, the current daemon, the readers and the publisher."""

    root: Path
    seed: int
    store: Path = field(init=False)
    sock: Path = field(init=False)
    daemon: subprocess.Popen[bytes] | None = None
    readers: list[subprocess.Popen[str]] = field(default_factory=list)
    checked: int = 0  # reported versions already checked
    seen_rows: set[tuple[int, int]] = field(default_factory=set)
    starts: int = 0

    def __post_init__(self) -> None:
        self.store = self.root / "store"
        self.sock = self.root / "run" / "ctx.sock"
        self.log = open(self.root / "daemons.log", "ab")  # noqa: SIM115 - closed in stop()
        self.rng = random.Random(self.seed)
        self.publisher = Publisher(self.sock)

    def start_daemon(self, crash_at: str | None = None, after: int = 0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CTXSTORE_CRASH")}
        if crash_at is not None:
            env |= {"CTXSTORE_CRASH_AT": crash_at, "CTXSTORE_CRASH_AFTER": str(after)}
        self.log.write(f"--- start {self.starts} crash_at={crash_at} after={after}\n".encode())
        self.log.flush()
        self.daemon = start_daemon(
            self.root, self.store, self.sock, None, "--retention", RETENTION,
            "--log-level", "WARNING", env=env, log=Path(self.log.name),
        ).proc  # fmt: skip
        self.starts += 1
        wait_for_socket(self.sock, self.daemon, timeout=60)

    def start_readers(self) -> None:
        for slot in SLOTS:  # every slot exists before a reader asks for it
            publish(slot, stamped(0), socket=self.sock)
        slots = ",".join(map(str, SLOTS))
        for i in range(N_READERS):
            argv = [sys.executable, "-c", READER, str(self.store), str(self.sock), f"r{i}", slots]
            proc = subprocess.Popen(
                dies_with_pytest(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            self.readers.append(proc)
        for proc in self.readers:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        self.publisher.start()

    def kill_at_random(self) -> None:
        """Let the publisher commit for a random while, then SIGKILL the daemon."""
        assert self.daemon is not None
        self.publisher.go.set()
        time.sleep(self.rng.uniform(0.01, 0.25))
        self.daemon.kill()
        assert self.daemon.wait(30) == -signal.SIGKILL
        self.publisher.pause()

    def kill_at_point(self, point: str) -> None:
        """Start the daemon armed at ``point`` (stopping a running one first: SIGTERM);
        check what it recovered at start, then commit until it kills itself there.

        Killed runs follow each other directly: each armed start is a restart after
        the previous kill, checked like any other (one daemon start per kill)."""
        assert self.daemon is not None
        if self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            assert self.daemon.wait(30) == 0
        self.start_daemon(point, self.rng.randrange(MAX_AFTER.get(point, 4)))
        self.check_restart()
        self.publisher.go.set()
        try:
            code = self.daemon.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon never reached crash point {point!r}")
        assert code == -signal.SIGKILL, f"armed at {point!r}, the daemon exited with {code}"
        self.publisher.pause()

    def restart_and_check(self) -> None:
        self.start_daemon()
        self.check_restart()

    def check_restart(self) -> None:
        """The publisher is paused and the new daemon has run recovery: check everything."""
        assert wal_leftovers(self.store) == [], "recovery left staging directories"
        with PersistentStore(self.store, readonly=True) as store:
            assert [str(p) for p in store.verify(rehash=False)] == []
            rows = {(s.slot, v.version) for s in store.list_slots() for v in
                    store.list_versions(s.slot)}  # fmt: skip
            assert version_dirs(self.store) == rows, "orphan or missing version directories"
            new_reports = self.publisher.reported[self.checked :]
            for slot, version, stamp in new_reports:
                assert (slot, version) in rows, f"reported slot {slot} v{version} is lost"
                check_whole(store.load_context(slot, version), stamp)
            for slot, version in sorted(rows - self.seen_rows):
                check_whole(store.load_context(slot, version))
            lost = {(s, v) for s, v, _ in self.publisher.reported} - rows
            assert not lost, f"reported versions lost: {sorted(lost)[:10]}"
            currents = {s.slot: s.current_version for s in store.list_slots()}
            for info in store.list_slots():
                assert info.current_version == info.latest_version
        self.checked += len(new_reports)
        self.seen_rows = rows
        with VersionTable.attach(segment_name(self.store)) as table:
            assert {slot: table.get(slot) for slot in currents} == currents

    def stop(self) -> list[dict[str, object]]:
        """Stop the publisher, the readers and (SIGTERM) the daemon; the readers' reports."""
        self.publisher.done = True
        self.publisher.go.set()
        if self.publisher.is_alive():
            self.publisher.join(30)
        reports = []
        for proc in self.readers:
            if proc.poll() is None:
                assert proc.stdin is not None
                proc.stdin.write("stop\n")
                proc.stdin.flush()
            out, _ = proc.communicate(timeout=30)
            reports.append(json.loads(out.strip().splitlines()[-1]))
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            assert self.daemon.wait(30) == 0
        return reports

    def cleanup(self) -> None:
        for proc in [*self.readers, *([self.daemon] if self.daemon else [])]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.log.close()
        shm = Path("/dev/shm") / segment_name(self.store)[1:]
        if shm.exists():
            shm.unlink()


def version_dirs(store: Path) -> set[tuple[int, int]]:
    base = layout.slots_dir(store)
    return {(int(s), int(v)) for s in os.listdir(base) for v in os.listdir(base / s)}


@pytest.fixture
def rig(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Rig]:
    rig = Rig(tmp_path, seed=len(request.node.name))
    try:
        rig.start_daemon()
        rig.start_readers()
        yield rig
    finally:
        rig.cleanup()


def finish(rig: Rig) -> None:
    """The end of a run: readers saw only whole contexts, a clean stop leaves nothing behind."""
    reports = rig.stop()
    for report in reports:
        assert report["torn"] == 0 and report["backwards"] == 0, (
            f"reader {report['name']}: torn {report['torn']}, backwards {report['backwards']}, "
            f"went back (slot, from, to, unix time): {report['went_back']}; "
            f"match the times against {rig.root / 'daemons.log'}"
        )
        assert report["n_errors"] == 0, report
        assert int(report["reads"]) > 0, report  # type: ignore[call-overload]
    assert not rig.sock.exists(), "SIGTERM left the socket"
    assert not (Path("/dev/shm") / segment_name(rig.store)[1:]).exists(), "segment left"
    ours = f"{SHM_PREFIX[1:]}{os.getpid()}-"
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(ours)], "publish segment left"
    with PersistentStore(rig.store, readonly=True) as store:
        assert [str(p) for p in store.verify()] == []
    assert rig.publisher.reported, "nothing was committed"


#: 12 in the default run (each kill restarts the daemon: ~1 s a cycle on 2 busy cores; the
#: commit steps get their own kills below; the suite's 10-minute budget), 1000 with --long
KILLS = [pytest.param(12, id="12"), pytest.param(1000, marks=pytest.mark.slow, id="1000")]
POINT_KILLS = [pytest.param(2, id="2"), pytest.param(20, marks=pytest.mark.slow, id="20")]


@pytest.mark.parametrize("kills", KILLS)
def test_sigkill_the_daemon_at_random_instants(rig: Rig, kills: int) -> None:
    for _ in range(kills):
        rig.kill_at_random()
        rig.restart_and_check()
    finish(rig)
    assert rig.publisher.failed > 0, "no kill ever landed on a publish"


@pytest.mark.parametrize("per_point", POINT_KILLS)
def test_the_daemon_killed_at_each_commit_step(rig: Rig, per_point: int) -> None:
    for point in POINTS:
        for _ in range(per_point):
            rig.kill_at_point(point)  # the next armed start recovers from this kill
    rig.restart_and_check()
    finish(rig)
