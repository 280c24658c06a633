"""PersistentStore under concurrency: readers during commits, the writer lock, read-only purity.

Readers (threads of this process and separate processes) load every slot in a
loop while a writer process commits; each context must be whole (every tensor,
the config and the metadata carry the stamp of ctx.version) and the versions
one reader sees never go backwards. The writer lock refuses a second writer,
from this process or another, naming the holder's pid, and is free again once
the holder is SIGKILLed. A read-only store changes no byte on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from crash_writer import MODEL_TYPE, check_context, make_context, read_loop

from ctxstore import Context, NotFoundError, WriterLockedError
from ctxstore.store import PersistentStore, StoreView
from ctxstore.store.lock import writer_may_be_running

CHILD = Path(__file__).with_name("crash_writer.py")
TIMEOUT = 120.0  # seconds; a safety net for hung children, never reached when all is well
SLOTS = 2
#: commits the writer makes under the readers: 60 by default (the suite's 10-minute budget),
#: 600 with --long
COMMITS = [pytest.param(60, id="60"), pytest.param(600, marks=pytest.mark.slow, id="600")]
READER_PROCESSES = 2
READER_THREADS = 3


@contextmanager
def child(*args: str, stdin: int | None = None, stderr: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A crash_writer.py child, SIGKILLed on the way out if it is still running."""
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), *args], stdin=stdin, stdout=subprocess.PIPE, stderr=err
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def wait_ready(proc: subprocess.Popen[bytes], stderr: Path) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
    line = proc.stdout.readline() if ready else b""
    assert line == b"ready\n", f"child did not start: {stderr.read_text(errors='replace')}"


def finish(proc: subprocess.Popen[bytes], stderr: Path) -> bytes:
    """Wait for a child that stops by itself; its stdout; fail on a non-zero exit."""
    assert proc.stdout is not None
    proc.wait(timeout=TIMEOUT)
    out = proc.stdout.read()
    assert proc.returncode == 0, f"child failed: {stderr.read_text(errors='replace')[-3000:]}"
    return out


# -- readers during commits -------------------------------------------------------------------


class ReaderThread(threading.Thread):
    """read_loop in a thread; keeps what it saw or the exception that stopped it."""

    def __init__(self, store: PersistentStore, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.store, self.stop = store, stop
        self.seen: dict[int, list[int]] = {}
        self.error: BaseException | None = None
        self.ready = threading.Event()

    def run(self) -> None:
        try:
            self.seen = read_loop(
                self.store,
                range(SLOTS),
                self.stop.is_set,
                deadline=time.monotonic() + TIMEOUT,
                on_first_round=self.ready.set,
            )
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()


@pytest.mark.parametrize("commits", COMMITS)
@pytest.mark.parametrize("retention", [1, 2])
def test_readers_only_ever_see_whole_versions(tmp_path: Path, retention: int, commits: int) -> None:
    store_dir, stop_file = tmp_path / "store", tmp_path / "stop"
    with PersistentStore(store_dir, retention=retention) as writer:
        for slot in range(SLOTS):
            writer.save_context(slot, make_context(slot, 1), model_type=MODEL_TYPE)
    stop = threading.Event()
    with ExitStack() as stack:
        readers = [
            stack.enter_context(
                child("read", str(store_dir), str(stop_file), "--slots", str(SLOTS), stderr=err)
            )
            for err in (tmp_path / f"reader{i}.err" for i in range(READER_PROCESSES))
        ]
        shared = stack.enter_context(PersistentStore(store_dir, readonly=True))
        own = stack.enter_context(PersistentStore(store_dir, readonly=True))
        # two threads share one read-only store (one connection per thread), one has its own
        threads = [ReaderThread(shared if i else own, stop) for i in range(READER_THREADS)]
        for thread in threads:
            stack.callback(thread.join, TIMEOUT)
        stack.callback(stop.set)
        for thread in threads:
            thread.start()
        for i, proc in enumerate(readers):
            wait_ready(proc, tmp_path / f"reader{i}.err")
        for thread in threads:
            thread.ready.wait(TIMEOUT)
        # every reader has loaded version 1 of every slot before the first commit starts
        writer_err = tmp_path / "writer.err"
        argv = ["write", str(store_dir), str(tmp_path / "log"), "--slots", str(SLOTS)]
        argv += ["--retention", str(retention), "--commits", str(commits)]
        with child(*argv, stderr=writer_err) as writer_proc:
            finish(writer_proc, writer_err)
        stop_file.touch()
        stop.set()
        seen_by_process = [
            json.loads(finish(proc, tmp_path / f"reader{i}.err").splitlines()[-1])["seen"]
            for i, proc in enumerate(readers)
        ]
        for thread in threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive()
            if thread.error is not None:
                raise thread.error
        final = own.current_versions()
    assert sum(final.values()) == SLOTS + commits
    views = [{int(k): v for k, v in seen.items()} for seen in seen_by_process]
    views += [thread.seen for thread in threads]
    for seen in views:
        for slot in range(SLOTS):
            # starts at 1 (loaded before the writer began), ends at the final version (a
            # round that began after the writer exited), strictly increasing in between
            assert seen[slot][0] == 1
            assert seen[slot][-1] == final[slot]
            assert seen[slot] == sorted(set(seen[slot]))


def test_load_survives_retention_between_index_read_and_mapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the reader test above hits now and then, made deterministic: the writer
    retires the version a load has just resolved before the load maps its files.
    load_context(slot) resolves the current version again; a numbered load says retired."""
    with (
        PersistentStore(tmp_path / "store", retention=1) as writer,
        PersistentStore(tmp_path / "store", readonly=True) as reader,
    ):
        writer.save_context(0, make_context(0, 1))
        map_tensors = reader._map_tensors
        mapped: list[int] = []
        race = [True]

        def commit_first(slot: int, version: int, manifest: Any, *rest: Any) -> Any:
            if race and race.pop():
                writer.save_context(0, make_context(0, version + 1))  # retires `version`
                writer.wait_background()  # and its files are gone before the load maps them
            mapped.append(version)
            return map_tensors(slot, version, manifest, *rest)

        monkeypatch.setattr(reader, "_map_tensors", commit_first)
        check_context(reader.load_context(0), 0, 2)
        assert mapped == [1, 2]
        race.append(True)
        with pytest.raises(NotFoundError, match="version 2 was retired"):
            reader.load_context(0, 2)
        check_context(reader.load_context(0, "latest"), 0, 3)


# -- the writer lock ------------------------------------------------------------------------------


def test_second_writer_in_the_same_process_is_refused(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    with PersistentStore(store_dir) as first:
        with pytest.raises(WriterLockedError) as refused:
            PersistentStore(store_dir)
        assert refused.value.holder_pid == os.getpid()
        assert f"pid {os.getpid()}" in str(refused.value)
        # the refusal changed nothing for the holder or for readers
        assert first.save_context(0, make_context(0, 1)) == 1
        with PersistentStore(store_dir, readonly=True) as reader:
            check_context(reader.load_context(0), 0, 1)
    with PersistentStore(store_dir) as again:  # close() released the lock
        check_context(again.load_context(0), 0, 1)


def test_second_writer_in_another_process_is_refused(tmp_path: Path) -> None:
    """A child holds the lock; we are refused with its pid; SIGKILL frees the lock."""
    store_dir, err = tmp_path / "store", tmp_path / "holder.err"
    with PersistentStore(store_dir):
        pass
    with child("hold", str(store_dir), stdin=subprocess.PIPE, stderr=err) as holder:
        wait_ready(holder, err)
        with pytest.raises(WriterLockedError) as refused:
            PersistentStore(store_dir)
        assert refused.value.holder_pid == holder.pid
        assert f"pid {holder.pid}" in str(refused.value)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=TIMEOUT)
        assert holder.returncode == -signal.SIGKILL
    with PersistentStore(store_dir) as writer:
        assert writer.verify() == []


def test_another_process_is_refused_while_we_hold_the_lock(tmp_path: Path) -> None:
    store_dir, err = tmp_path / "store", tmp_path / "probe.err"
    with PersistentStore(store_dir):
        with child("probe", str(store_dir), stderr=err) as probe:
            outcome: dict[str, Any] = json.loads(finish(probe, err))
        assert outcome["kind"] == WriterLockedError.kind
        assert outcome["holder_pid"] == os.getpid()
        assert f"pid {os.getpid()}" in outcome["message"]
    with child("probe", str(store_dir), stderr=err) as probe:
        assert json.loads(finish(probe, err)) == {"kind": "opened"}


# -- a read-only store writes nothing -------------------------------------------------------------

#: SQLite's WAL coordination files: a read-only connection may create or map them to take
#: its read locks (that is how WAL readers work); they hold no store data. Creating them
#: also bumps the store directory's mtime, so the root's own entry is left out too.
SQLITE_COORDINATION = {"index.db-wal", "index.db-shm"}


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Name, type, size, mode, mtime_ns and content hash of everything in the store."""
    state: dict[str, tuple[Any, ...]] = {}
    for path in sorted(root.rglob("*")):
        if path.name in SQLITE_COORDINATION:
            continue
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        state[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return state


def build_store(store_dir: Path) -> PersistentStore:
    """A writer over a store with versions, an alias, a pin, a hierarchy and a group."""
    writer = PersistentStore(store_dir, retention=3)
    for version in range(1, 5):
        for slot in (0, 1):
            writer.save_context(slot, make_context(slot, version), model_type=MODEL_TYPE)
    writer.save_context(2, make_context(2, 1), model_type="other")
    writer.set_alias(0, "best", 3)
    writer.pin(1, 2)
    writer.hierarchy.set_parent(1, 0)
    writer.hierarchy.set_parent(2, 1)
    writer.hierarchy.add_to_group(0, "prod")
    writer.hierarchy.add_to_group(2, "prod")
    return writer


def read_everything(store: StoreView) -> None:
    """Every read the store offers, the tensor bytes included; every write refused."""
    for info in store.list_slots():
        for entry in store.list_versions(info.slot):
            ctx = store.load_context(info.slot, entry.version)
            check_context(ctx, info.slot, entry.version)
            assert all(np.asarray(a).tobytes() is not None for a in ctx.weights.values())
            store.get_metadata(info.slot, entry.version)
        for ref in (None, "latest", "current", str(info.current_version)):
            store.load_context(info.slot, ref)
        store.get_aliases(info.slot)
        store.current_version(info.slot)
    check_context(store.load_context(0, "best"), 0, 3)
    assert [s.slot for s in store.list_slots(model_type=MODEL_TYPE)] == [0, 1]
    assert [s.slot for s in store.list_slots(group="prod")] == [0, 2]
    assert store.current_versions() == {0: 4, 1: 4, 2: 1}
    assert store.resolve(0, "best") == 3
    assert store.verify() == []
    assert store.verify(1, rehash=False) == []
    h = store.hierarchy
    assert h.get_parent(2) == 1 and h.get_children(0) == [1] and h.get_root(2) == 0
    assert h.get_ancestors(2) == [0, 1] and h.get_descendants(0) == [1, 2]
    assert h.get_groups(0) == ["prod"] and h.list_by_group("prod") == [0, 2]
    h.nodes(), h.list_groups(), h.stats()
    writes = ("save_context", "set_alias", "delete_alias", "rollback", "pin", "unpin")
    assert not any(hasattr(store, name) for name in (*writes, "apply_retention"))
    hierarchy_writes = ("set_parent", "move_node", "remove_node", "add_to_group")
    assert not any(hasattr(h, name) for name in (*hierarchy_writes, "remove_from_group"))


@pytest.mark.parametrize("writer_open", [False, True], ids=["writer_closed", "writer_open"])
def test_readonly_store_writes_nothing(tmp_path: Path, writer_open: bool) -> None:
    store_dir = tmp_path / "store"
    writer = build_store(store_dir)
    try:
        if not writer_open:
            writer.close()
        writer.wait_background()  # the writer's own deletions and staging are not the reader's
        before = snapshot(store_dir)
        with PersistentStore(store_dir, readonly=True) as reader:
            read_everything(reader)
            # threads get connections of their own; they write nothing either
            worker = threading.Thread(target=read_everything, args=(reader,))
            worker.start()
            worker.join(TIMEOUT)
        assert snapshot(store_dir) == before
    finally:
        writer.close()


def test_context_is_a_value_the_store_does_not_share(tmp_path: Path) -> None:
    """What a reader holds is immutable: its arrays cannot be written through."""
    with PersistentStore(tmp_path / "store") as writer:
        writer.save_context(0, make_context(0, 1))
        ctx: Context = writer.load_context(0)
    with pytest.raises(ValueError, match="read-only"):
        ctx.weights["stamp"][0] = 0
    check_context(ctx, 0, 1)


def _index_fds(store: PersistentStore) -> int:
    index = str(store.root / "index.db")
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += os.readlink(fd).startswith(index)
        except OSError:
            continue  # closed while we listed
    return count


def test_a_threads_read_connection_closes_when_the_thread_ends(tmp_path: Path) -> None:
    """Short-lived threads (commit hooks run in one each) leave no SQLite connection behind.

    SQLite keeps one closed descriptor aside while another connection of the
    process holds locks on the file (and reuses it): so the count is taken
    after a first thread, and must not grow with the number of threads.
    """

    def in_a_thread() -> None:
        seen: list[int | None] = []
        thread = threading.Thread(target=lambda: seen.append(store.current_version(1)))
        thread.start()
        thread.join()
        assert seen == [1]

    with PersistentStore(tmp_path / "store") as store:
        store.save_context(1, Context({"w": np.zeros(4)}))
        assert store.current_version(1) == 1  # this thread's connection, kept
        in_a_thread()
        before = _index_fds(store)
        for _ in range(20):
            in_a_thread()
        assert _index_fds(store) == before
        assert store.current_version(1) == 1
    assert _index_fds(store) == 0


def test_a_live_writer_is_told_from_a_dead_one_without_touching_the_lock(tmp_path: Path) -> None:
    lock = tmp_path / "store" / "LOCK"
    assert not writer_may_be_running(lock)  # no store yet
    with PersistentStore(tmp_path / "store"):
        assert writer_may_be_running(lock)
        with pytest.raises(WriterLockedError):  # the probe took nothing: the lock still holds
            PersistentStore(tmp_path / "store")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    lock.write_text(f"{dead.pid}\n")  # what a killed writer leaves
    assert not writer_may_be_running(lock)
    lock.write_text("1\n")  # init: alive, and not ours to signal
    assert writer_may_be_running(lock)
