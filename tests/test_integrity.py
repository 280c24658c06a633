"""Verify once per host, and self-healing readers (docs/reliability.md).

The daemon hashes each new version once and records it verified; readers that
map it while a daemon runs and its files keep their identity do not hash it
again (counted by wrapping the hashing function in the reader process). A
reader that finds damage reports it, goes on serving the newest intact version,
and the daemon confirms, records, moves the pointer back and announces.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.daemon import DaemonProcess, running_daemon
from support.peers import RawPeer
from support.procs import dies_with_pytest, free_port

import ctxstore.store.checking
import ctxstore.store.reads
import ctxstore.store.staging
from ctxstore import Context, IntegrityError, PersistentStore
from ctxstore.client import publish
from ctxstore.daemon.committer import Committer
from ctxstore.messages import Announce, DamageReport, Ping, Pong, Welcome
from ctxstore.readers import Reader

CHILD = Path(__file__).with_name("integrity_reader.py")
DEADLINE_S = 30.0  # a safety net for waits on other processes, never a measured time


def context(version: int) -> Context:
    return Context({"w": np.arange(4096, dtype="f4") + version, "b": np.full(64, version, "f8")})


def total(version: int) -> float:
    return float(sum(np.asarray(a, "f8").sum() for a in context(version).weights.values()))


def flip_byte(path: Path, offset: int = 200) -> None:
    """Damage a stored file in place (it is read-only: made writable first)."""
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def replace_file(path: Path, *, damage: bool) -> None:
    """Put a copy in place of ``path`` (a new inode), size and mtime kept: only the inode tells."""
    before = path.stat()
    copy = path.with_name(path.name + ".new")
    shutil.copyfile(path, copy)
    if damage:
        flip_byte(copy)
    os.utime(copy, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(copy, path)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ino != before.st_ino


class ReaderChild:
    """tests/integrity_reader.py in its own process."""

    def __init__(self, daemon: DaemonProcess, *flags: str, wait: bool = True) -> None:
        self.proc = subprocess.Popen(
            dies_with_pytest([sys.executable, str(CHILD), str(daemon.store), str(daemon.socket),
                              *flags]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        assert self.readline() == "ready"

    def readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self.readline())
        return answer

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def children() -> Iterator[list[ReaderChild]]:
    started: list[ReaderChild] = []
    yield started
    for child in started:
        child.close()


_SAMPLE = re.compile(r"(ctxstore_(?:damage_reports|version_damaged|commit_checks)\S*) (\S+)")


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.fullmatch(line)
        if match:
            samples[match[1]] = float(match[2])
    return samples


def wait_until(what: str, condition: Any) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


def announcements(peer: RawPeer, count: int) -> list[int]:
    versions = []
    while len(versions) < count:
        message = peer.next()
        if isinstance(message, Announce):
            versions.append(message.version)
        else:
            assert isinstance(message, Ping | Pong), f"{message} after announcements {versions}"
    return versions


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ctxstore.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


# -- real processes -----------------------------------------------------------------------------


def test_readers_keep_serving_the_intact_version_and_the_daemon_moves_back(
    tmp_path: Path, children: list[ReaderChild]
) -> None:
    port = free_port()
    with running_daemon(tmp_path, "--http", f"127.0.0.1:{port}") as daemon:
        assert publish(1, context(1), socket=daemon.socket) == 1
        children += [ReaderChild(daemon, wait=False) for _ in range(2)]

        # Reports are checked, not believed: 3 of an intact version cost one hash, and
        # one of a version that does not exist none; nothing is marked or moved.
        liar = RawPeer(daemon.socket, "liar")
        for _ in range(3):
            liar.send(DamageReport(slot=1, version=1, detail="it is broken, trust me"))
        liar.send(DamageReport(slot=9, version=77, detail="no such version"))

        def all_counted() -> dict[str, float] | None:
            seen = metrics(port)
            reports = sum(v for k, v in seen.items() if k.startswith("ctxstore_damage_reports"))
            return seen if reports == 4 else None

        seen = wait_until("the 4 reports counted", all_counted)
        assert seen['ctxstore_damage_reports_total{outcome="refuted"}'] == 1  # hashed once
        assert seen['ctxstore_damage_reports_total{outcome="unknown_version"}'] == 1
        assert seen['ctxstore_damage_reports_total{outcome="confirmed"}'] == 0
        liar.close()

        for child in children:
            child.wait_ready()
            first = child.ask("get 1")
            assert (first["version"], first["sum"]) == (1, total(1))
            assert (first["hashed"], first["trusted"], first["hash_calls"]) == (0, 1, 0)
        watcher = RawPeer(daemon.socket, "watcher")
        watcher.subscribe(slots=(1,))
        assert publish(1, context(2), socket=daemon.socket) == 2
        flip_byte(daemon.store / "slots/1/2/0.npy")

        calls = []
        for child in children:  # no error: the intact version, its numbers exact
            answer = child.ask("get 1")
            assert "error" not in answer, answer
            assert (answer["version"], answer["sum"], answer["trusted"]) == (1, total(1), 1)
            calls.append(answer["hash_calls"])
            if child is children[0]:  # the first to look finds the damage (its mtime moved:
                assert answer["damaged"] == 1  # hashed, not trusted) and reports it; the
            # second finds it too, or recorded damaged, or the daemon's move back done
        assert announcements(watcher, 2) == [2, 1]  # the commit, then the daemon's move back
        with PersistentStore(daemon.store, readonly=True) as store:
            assert store.current_version(1) == 1
            assert (1, 2) in store.damaged_versions()
        for child, before in zip(children, calls, strict=True):
            again = child.ask("get 1")
            assert (again["version"], again["hash_calls"]) == (1, before)  # nothing hashed

        seen = metrics(port)
        assert seen['ctxstore_damage_reports_total{outcome="confirmed"}'] == 1
        assert seen['ctxstore_damage_reports_total{outcome="refuted"}'] == 1  # the liar's
        assert seen['ctxstore_version_damaged{slot="1",version="2"}'] == 1
        assert seen['ctxstore_commit_checks_total{result="verified"}'] == 2
        quick = cli("verify", "1", "--quick", "--store", str(daemon.store))
        assert quick.returncode == 1
        assert "slot 1 version 2" in quick.stdout
        assert "recorded damaged" in quick.stdout
        assert "version 1" not in quick.stdout


def test_only_a_version_the_daemon_verified_and_nobody_replaced_skips_the_hash(
    tmp_path: Path, children: list[ReaderChild]
) -> None:
    with PersistentStore(tmp_path / "store") as writer:  # no daemon: nothing is recorded
        for version in (1, 2, 3):
            writer.save_context(1, context(version))
    with running_daemon(tmp_path) as daemon:  # which hashes the current version at start
        reader = ReaderChild(daemon)
        children.append(reader)
        adopted = reader.ask("get 1")
        assert (adopted["version"], adopted["sum"]) == (3, total(3))
        assert (adopted["hashed"], adopted["trusted"], adopted["hash_calls"]) == (0, 1, 0)

        # the same bytes in a new file (size and mtime kept): hashed again, and served
        assert publish(1, context(4), socket=daemon.socket) == 4
        replace_file(daemon.store / "slots/1/4/1.npy", damage=False)
        replaced = reader.ask("get 1")
        assert (replaced["version"], replaced["sum"]) == (4, total(4))
        assert (replaced["hashed"], replaced["hash_calls"]) == (1, 2)

        # a damaged file in a new inode, size and mtime kept: the identity check sends it
        # to the hash, which catches it; the reader serves the version before
        assert publish(1, context(5), socket=daemon.socket) == 5
        replace_file(daemon.store / "slots/1/5/0.npy", damage=True)
        caught = reader.ask("get 1")
        assert (caught["version"], caught["sum"], caught["damaged"]) == (4, total(4), 1)
        assert caught["hashed"] == 2
        with PersistentStore(daemon.store, readonly=True) as store:
            wait_until("the move back", lambda: store.current_version(1) == 4)
    # no daemon: a reader maps cold, and hashes what the daemon once vouched for
    cold = ReaderChild(daemon, "--no-connect")
    children.append(cold)
    answer = cold.ask("get 1")
    assert (answer["version"], answer["sum"]) == (4, total(4))
    assert (answer["hashed"], answer["trusted"]) == (1, 0)
    assert answer["hash_calls"] == 2  # one per tensor file


# -- in one process -----------------------------------------------------------------------------


def _store_with(tmp_path: Path, versions: Iterable[int]) -> PersistentStore:
    store = PersistentStore(tmp_path / "store")
    for version in versions:
        store.save_context(1, context(version))
    return store


def test_a_record_from_another_boot_or_none_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _store_with(tmp_path, (1, 2)) as store:
        assert store.record_check(1, 2) == []
        with PersistentStore(store.root, readonly=True) as reader:
            reader.load_context(1, verify=True, trust_verified=True)
            reader.load_context(1, 1, verify=True, trust_verified=True)  # never recorded
            assert (reader.versions_trusted, reader.versions_hashed) == (1, 1)
            reader.load_context(1, 2, verify=True)  # the caller knows of no daemon
            assert reader.versions_hashed == 2
            monkeypatch.setattr(ctxstore.store.reads, "boot_id", lambda: "another-boot")
            reader.load_context(1, 2, verify=True, trust_verified=True)
            assert (reader.versions_trusted, reader.versions_hashed) == (1, 3)


def test_a_version_recorded_damaged_is_refused_named_and_repaired_away(tmp_path: Path) -> None:
    with _store_with(tmp_path, (1, 2, 3)) as store:
        store.mark_damaged(1, 3, "a reader found tensor 'w' changed")
        with PersistentStore(store.root, readonly=True) as reader:
            with pytest.raises(IntegrityError, match="recorded damaged"):
                reader.load_context(1, verify=True)
            assert reader.versions_hashed == 0
        problems = store.verify(rehash=False)
        assert [(p.kind, p.slot, p.version) for p in problems] == [("marked_damaged", 1, 3)]
        assert [(r.from_version, r.to_version) for r in store.repair()] == [(3, 2)]


def test_a_version_written_wrong_is_caught_before_it_is_announced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With reread_after_commit the daemon hashes what landed on disk, not what it meant
    to write."""
    store = _store_with(tmp_path, (1,))
    announced: list[Announce] = []
    committer = Committer(store, None, announced.append)
    committer.reread_after_commit = True
    write = ctxstore.store.staging.write_new_file

    def write_then_rot(path: Any, chunks: Any, *, sync: bool = True) -> None:
        write(path, chunks, sync=sync)
        flip_byte(Path(path))

    monkeypatch.setattr(ctxstore.store.staging, "write_new_file", write_then_rot)
    with store:
        with pytest.raises(IntegrityError, match="version 2 was committed but"):
            asyncio.run(committer.commit(1, context(2)))
        monkeypatch.undo()
        assert store.current_version(1) == 1
        assert list(store.damaged_versions()) == [(1, 2)]
        assert [a.version for a in announced] == [1]
        assert committer.checked_after_commit == {"verified": 0, "damaged": 1}


class _Client:
    """Stands in for the reader's socket thread: records what the reader posts."""

    connected = True

    def __init__(self) -> None:
        self.posted: list[object] = []

    def post(self, message: object) -> None:
        self.posted.append(message)

    def close(self, timeout: float = 2.0) -> bool:
        return True

    def abandon(self) -> None:
        pass


def test_a_reader_stops_reporting_to_a_daemon_that_does_not_know_the_frame(
    tmp_path: Path,
) -> None:
    with _store_with(tmp_path, (1, 2, 3)) as store:
        pass
    flip_byte(store.root / "slots/1/3/0.npy")
    with Reader(store.root, connect=False) as reader:
        client = _Client()
        reader._client = client  # type: ignore[assignment]
        reader.session_started(Welcome(session=1, daemon_pid=100))
        assert reader.get(1).version == 2  # the intact one, and a report
        assert [(m.slot, m.version) for m in client.posted if isinstance(m, DamageReport)] == [
            (1, 3)
        ]
        # a daemon from before the frame ends the session on it, and is not told again
        reader.session_ended(
            "fatal error from the daemon: remote_protocol: unknown frame type 'damage_report'"
        )
        again = list(reader.session_started(Welcome(session=2, daemon_pid=100)))
        assert not any(isinstance(m, DamageReport) for m in again)
        # a new daemon (restarted, upgraded) hears of it
        fresh = list(reader.session_started(Welcome(session=3, daemon_pid=200)))
        assert [(m.slot, m.version) for m in fresh if isinstance(m, DamageReport)] == [(1, 3)]


def test_a_verified_version_whose_record_was_forged_since_is_still_refused(
    tmp_path: Path,
) -> None:
    """The daemon's record vouches for the files' bytes; the index rows that say how to
    read them are checked against each file's .npy header even when the hash is skipped."""
    from support.contexts import store_with_one_version, tamper

    store_dir = tmp_path / "store"
    store_with_one_version(store_dir)
    with PersistentStore(store_dir) as writer:
        assert writer.record_check(1, 2) == []
    tamper(store_dir, {1: "'<i4'"}, {"dtype": "'<i4'"})  # same size: the files still match
    with PersistentStore(store_dir, readonly=True) as reader:
        with pytest.raises(IntegrityError, match=r"\.npy header disagrees"):
            reader.load_context(1, verify=True, trust_verified=True)
        assert reader.versions_hashed == 0  # refused on the header, without a hash


def test_a_new_version_is_recorded_verified_from_its_commit_without_reading_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default the record comes from the checksums the commit took as it wrote: the
    daemon reads nothing back (no hash_file call), yet a reader adopting the version skips
    its own hash, and a file that lost its size before the record is still caught."""
    store = _store_with(tmp_path, (1,))
    announced: list[Announce] = []
    committer = Committer(store, None, announced.append)
    hashed: list[str] = []
    real_hash = ctxstore.store.checking.hash_file

    def counting(path: str) -> Any:
        hashed.append(path)
        return real_hash(path)

    monkeypatch.setattr(ctxstore.store.checking, "hash_file", counting)
    with store:
        assert asyncio.run(committer.commit(1, context(2))) == 2
        assert hashed == []
        assert committer.checked_after_commit == {"verified": 1, "damaged": 0}
        assert [a.version for a in announced] == [2]
        problems, _ = store.check_version(1, 2)
        assert problems == []
        write = ctxstore.store.staging.write_new_file

        def write_then_truncate(path: Any, chunks: Any, *, sync: bool = True) -> None:
            write(path, chunks, sync=sync)
            os.chmod(path, 0o600)
            os.truncate(path, 8)

        monkeypatch.setattr(ctxstore.store.staging, "write_new_file", write_then_truncate)
        with pytest.raises(IntegrityError, match="version 3 was committed but"):
            asyncio.run(committer.commit(1, context(3)))
        assert store.current_version(1) == 2
        assert hashed and all("/slots/1/2/" in path for path in hashed)  # the fallback's check


def test_a_new_version_is_recorded_verified_in_its_own_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's verified record rides in the version's own COMMIT (issue 21): from the
    moment a reader can see the version in the index, it is vouched for, so no reader
    hashes it for want of a record written a transaction later."""
    import ctxstore.store.commit
    from ctxstore.faults import crash_point

    store = _store_with(tmp_path, (1,))
    committer = Committer(store, None, lambda _announce: None)
    seen: list[tuple[int | None, int, int]] = []

    def probe(name: str) -> None:
        if name == "committed":  # right after the COMMIT, before anything else runs
            with PersistentStore(store.root, readonly=True) as reader:
                reader.load_context(1, verify=True, trust_verified=True)
                seen.append((reader.current_version(1), reader.versions_trusted,
                             reader.versions_hashed))  # fmt: skip
        crash_point(name)

    monkeypatch.setattr(ctxstore.store.commit, "crash_point", probe)
    with store:
        assert asyncio.run(committer.commit(1, context(2))) == 2
        assert committer.checked_after_commit == {"verified": 1, "damaged": 0}
    assert seen == [(2, 1, 0)]
