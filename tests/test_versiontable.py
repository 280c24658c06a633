"""The shared-memory version table: layout round trips, the seqlock under real
concurrency, crash reclaim, clean shutdown and bad input."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import timeit
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import posix_ipc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxstore.errors import (
    ClosedError,
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    StorageError,
)
from ctxstore.versiontable import (
    DEFAULT_CAPACITY,
    ENTRY_SIZE,
    HEADER_SIZE,
    Entry,
    VersionTable,
    VersionTableWriter,
    segment_name,
)

CHILD_TIMEOUT = 60.0
DEV_SHM = Path("/dev/shm")


def unique_name() -> str:
    return f"/ctxstore-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def unlink_quietly(name: str) -> None:
    with suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory(name)


def shm_exists(name: str) -> bool:
    try:
        posix_ipc.SharedMemory(name, read_only=True).close_fd()
    except posix_ipc.ExistentialError:
        return False
    return True


def word(fd: int, at: int) -> int:
    """The native 8-byte integer at offset ``at`` of a segment."""
    return int.from_bytes(os.pread(fd, 8, at), sys.byteorder)


@pytest.fixture
def name() -> Iterator[str]:
    """A fresh segment name, unlinked after the test whatever happened."""
    segment = unique_name()
    yield segment
    unlink_quietly(segment)


@pytest.fixture
def writer(name: str) -> Iterator[VersionTableWriter]:
    table = VersionTable.create(name, 64, clock=lambda: 1_000)
    yield table
    table.close()


@pytest.fixture
def reader(writer: VersionTableWriter) -> Iterator[VersionTable]:
    table = VersionTable.attach(writer.name)
    yield table
    table.close()


@contextmanager
def child(script: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """Run ``script`` in a fresh interpreter; killed by pid if it outlives the block."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=CHILD_TIMEOUT)


def read_line(proc: subprocess.Popen[str]) -> str:
    """The child's next stdout line, failing (not hanging) if it never comes."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], CHILD_TIMEOUT)
    assert ready, "child did not answer in time"
    line = proc.stdout.readline()
    assert line, f"child exited early: {proc.stderr.read() if proc.stderr else ''}"
    return line.strip()


# -- naming -------------------------------------------------------------------


def test_segment_name_is_short_deterministic_and_follows_the_real_path(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    link = tmp_path / "link"
    link.symlink_to(store)

    name = segment_name(store)

    assert name == segment_name(str(store))
    assert name == segment_name(link)
    assert name == segment_name(tmp_path / "store" / ".." / "store")
    assert name != segment_name(tmp_path)
    assert name.startswith("/ctxstore-")
    assert len(name) == len("/ctxstore-") + 16
    assert "/" not in name[1:]
    int(name.removeprefix("/ctxstore-"), 16)


# -- round trips ----------------------------------------------------------------


def test_round_trip_writer_and_reader(writer: VersionTableWriter, reader: VersionTable) -> None:
    writer.set(7, 1)
    writer.set(7, 2, committed_at_ns=55)
    writer.set(0, 9)

    assert writer.get(7) == 2
    assert reader.get(7) == 2
    assert reader.get(0) == 9
    assert reader.get(8) is None
    assert reader.entry(7) == Entry(2, 55)
    assert reader.entry(0) == Entry(9, 1_000)  # the injected clock
    assert reader.snapshot() == {0: 9, 7: 2}
    assert reader.used == 2


def test_header_describes_the_creating_daemon(
    writer: VersionTableWriter, reader: VersionTable
) -> None:
    assert reader.incarnation == writer.incarnation != 0
    assert reader.daemon_pid == os.getpid()
    assert reader.created_at_ns == 1_000
    assert reader.capacity == writer.capacity == 64
    assert not reader.closed
    assert reader.is_current()
    assert writer.is_current()


def test_default_capacity_and_mode(name: str) -> None:
    with VersionTable.create(name, mode=0o640) as table:
        assert table.capacity == DEFAULT_CAPACITY
        if DEV_SHM.is_dir():
            stat = (DEV_SHM / name[1:]).stat()
            assert stat.st_mode & 0o777 == 0o640
            assert stat.st_size == HEADER_SIZE + DEFAULT_CAPACITY * ENTRY_SIZE


def test_two_creations_have_different_incarnations(name: str) -> None:
    with VersionTable.create(name, 8) as first:
        incarnation = first.incarnation
    with VersionTable.create(name, 8) as second:
        assert second.incarnation != incarnation


def test_remove_reports_absent_and_the_slot_comes_back(
    writer: VersionTableWriter, reader: VersionTable
) -> None:
    writer.set(3, 4)
    assert reader.get(3) == 4

    writer.remove(3)
    writer.remove(99)  # never set: nothing to do

    assert reader.get(3) is None
    assert reader.entry(3) is None
    assert reader.snapshot() == {}

    writer.set(3, 5)
    assert reader.get(3) == 5
    assert writer.used == 1  # the entry was reused, not claimed again


def test_many_slots_with_collisions(name: str) -> None:
    rng = np.random.default_rng(7)
    slots = [int(s) for s in rng.choice(2**31 - 1, size=900, replace=False)]
    slots += list(range(100))  # dense ids, and 0 and the maximum
    slots.append(2**31 - 1)
    slots = list(dict.fromkeys(slots))
    expected = {slot: i + 1 for i, slot in enumerate(slots)}
    with VersionTable.create(name, 1024) as writer, VersionTable.attach(name) as reader:
        for slot, version in expected.items():
            writer.set(slot, version)
        writer.set_many({slot: version + 1 for slot, version in expected.items() if slot % 2})

        want = {slot: version + (slot % 2) for slot, version in expected.items()}
        assert {slot: reader.get(slot) for slot in slots} == want
        assert reader.snapshot() == want
        assert reader.used == len(slots)
        assert all(reader.get(slot) is None for slot in range(100, 200) if slot not in want)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["set", "remove", "set_many"]),
            st.sampled_from([0, 1, 2, 3, 8, 16, 24, 1000, 2**31 - 1]),
            st.integers(1, 2**63 - 1),
        ),
        max_size=40,
    )
)
def test_table_matches_a_dict_model(ops: list[tuple[str, int, int]]) -> None:
    """Any sequence of writes leaves the table equal to a plain dict, as seen by a reader."""
    name = unique_name()
    model: dict[int, int] = {}
    try:
        with VersionTable.create(name, 16) as writer, VersionTable.attach(name) as reader:
            for op, slot, version in ops:
                if op == "set":
                    writer.set(slot, version)
                    model[slot] = version
                elif op == "remove":
                    writer.remove(slot)
                    model.pop(slot, None)
                else:
                    writer.set_many({slot: version, (slot + 1) % 2**31: version})
                    model[slot] = model[(slot + 1) % 2**31] = version
                assert reader.get(slot) == model.get(slot)
            assert reader.snapshot() == model
    finally:
        unlink_quietly(name)


# -- capacity and bad input -------------------------------------------------------


def test_full_table_refuses_new_slots_only(
    writer: VersionTableWriter, reader: VersionTable
) -> None:
    writer.set_many(dict.fromkeys(range(64), 1))

    with pytest.raises(StorageError, match="full"):
        writer.set(64, 1)
    with pytest.raises(StorageError, match="full"):
        writer.set_many({0: 2, 64: 1})

    assert reader.get(0) == 1  # set_many applied nothing
    writer.set(0, 3)  # existing slots still update
    assert reader.get(0) == 3
    assert reader.get(64) is None  # a miss on a full table terminates


@pytest.mark.parametrize(
    ("slot", "version"),
    [(-1, 1), (2**31, 1), ("1", 1), (1.0, 1), (True, 1), (1, 0), (1, -5), (1, 2**63), (1, "2")],
)
def test_invalid_slot_or_version_is_refused(
    writer: VersionTableWriter, slot: object, version: object
) -> None:
    with pytest.raises(InvalidInputError):
        writer.set(slot, version)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        writer.set_many({2: 2, slot: version})  # type: ignore[dict-item]
    assert writer.get(2) is None  # nothing of the batch was applied


@pytest.mark.parametrize("slot", [-1, 2**31, "3", None])
def test_reader_refuses_invalid_slot(reader: VersionTable, slot: object) -> None:
    with pytest.raises(InvalidInputError):
        reader.get(slot)  # type: ignore[arg-type]


@pytest.mark.parametrize("capacity", [0, 7, 12, 100, 2**25, True, 64.0])
def test_invalid_capacity_is_refused(name: str, capacity: object) -> None:
    with pytest.raises(InvalidInputError, match="power of two"):
        VersionTable.create(name, capacity)  # type: ignore[arg-type]
    assert not shm_exists(name)


@pytest.mark.parametrize("bad", ["no-slash", "/", "/a/b", ""])
def test_invalid_name_is_refused(bad: str) -> None:
    with pytest.raises(InvalidInputError):
        VersionTable.attach(bad)
    with pytest.raises(InvalidInputError):
        VersionTable.create(bad)


def test_attach_to_missing_segment(name: str) -> None:
    with pytest.raises(NotFoundError, match="no version table"):
        VersionTable.attach(name)
    with pytest.raises(KeyError):
        VersionTable.attach(name)


def test_attach_to_an_uninitialised_or_foreign_segment(name: str) -> None:
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096)
    try:
        with pytest.raises(NotFoundError, match="not initialised"):
            VersionTable.attach(name)
        os.pwrite(shm.fd, b"NOTOURS!", 0)
        with pytest.raises(IntegrityError, match="not a ctxstore version table"):
            VersionTable.attach(name)
    finally:
        shm.close_fd()


def test_attach_refuses_another_layout(writer: VersionTableWriter) -> None:
    shm = posix_ipc.SharedMemory(writer.name)
    try:
        os.pwrite(shm.fd, (99).to_bytes(4, sys.byteorder), 8)
    finally:
        shm.close_fd()
    with pytest.raises(IntegrityError, match="layout 99"):
        VersionTable.attach(writer.name)


# -- the seqlock ------------------------------------------------------------------


def test_entry_caught_mid_write_reads_as_unknown(
    writer: VersionTableWriter, reader: VersionTable
) -> None:
    """A reader that never gets a consistent snapshot reports None, not a guess."""
    writer.set(5, 1)
    assert reader.get(5) == 1
    shm = posix_ipc.SharedMemory(writer.name)
    try:
        entries = (HEADER_SIZE + i * ENTRY_SIZE for i in range(writer.capacity))
        entry_at = next(at for at in entries if word(shm.fd, at + 32) == 6)  # slot 5's key
        seq_begin = os.pread(shm.fd, 8, entry_at + 24)
        os.pwrite(shm.fd, (2).to_bytes(8, sys.byteorder), entry_at + 24)  # a write "in flight"
        assert reader.get(5) is None
        assert reader.entry(5) is None
        os.pwrite(shm.fd, seq_begin, entry_at + 24)  # the write "finishes"
    finally:
        shm.close_fd()
    assert reader.get(5) == 1


def checksum(slot: int, version: int) -> int:
    """The committed_at stamp the stress writers pair with each version."""
    return (version * 1_000_003 + slot) % 2**63


def test_reader_threads_never_see_a_torn_or_older_value(
    writer: VersionTableWriter, reader: VersionTable
) -> None:
    slots = range(4)
    last = 3000
    bad: list[str] = []
    done = threading.Event()

    def write() -> None:
        for version in range(1, last + 1):
            for slot in slots:
                writer.set(slot, version, committed_at_ns=checksum(slot, version))
        done.set()

    def read() -> None:
        seen = dict.fromkeys(slots, 0)
        while not done.is_set() or any(v < last for v in seen.values()):
            for slot in slots:
                entry = reader.entry(slot)
                version = reader.get(slot)  # None ("unknown") is allowed, a wrong value is not
                if entry is not None:
                    if entry.committed_at_ns != checksum(slot, entry.version):
                        bad.append(f"torn {slot}: {entry}")
                    if entry.version < seen[slot]:
                        bad.append(f"backwards {slot}: {seen[slot]} -> {entry}")
                    seen[slot] = entry.version
                if version is not None:
                    if version < seen[slot]:
                        bad.append(f"backwards {slot}: {seen[slot]} -> {version}")
                    seen[slot] = version
            if bad:
                return

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the threads as finely as the GIL allows
    try:
        threads = [threading.Thread(target=read) for _ in range(2)]
        threads.append(threading.Thread(target=write))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=CHILD_TIMEOUT)
    finally:
        sys.setswitchinterval(old_interval)
    assert not any(thread.is_alive() for thread in threads)
    assert bad == []


READER_PROCESS = """
    import json, sys, time
    from ctxstore.versiontable import VersionTable

    name, nslots, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    table = VersionTable.attach(name)
    print("ready", flush=True)
    seen = [0] * nslots
    bad, reads, distinct = [], 0, 0
    deadline = time.monotonic() + 50
    while min(seen) < last and time.monotonic() < deadline and len(bad) < 10:
        for slot in range(nslots):
            entry = table.entry(slot)
            reads += 1
            if entry is None:
                continue
            if entry.committed_at_ns != (entry.version * 1_000_003 + slot) % 2**63:
                bad.append(f"torn {slot}: {entry}")
            if entry.version < seen[slot]:
                bad.append(f"backwards {slot}: {seen[slot]} -> {entry.version}")
            distinct += entry.version != seen[slot]
            seen[slot] = max(seen[slot], entry.version)
    print(json.dumps({"seen": seen, "bad": bad, "reads": reads, "distinct": distinct}))
"""


def test_reader_processes_see_every_update_in_order(
    writer: VersionTableWriter,
) -> None:
    """Two reader processes run truly in parallel with the writer on another core."""
    nslots, last = 4, 20_000
    with (
        child(READER_PROCESS, writer.name, str(nslots), str(last)) as first,
        child(READER_PROCESS, writer.name, str(nslots), str(last)) as second,
    ):
        assert read_line(first) == "ready"
        assert read_line(second) == "ready"
        for version in range(1, last + 1):
            for slot in range(nslots):
                writer.set(slot, version, committed_at_ns=checksum(slot, version))
        results = [json.loads(read_line(proc)) for proc in (first, second)]

    for result in results:
        assert result["bad"] == []
        assert result["seen"] == [last] * nslots
        assert result["distinct"] >= nslots  # it did observe the table move


# -- lifecycle ----------------------------------------------------------------------


def test_clean_close_and_unlink_leave_nothing(name: str) -> None:
    writer = VersionTable.create(name, 8)
    reader = VersionTable.attach(name)
    writer.set(1, 1)

    writer.close()
    assert reader.closed
    assert not reader.is_current()
    assert reader.get(1) == 1  # the pages stay valid while mapped
    assert writer.unlink()
    assert not writer.unlink()

    assert not shm_exists(name)
    if DEV_SHM.is_dir():
        assert not (DEV_SHM / name[1:]).exists()
    with pytest.raises(NotFoundError):
        VersionTable.attach(name)
    reader.close()


def test_with_block_closes_and_unlinks(name: str) -> None:
    with VersionTable.create(name, 8) as writer:
        writer.set(1, 1)
    assert not shm_exists(name)


def test_use_after_close_raises_closed_error(
    writer: VersionTableWriter, reader: VersionTable
) -> None:
    writer.set(1, 1)
    assert reader.get(1) == 1  # offset now cached: the hot path itself must notice

    reader.close()
    reader.close()
    for call in (lambda: reader.get(1), lambda: reader.get(2), lambda: reader.entry(1)):
        with pytest.raises(ClosedError):
            call()
    with pytest.raises(ClosedError):
        reader.snapshot()
    with pytest.raises(ClosedError):
        _ = reader.incarnation

    writer.close()
    with pytest.raises(ClosedError):
        writer.set(1, 2)
    with pytest.raises(ClosedError):
        writer.remove(1)
    assert "closed" in repr(writer)


def test_existing_segment_without_reclaim_is_a_conflict(writer: VersionTableWriter) -> None:
    with pytest.raises(ConflictError, match="already exists"):
        VersionTable.create(writer.name, 8, reclaim_stale=False)
    assert writer.is_current()


def test_unlink_never_removes_a_successor(name: str) -> None:
    old = VersionTable.create(name, 8)
    new = VersionTable.create(name, 8)  # reclaims: old is now stale
    try:
        assert not old.is_current()
        assert not old.unlink()
        assert new.is_current()
        assert VersionTable.attach(name).incarnation == new.incarnation
    finally:
        old.close()
        new.close()


CRASHING_DAEMON = """
    import select, sys
    from ctxstore.versiontable import VersionTable

    table = VersionTable.create(sys.argv[1], 8)
    table.set(1, 41)
    print(table.incarnation, flush=True)
    select.select([sys.stdin], [], [], 60)  # wait to be killed; exit by itself otherwise
"""


def test_segment_of_a_killed_daemon_is_reclaimed(name: str) -> None:
    with child(CRASHING_DAEMON, name) as daemon:
        old_incarnation = int(read_line(daemon))
        stale = VersionTable.attach(name)
        assert stale.daemon_pid == daemon.pid
        os.kill(daemon.pid, signal.SIGKILL)
        assert daemon.wait(timeout=CHILD_TIMEOUT) == -signal.SIGKILL

    try:
        assert shm_exists(name)
        assert not stale.closed  # nobody closed it: it was a crash
        assert stale.is_current()
        assert stale.get(1) == 41

        with VersionTable.create(name, 8) as writer:
            assert writer.incarnation != old_incarnation
            assert writer.daemon_pid == os.getpid()
            assert not stale.is_current()
            assert stale.get(1) == 41  # the old mapping stays readable until dropped
            with VersionTable.attach(name) as fresh:
                assert fresh.incarnation == writer.incarnation
                assert fresh.get(1) is None
                writer.set(1, 42)
                assert fresh.get(1) == 42
            assert stale.get(1) == 41
    finally:
        stale.close()


# -- cost -------------------------------------------------------------------------


def test_get_hit_cost_is_reported(
    writer: VersionTableWriter, reader: VersionTable, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a timed assertion: prints the per-call cost of a hit for the record."""
    writer.set(5, 3)
    assert reader.get(5) == 3
    number = 100_000
    best = min(timeit.repeat("get(5)", globals={"get": reader.get}, number=number, repeat=3))
    with capsys.disabled():
        print(f"\n[versiontable] get() hit: {best / number * 1e9:.0f} ns per call")
