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

Children are forked from a forkserver that has numpy and ctxstore imported, so a
kill costs tens of milliseconds, not an interpreter start.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest
from crash_writer import (
    WriterPlan,
    check_context,
    die_in_transaction,
    expected_config,
    forked_writer,
)
from support.store import wal_leftovers

from ctxstore import NotFoundError
from ctxstore.faults import COMMIT_POINTS
from ctxstore.store import PersistentStore, layout

CHILD = Path(__file__).with_name("crash_writer.py")
SLOTS = 3
RETENTION = 2
CHILD_TIMEOUT = 60.0  # seconds; only a hung child ever gets near it
#: how many passes a point may let through (CTXSTORE_CRASH_AFTER is drawn below this):
#: "staging" passes once per tensor (9 a commit), the others at most once a commit
MAX_AFTER = {"staging": 40}
DEFAULT_MAX_AFTER = 6


@dataclass(frozen=True)
class Observation:
    """What one kill left behind, as seen before recovery."""

    wal_entries: int  # staging directories left in wal/
    orphans: int  # directories of a version being committed (newer than every row)
    retired_waiting: int  # directories of retired versions the reaper had not deleted yet
    unreported: int  # slots whose newest row is newer than the newest logged version
    versions: int  # rows in the index


FORKSERVER = multiprocessing.get_context("forkserver")
# numpy and ctxstore are imported once, by the server; a child then starts in milliseconds.
# (Only installed modules: Python 3.11's forkserver ignores the sys.path it is handed, so
# it could not preload crash_writer, which each child imports cheaply on its own.)
FORKSERVER.set_forkserver_preload(["ctxstore.store"])


@dataclass
class Lane:
    """One store, one log, killed children one after another."""

    root: Path
    seed: int

    def __post_init__(self) -> None:
        self.store_dir = self.root / "store"
        self.log = self.root / "committed.log"
        self.rng = random.Random(self.seed)
        self.children = 0
        with PersistentStore(self.store_dir, retention=RETENTION):
            pass  # the schema exists before the first child, so a reader can always open

    @contextmanager
    def spawn(
        self, crash_at: str | None = None, after: int = 0
    ) -> Iterator[tuple[BaseProcess, Connection]]:
        """A writer child forked from the forkserver; SIGKILLed and reaped on the way out."""
        self.children += 1
        plan = WriterPlan(
            str(self.store_dir),
            str(self.log),
            seed=self.seed * 100_003 + self.children,
            slots=SLOTS,
            retention=RETENTION,
        )
        channel, child_end = FORKSERVER.Pipe(duplex=False)
        child = FORKSERVER.Process(
            target=forked_writer, args=(plan, crash_at, after, child_end), daemon=True
        )
        try:
            child.start()
            child_end.close()
            yield child, channel
        finally:
            if child.is_alive():
                child.kill()
            child.join()
            channel.close()

    def kill_at_random(self) -> Observation:
        """SIGKILL a child at a random instant: mostly while committing, sometimes while opening."""
        with self.spawn() as (child, channel):
            if self.rng.random() < 0.8:
                self._wait_ready(channel)  # then a few commits' worth
            # else: while it opens the store and recovers, or in its first commits
            child.join(timeout=self.rng.uniform(0.0, 0.06))
            if child.exitcode is not None:
                pytest.fail(f"writer child exited before the kill: {_message(channel)}")
            child.kill()
            child.join(CHILD_TIMEOUT)
            self._expect_killed(child, channel, "random SIGKILL")
        return check_after_kill(self.store_dir, self.log)

    def kill_at_point(self, point: str, after: int | None = None) -> Observation:
        """Let the child SIGKILL itself at ``point`` after a random number of passes."""
        if after is None:
            after = self.rng.randrange(MAX_AFTER.get(point, DEFAULT_MAX_AFTER))
        with self.spawn(point, after) as (child, channel):
            child.join(CHILD_TIMEOUT)
            self._expect_killed(child, channel, f"crash point {point!r} after {after} passes")
        return check_after_kill(self.store_dir, self.log)

    @staticmethod
    def _wait_ready(channel: Connection) -> None:
        message = channel.recv() if channel.poll(CHILD_TIMEOUT) else "(nothing in time)"
        assert message == "ready", f"writer child did not start: {message}"

    @staticmethod
    def _expect_killed(child: BaseProcess, channel: Connection, how: str) -> None:
        assert child.exitcode == -signal.SIGKILL, (
            f"{how}: child exited with {child.exitcode}, not SIGKILL: {_message(channel)}"
        )


def _message(channel: Connection) -> str:
    """The child's last word: 'ready' or the traceback that stopped it."""
    last = "(no message)"
    with suppress(EOFError, OSError):
        while channel.poll(0):
            last = channel.recv()
    return str(last)


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
    wal_entries = len(wal_leftovers(store_dir))
    try:
        reader = PersistentStore(store_dir, readonly=True)
    except Exception as exc:
        left = sorted(os.listdir(store_dir))
        pytest.fail(f"a read-only store cannot open after the kill: {exc!r}; store holds {left}")
    with reader:
        seen = check_visible(reader, reported)
        problems = reader.verify()
    assert all(p.kind == "orphan" and p.version is not None for p in problems), [
        str(p) for p in problems
    ]
    with PersistentStore(store_dir, retention=RETENTION) as writer:
        assert writer.recovery_problems == []
        assert [str(p) for p in writer.verify()] == []
        assert check_visible(writer, reported) == seen, "recovery changed committed rows"
    assert wal_leftovers(store_dir) == [], "recovery left staging directories in wal/"
    rows = {(slot, v) for slot, versions in seen.items() for v in versions}
    assert version_dirs(store_dir) == rows, "version directories and rows disagree"
    unreported = sum(versions[-1] > reported.get(slot, 0) for slot, versions in seen.items())
    newest = {slot: max(versions, default=0) for slot, versions in seen.items()}
    in_flight = [p for p in problems if p.version > newest.get(p.slot, 0)]  # type: ignore[operator]
    retired_waiting = len(problems) - len(in_flight)
    return Observation(wal_entries, len(in_flight), retired_waiting, unreported, len(rows))


# -- running kills ----------------------------------------------------------------------------


def run_kills(
    tmp_path: Path, kills: int, seed: int, kill: Callable[[Lane], Observation]
) -> list[Observation]:
    """``kills`` kills, one after another, on one store.

    One lane, not several in threads: multiprocessing's forkserver Popen is not thread-safe
    (Process.start() polls every live child, and two threads reading one child's status pipe
    make one of them see exit code 255).
    """
    lane = Lane(tmp_path, seed)
    return [kill(lane) for _ in range(kills)]


# -- the tests --------------------------------------------------------------------------------

#: each kill is a fresh writer process: 5 a step and 20 at random instants keep the default
#: run well under a minute on 2 cores (the suite's 10-minute budget); --long runs 100 and 600
POINT_KILLS = [pytest.param(5, id="5"), pytest.param(100, marks=pytest.mark.slow, id="100")]
RANDOM_KILLS = [pytest.param(20, id="20"), pytest.param(600, marks=pytest.mark.slow, id="600")]


@pytest.mark.parametrize("kills", POINT_KILLS)
@pytest.mark.parametrize("point", COMMIT_POINTS)
def test_kill_at_each_commit_step(tmp_path: Path, point: str, kills: int) -> None:
    seed = COMMIT_POINTS.index(point)
    observed = run_kills(tmp_path, kills, seed, lambda lane: lane.kill_at_point(point))
    assert len(observed) == kills
    for obs in observed:
        # the kill left exactly what that step leaves; recovery (checked above) mended it
        if point in ("staging", "staged"):
            assert obs.wal_entries == 1 and obs.orphans == 0 and obs.unreported == 0, obs
        elif point in ("renamed", "in_transaction"):
            assert obs.wal_entries == 0 and obs.orphans == 1 and obs.unreported == 0, obs
        elif point == "committed":
            # retention's rows went in the same COMMIT; their files (if any) await unlinking
            assert obs.wal_entries == 0 and obs.unreported >= 1, obs
        else:  # retiring: rows gone, files still there; the new version is committed
            assert point == "retiring"
            assert obs.wal_entries == 0 and obs.orphans == 0, obs
            assert obs.retired_waiting >= 1 and obs.unreported >= 1, obs


@pytest.mark.parametrize("kills", RANDOM_KILLS)
def test_kill_at_random_instants(tmp_path: Path, kills: int) -> None:
    observed = run_kills(tmp_path, kills, 1000 + kills, Lane.kill_at_random)
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
    with lane.spawn("retiring", 0) as (child, channel):  # a fresh store's first retention
        child.join(CHILD_TIMEOUT)
        lane._expect_killed(child, channel, "crash point 'retiring'")
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


def test_reader_opens_after_a_writer_died_mid_transaction(tmp_path: Path) -> None:
    """The index as the store leaves it after a clean close, then a writer SIGKILLed inside
    a write transaction (as in its open: the journal-mode switch, a migration). A reader
    must open it and see whole versions without any writer running recovery first."""
    lane = Lane(tmp_path, seed=17)
    lane.kill_at_point("committed", after=3)  # some versions; then a clean writer close
    index = str(layout.index_path(lane.store_dir))
    channel, child_end = FORKSERVER.Pipe(duplex=False)
    child = FORKSERVER.Process(target=die_in_transaction, args=(index, child_end), daemon=True)
    try:
        child.start()
        child_end.close()
        Lane._wait_ready(channel)
        child.kill()
        child.join(CHILD_TIMEOUT)
        Lane._expect_killed(child, channel, "SIGKILL inside a write transaction")
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        channel.close()
    check_after_kill(lane.store_dir, lane.log)


OPEN_KILLS = 40


def test_reader_opens_after_a_writer_killed_while_opening(tmp_path: Path) -> None:
    """Writers killed within their first milliseconds: while the forkserver starts them,
    while they take the lock, convert the index back to WAL (a clean close leaves it in
    rollback-journal mode) and recover. Each time a reader opens and sees whole versions
    before any writer has run recovery, and the next writer mends everything."""
    lane = Lane(tmp_path, seed=13)
    lane.kill_at_point("committed", after=3)  # some versions to read
    for _ in range(OPEN_KILLS):
        with lane.spawn() as (child, channel):
            child.join(timeout=lane.rng.uniform(0.0, 0.04))
            if child.exitcode is not None:
                pytest.fail(f"writer child exited before the kill: {_message(channel)}")
            child.kill()
            child.join(CHILD_TIMEOUT)
            lane._expect_killed(child, channel, "SIGKILL while opening")
        check_after_kill(lane.store_dir, lane.log)


@pytest.mark.parametrize("point", ["staged", "in_transaction"])
def test_fresh_interpreter_reads_the_crash_point_from_its_environment(
    tmp_path: Path, point: str
) -> None:
    """The same kill with a plain `python tests/crash_writer.py write` child, which reads
    CTXSTORE_CRASH_AT at import like any process would (the forkserver children above
    re-read it instead), and a writer whose lock died with it."""
    lane = Lane(tmp_path, seed=11)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTXSTORE_CRASH")}
    env |= {"CTXSTORE_CRASH_AT": point, "CTXSTORE_CRASH_AFTER": "2"}
    argv = [sys.executable, str(CHILD), "write", str(lane.store_dir), str(lane.log)]
    done = subprocess.run(argv, env=env, capture_output=True, timeout=CHILD_TIMEOUT, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode(errors="replace")
    assert done.stdout == b"ready\n"
    obs = check_after_kill(lane.store_dir, lane.log)
    assert (obs.wal_entries, obs.orphans) == ((1, 0) if point == "staged" else (0, 1))
    assert len(lane.log.read_text().splitlines()) == 2  # two commits let through, then killed
