"""Crash safety of PersistentStore with real processes and real SIGKILLs.

A child (tests/crash_writer.py) commits verifiable contexts in a loop and logs
each version it was told is committed. The parent kills it, at random
instants or through the named crash points of the commit protocol, and after
every kill checks, in this order:

1. a read-only store, opened before any writer runs recovery, sees only whole
   versions: every row loads with exactly its own contents, and the only thing
   its verify() reports is orphan directories (files with no row);
2. every version the child reported is durable: per slot the newest row is
   at least the newest reported version (newer ones were committed, then the
   child was killed before its log line), rows form one run of versions that
   holds at least the newest ``retention`` ones;
3. a writer opens (so the kill freed the lock), recovery mends everything:
   no recovery problems, verify() == [], wal/ empty, every version directory
   has its row, and the rows are exactly those the reader saw.

Two lanes (separate stores) run side by side to use both cores.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from crash_writer import check_context, expected_config

from ctxstore import NotFoundError, layout
from ctxstore.faults import COMMIT_POINTS
from ctxstore.store import PersistentStore

CHILD = Path(__file__).with_name("crash_writer.py")
SLOTS = 3
RETENTION = 2
LANES = 2
CHILD_TIMEOUT = 60.0  # seconds; only a hung child ever gets near it
#: how many passes a point may let through (CTXSTORE_CRASH_AFTER is drawn below this):
#: "staging" passes once per tensor (9 a commit), the others at most once a commit
MAX_AFTER = {"staging": 40}
DEFAULT_MAX_AFTER = 6


@dataclass(frozen=True)
class Observation:
    """What one kill left behind, as seen before recovery."""

    wal_entries: int  # staging directories left in wal/
    orphans: int  # version directories with no row
    unreported: int  # slots whose newest row is one past the newest logged version
    versions: int  # rows in the index


@dataclass
class Lane:
    """One store, one log, killed children one after another."""

    root: Path
    seed: int

    def __post_init__(self) -> None:
        self.store_dir = self.root / "store"
        self.log = self.root / "committed.log"
        self.stderr = self.root / "child.stderr"
        self.rng = random.Random(self.seed)
        self.children = 0
        with PersistentStore(self.store_dir, retention=RETENTION):
            pass  # the schema exists before the first child, so a reader can always open

    def spawn(self, crash_at: str | None = None, after: int = 0) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CTXSTORE_CRASH")}
        if crash_at is not None:
            env["CTXSTORE_CRASH_AT"] = crash_at
            env["CTXSTORE_CRASH_AFTER"] = str(after)
        self.children += 1
        argv = [sys.executable, str(CHILD), "write", str(self.store_dir), str(self.log)]
        argv += ["--seed", str(self.seed * 100_003 + self.children)]
        argv += ["--slots", str(SLOTS), "--retention", str(RETENTION)]
        with self.stderr.open("wb") as err:
            return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=env)

    def kill_at_random(self) -> Observation:
        """SIGKILL a child at a random instant: mostly while committing, sometimes while opening."""
        child = self.spawn()
        try:
            if self.rng.random() < 0.2:
                delay = self.rng.uniform(0.0, 0.35)  # import, open, recovery, first commits
            else:
                self._wait_ready(child)
                delay = self.rng.uniform(0.0, 0.08)  # a few commits' worth
            if _exits_within(child, delay):
                pytest.fail(f"writer child exited before the kill: {self._child_error()}")
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=CHILD_TIMEOUT)
        finally:
            _reap(child)
        self._expect_killed(child, "random SIGKILL")
        return check_after_kill(self.store_dir, self.log)

    def kill_at_point(self, point: str) -> Observation:
        """Let the child SIGKILL itself at ``point`` after a random number of passes."""
        after = self.rng.randrange(MAX_AFTER.get(point, DEFAULT_MAX_AFTER))
        child = self.spawn(point, after)
        try:
            child.wait(timeout=CHILD_TIMEOUT)
        finally:
            _reap(child)
        self._expect_killed(child, f"crash point {point!r} after {after} passes")
        return check_after_kill(self.store_dir, self.log)

    def _wait_ready(self, child: subprocess.Popen[bytes]) -> None:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], CHILD_TIMEOUT)
        line = child.stdout.readline() if ready else b""
        assert line == b"ready\n", f"writer child did not start: {self._child_error()}"

    def _expect_killed(self, child: subprocess.Popen[bytes], how: str) -> None:
        assert child.returncode == -signal.SIGKILL, (
            f"{how}: child exited with {child.returncode}, not SIGKILL: {self._child_error()}"
        )

    def _child_error(self) -> str:
        return self.stderr.read_text(errors="replace")[-2000:] or "(no stderr)"


def _exits_within(child: subprocess.Popen[bytes], seconds: float) -> bool:
    try:
        child.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


def _reap(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.kill()
        child.wait()
    if child.stdout is not None:
        child.stdout.close()


# -- the checks after every kill -------------------------------------------------------------


def read_log(log: Path) -> dict[int, int]:
    """The newest version the child reported committed, per slot (versions must increase)."""
    newest: dict[int, int] = {}
    if not log.exists():
        return newest
    for line in log.read_text().splitlines():
        slot, version = map(int, line.split())
        assert version > newest.get(slot, 0), f"log reports slot {slot} v{version} out of order"
        newest[slot] = version
    return newest


def check_visible(store: PersistentStore, reported: dict[int, int]) -> dict[int, list[int]]:
    """Everything the store shows is whole and right, and nothing reported is lost."""
    rows: dict[int, list[int]] = {}
    for info in store.list_slots():
        versions = [v.version for v in store.list_versions(info.slot)]
        latest = versions[-1]
        where = f"slot {info.slot} rows {versions}"
        assert info.current_version == info.latest_version == latest, where
        assert versions == list(range(versions[0], latest + 1)), f"{where}: not one run"
        assert len(versions) >= min(RETENTION, latest), f"{where}: retention removed too much"
        last = reported.get(info.slot, 0)
        # later versions may exist: committed, then killed before the log line
        assert latest >= last, f"{where}: newest reported version {last} is lost"
        for version in versions:
            check_context(store.load_context(info.slot, version), info.slot, version)
            meta = store.get_metadata(info.slot, version)
            assert dict(meta.config) == expected_config(info.slot, version), where
        check_context(store.load_context(info.slot), info.slot, latest)
        rows[info.slot] = versions
    lost = {slot: v for slot, v in reported.items() if slot not in rows}
    assert not lost, f"reported versions of slots the store does not have: {lost}"
    return rows


def version_dirs(store_dir: Path) -> set[tuple[int, int]]:
    base = layout.slots_dir(store_dir)
    return {
        (int(slot), int(version))
        for slot in os.listdir(base)
        for version in os.listdir(base / slot)
    }


def check_after_kill(store_dir: Path, log: Path) -> Observation:
    reported = read_log(log)
    wal = layout.wal_dir(store_dir)
    wal_entries = len(os.listdir(wal))
    with PersistentStore(store_dir, readonly=True) as reader:
        seen = check_visible(reader, reported)
        problems = reader.verify()
    assert all(p.kind == "orphan" and p.version is not None for p in problems), [
        str(p) for p in problems
    ]
    with PersistentStore(store_dir, retention=RETENTION) as writer:
        assert writer.recovery_problems == []
        assert [str(p) for p in writer.verify()] == []
        assert check_visible(writer, reported) == seen, "recovery changed committed rows"
    assert os.listdir(wal) == [], "recovery left staging directories in wal/"
    rows = {(slot, v) for slot, versions in seen.items() for v in versions}
    assert version_dirs(store_dir) == rows, "version directories and rows disagree"
    unreported = sum(versions[-1] > reported.get(slot, 0) for slot, versions in seen.items())
    return Observation(wal_entries, len(problems), unreported, len(rows))


# -- running lanes side by side ---------------------------------------------------------------


def run_lanes(
    tmp_path: Path, kills: int, seed: int, kill: Callable[[Lane], Observation]
) -> list[Observation]:
    lanes = [Lane(tmp_path / f"lane{i}", seed * LANES + i) for i in range(LANES)]
    for lane in lanes:
        lane.root.mkdir(exist_ok=True)

    def run(lane: Lane, count: int) -> list[Observation]:
        return [kill(lane) for _ in range(count)]

    shares = [kills // LANES + (i < kills % LANES) for i in range(LANES)]
    with ThreadPoolExecutor(LANES) as pool:
        futures = [pool.submit(run, lane, n) for lane, n in zip(lanes, shares, strict=True)]
        return [obs for future in futures for obs in future.result()]


# -- the tests --------------------------------------------------------------------------------

POINT_KILLS = [pytest.param(17, id="17"), pytest.param(100, marks=pytest.mark.slow, id="100")]
RANDOM_KILLS = [pytest.param(100, id="100"), pytest.param(600, marks=pytest.mark.slow, id="600")]


@pytest.mark.parametrize("kills", POINT_KILLS)
@pytest.mark.parametrize("point", COMMIT_POINTS)
def test_kill_at_each_commit_step(tmp_path: Path, point: str, kills: int) -> None:
    seed = COMMIT_POINTS.index(point)
    observed = run_lanes(tmp_path, kills, seed, lambda lane: lane.kill_at_point(point))
    assert len(observed) == kills
    for obs in observed:
        # the kill left exactly what that step leaves; recovery (checked above) mended it
        if point in ("staging", "staged"):
            assert obs.wal_entries == 1 and obs.orphans == 0 and obs.unreported == 0, obs
        elif point in ("renamed", "in_transaction"):
            assert obs.wal_entries == 0 and obs.orphans == 1 and obs.unreported == 0, obs
        elif point == "committed":
            assert obs.wal_entries == 0 and obs.orphans == 0 and obs.unreported >= 1, obs
        else:  # retiring: rows gone, files still there; the new version is committed
            assert point == "retiring"
            assert obs.wal_entries == 0 and obs.orphans >= 1 and obs.unreported >= 1, obs


@pytest.mark.parametrize("kills", RANDOM_KILLS)
def test_kill_at_random_instants(tmp_path: Path, kills: int) -> None:
    observed = run_lanes(tmp_path, kills, 1000 + kills, Lane.kill_at_random)
    assert len(observed) == kills
    states = Counter(
        "staging" if o.wal_entries else "orphan" if o.orphans else "clean" for o in observed
    )
    # nearly all of a child's time is spent inside save_context (fsyncs), so kills land there
    assert states["staging"] + states["orphan"] > 0, states
    assert max(o.versions for o in observed) > 0


def test_crash_while_retiring_leaves_files_readers_ignore_and_recovery_removes(
    tmp_path: Path,
) -> None:
    """Killed at 'retiring': the rows are gone, the files are not. A reader does not see
    those versions (verify calls them orphans), and the next writer removes them."""
    lane = Lane(tmp_path, seed=7)
    child = lane.spawn("retiring", 0)  # the first retention pass of a fresh store
    try:
        child.wait(timeout=CHILD_TIMEOUT)
    finally:
        _reap(child)
    lane._expect_killed(child, "crash point 'retiring'")
    with PersistentStore(lane.store_dir, readonly=True) as reader:
        rows = {
            (info.slot, v.version)
            for info in reader.list_slots()
            for v in reader.list_versions(info.slot)
        }
        orphans = version_dirs(lane.store_dir) - rows
        assert orphans, "retention removed rows, so their directories are left"
        for slot, version in orphans:
            assert version < min(v for s, v in rows if s == slot), "retired the oldest"
            with pytest.raises(NotFoundError):
                reader.load_context(slot, version)
        problems = sorted((p.kind, p.slot, p.version) for p in reader.verify())
        assert problems == sorted(("orphan", s, v) for s, v in orphans)
    with PersistentStore(lane.store_dir, retention=RETENTION) as writer:
        assert writer.recovery_problems == []
        assert writer.verify() == []
    assert version_dirs(lane.store_dir) == rows
