"""Protocol 2's version record: a new version's announcement carries what a reader needs to
map it (config, metadata, tensor layout, file identities), so it reads no index.

The daemon half runs an in-process daemon with raw peers of each protocol; the reader
half runs a Reader against the fake daemon, which announces whatever record a test
gives it. Waits are bounded; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.fake_daemon import WAIT, Env, make_env
from support.inprocess import commit, running
from support.peers import AsyncPeer

from ctxstore import Context
from ctxstore.integrity import identity_of
from ctxstore.protocol import (
    Ack,
    Announce,
    Connection,
    DamageReport,
    Hello,
    Role,
    Subscribe,
    Subscribed,
    Welcome,
    encode_frame,
)
from ctxstore.readers import Reader
from ctxstore.readers.connection import _Session
from ctxstore.readers.handler import ReaderSessionHandler
from ctxstore.store import PersistentStore, layout
from ctxstore.store.npyfile import dtype_from_text
from ctxstore.wire import DEFAULT_MAX_FRAME_SIZE, VersionRecord

# -- the daemon: who is sent a record, and what it says -----------------------------------


async def _peer(path: Path, protocol: int) -> AsyncPeer:
    peer = AsyncPeer(*await asyncio.open_unix_connection(str(path)))
    peer.conn = Connection(Role.CLIENT)
    await peer.send(Hello(protocol=protocol, role="reader", name=f"p{protocol}", pid=os.getpid()))
    welcome = await peer.next()
    assert isinstance(welcome, Welcome) and welcome.protocol == protocol
    await peer.send(Subscribe(request_id=1, slots=(1,)))
    assert isinstance(await peer.next(), Subscribed)
    return peer


async def _announce(peer: AsyncPeer) -> Announce:
    message = await asyncio.wait_for(peer.next(), WAIT)
    assert isinstance(message, Announce)
    return message


def test_a_new_version_carries_its_record_to_protocol_2_readers_only(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, http="off") as daemon:
            assert daemon.store is not None and daemon.committer is not None
            new, old = await _peer(daemon.config.socket, 2), await _peer(daemon.config.socket, 1)
            version = await commit(daemon, 1, 2.0)
            told, plain = await _announce(new), await _announce(old)
            assert (told.version, plain.version) == (version, version)
            assert plain.record is None  # a protocol-1 reader gets what it always got
            record = told.record
            assert record is not None
            ((name, dtype, shape, offset, nbytes),) = record.tensors
            assert (name, dtype_from_text(dtype), shape, nbytes) == ("w", np.float32, (4,), 16)
            assert offset >= 64
            assert (record.config, record.metadata) == ('{"layers":2}', '{"loss":2.0}')
            path = layout.tensor_path_str(str(daemon.store.root), 1, version, 0)
            assert record.files == identity_of(os.stat(path))
            # a pointer move carries none: readers read the store for it
            await daemon.committer.move_pointer(1, version - 1 if version > 1 else version)
            assert (await _announce(new)).record is None
            await new.close()
            await old.close()

    asyncio.run(main())


def test_the_commit_keeps_the_record_it_wrote_for_its_announcement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The committer announces the record its commit's transaction wrote, read from no
    index: the very record a read of the index gives; an older version is read back."""
    with PersistentStore(tmp_path / "store") as store:
        weights = {"a": np.arange(4, dtype=np.float32), "b": np.ones((2, 3), np.int64)}
        context = Context(weights, {"layers": 2}, {"loss": 0.5})
        first = store.save_context(1, context, record_verified=True)
        second = store.save_context(1, context, record_verified=True)
        read_back = store.announced_record(1, second)
        older = store.announced_record(1, first)
        assert read_back is not None and older is not None

        def no_reads(*args: Any) -> Any:
            raise AssertionError("the index was read")

        monkeypatch.setattr(store, "_query", no_reads)
        assert store.committed_record(1, second) == read_back
        monkeypatch.undo()
        assert store.committed_record(1, first) == older  # not the last commit: the index
        assert store.save_context(2, context) == 1  # not recorded verified: none kept
        assert store.committed_record(2, 1) is None


def test_a_version_with_no_tensors_is_announced_without_a_record(tmp_path: Path) -> None:
    """A record holds 1 to 4096 tensors on the wire; a version with none was sent one,
    and every protocol-2 peer refused the frame and lost its session."""

    async def main() -> None:
        async with running(tmp_path, http="off") as daemon:
            assert daemon.committer is not None
            peer = await _peer(daemon.config.socket, 2)
            version = await daemon.committer.commit(1, Context({}, {"empty": True}, {}))
            told = await _announce(peer)
            assert (told.version, told.record) == (version, None)
            after = await commit(daemon, 1, 2.0)  # the session is still up
            assert (await _announce(peer)).version == after
            await peer.close()

    asyncio.run(main())


def test_records_can_be_turned_off(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, http="off", announce_record_bytes=0) as daemon:
            peer = await _peer(daemon.config.socket, 2)
            await commit(daemon, 1)
            assert (await _announce(peer)).record is None
            await peer.close()

    asyncio.run(main())


def test_a_record_that_cannot_be_read_back_never_delays_the_announcement(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with running(tmp_path, http="off") as daemon:
            assert daemon.store is not None and daemon.committer is not None
            peer = await _peer(daemon.config.socket, 2)
            announced: list[Announce] = []
            real_announce, real_warm = daemon.committer._announce, daemon.store._warm

            def unreadable(slot: int, version: int) -> None:
                raise ValueError("a manifest msgpack cannot read")

            warmed_after: list[int] = []

            def warm(*args: Any, **kwargs: Any) -> Any:
                warmed_after.append(len(announced))  # the store logs a chore's exception
                return real_warm(*args, **kwargs)

            def announce(message: Announce) -> None:
                announced.append(message)
                real_announce(message)

            daemon.store.committed_record = unreadable  # type: ignore[method-assign,assignment]
            daemon.store._warm = warm  # type: ignore[method-assign]
            daemon.committer._announce = announce
            version = await commit(daemon, 1)
            assert [(a.version, a.record) for a in announced] == [(version, None)]
            assert warmed_after == [1]  # announced from the commit thread, before its chores
            assert (await _announce(peer)).version == version
            await peer.close()

    asyncio.run(main())


def test_a_record_too_large_for_a_readers_frame_is_left_out(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, http="off", max_frame_size=4 << 20) as daemon:
            big = VersionRecord("x" * (1 << 20), "{}", (("w", "<f4", (4,), 128, 16),), (1,) * 4)
            announce = Announce(slot=1, version=2, seq=1, committed_at=0, record=big)
            encoded = daemon._announce_frame(announce, True)
            assert encoded is not None
            assert encoded[0].record is None and len(encoded[1]) <= DEFAULT_MAX_FRAME_SIZE

    asyncio.run(main())


def test_the_commit_thread_lets_the_loop_announce_before_its_chores(tmp_path: Path) -> None:
    """Warming and retention follow the announcement: the commit thread waits for it."""

    async def main() -> None:
        async with running(tmp_path, http="off") as daemon:
            assert daemon.store is not None
            peer = await _peer(daemon.config.socket, 2)
            announced: list[int] = []
            order: list[str] = []
            real_announce, real_warm = daemon.announce, daemon.store._warm

            def announce(message: Announce) -> None:
                announced.append(message.version)
                real_announce(message)

            def warm(*args: Any, **kwargs: Any) -> Any:
                order.append("announced" if announced else "not announced")
                return real_warm(*args, **kwargs)

            daemon.store._warm = warm  # type: ignore[method-assign]
            assert daemon.committer is not None
            daemon.committer._announce = announce
            await commit(daemon, 1)
            await _announce(peer)
            assert order == ["announced"]
            await peer.close()

    asyncio.run(main())


# -- the reader: mapped from the record, or refused and read from the store -----------------


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with make_env(tmp_path) as environment:
        yield environment


def _following(env: Env) -> tuple[Any, Reader]:
    daemon = env.daemon()
    reader = env.reader()
    reader.get(1)
    daemon.wait(lambda s, m: isinstance(m, Subscribe) and 1 in m.slots, "follow of slot 1")
    return daemon, reader


def _count_index_reads(reader: Reader, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every read connection the reader's store hands out (each SQLite read takes one)."""
    store = reader._store
    reads: list[str] = []
    real = store._reader

    def counting() -> Any:
        reads.append(threading.current_thread().name)
        return real()

    monkeypatch.setattr(store, "_reader", counting)
    return reads


def _record(env: Env, version: int, **changes: Any) -> VersionRecord:
    found = env.writer.announced_record(1, version)
    assert found is not None, "published without its verified record"
    return VersionRecord(*found)._replace(**changes)


def test_an_announced_record_is_mapped_without_reading_the_index(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, reader = _following(env)
    version = env.publish(1, 2.0, record_verified=True)
    trusted = reader.stats().trusted
    reads = _count_index_reads(reader, monkeypatch)
    daemon.announce(1, version, record=_record(env, version))
    daemon.wait_ack(1, version)
    assert reads == []
    assert reader.stats().trusted == trusted + 1  # each file's fstat matched the record
    ctx = reader.get(1)
    assert (ctx.version, float(ctx["w"][0]), ctx.config["value"]) == (version, 2.0, 2.0)


def _dtype(record: VersionRecord) -> str:
    return str(record.tensors[0][1])  # as the index writes it


MALFORMED: list[tuple[Callable[[VersionRecord], dict[str, Any]], str]] = [
    (lambda r: {"tensors": (("w", "<x9", (8,), 128, 32),)}, "dtype"),
    (lambda r: {"tensors": (("w", _dtype(r), (9,), 128, 32),)}, "which takes 36"),
    (lambda r: {"tensors": (("w", _dtype(r), (8,), 0, 32),)}, "data offset"),
    (lambda r: {"tensors": (("w", _dtype(r), {"8": 8}, 128, 32),)}, "not a list of entries"),
    (lambda r: {"tensors": (r.tensors[0], r.tensors[0]), "files": r.files * 2}, "twice"),
    (lambda r: {"config": "[1, 2]"}, "not a JSON object"),
    (lambda r: {"config": "[" * 100_000 + "]" * 100_000}, "unreadable"),  # RecursionError
    (lambda r: {"tensors": (("w", "()", (8,), 128, 32),)}, "dtype"),  # an IndexError
    (lambda r: {"tensors": (("w", "<f4" + " " * 5000, (8,), 128, 32),)}, "characters"),
]


@pytest.mark.parametrize(("changes", "why"), MALFORMED, ids=[why for _, why in MALFORMED])
def test_a_malformed_record_is_refused_and_the_store_decides(
    env: Env,
    caplog: pytest.LogCaptureFixture,
    changes: Callable[[VersionRecord], dict[str, Any]],
    why: str,
) -> None:
    daemon, reader = _following(env)
    version = env.publish(1, 3.0, record_verified=True)
    record = _record(env, version)
    with caplog.at_level(logging.WARNING, "ctxstore.readers"):
        daemon.announce(1, version, record=record._replace(**changes(record)))
        daemon.wait_ack(1, version)  # adopted all the same, from the store
    refusals = [r.getMessage() for r in caplog.records if "announced record" in r.getMessage()]
    assert len(refusals) == 1 and why in refusals[0], refusals
    assert reader._adoption.records_refused == 1
    assert float(reader.get(1)["w"][0]) == 3.0
    assert reader.stats().connected  # the session goes on


def test_a_reader_that_does_not_verify_never_takes_the_records_word(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify_checksums=False: the record is nobody's word (no identity is checked), so the
    index decides; before, such a reader served a record's config and dtypes unchecked."""
    daemon = env.daemon()
    reader = env.reader(verify_checksums=False)
    reader.get(1)
    daemon.wait(lambda s, m: isinstance(m, Subscribe) and 1 in m.slots, "follow of slot 1")
    version = env.publish(1, 6.0, record_verified=True)
    forged = _record(env, version, config='{"value": 99}')
    daemon.announce(1, version, record=forged)
    daemon.wait_ack(1, version)
    assert reader.get(1).config["value"] == 6.0  # the index's, not the record's


def test_files_other_than_the_vouched_ones_send_the_reader_to_the_store(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, reader = _following(env)
    version = env.publish(1, 4.0, record_verified=True)
    record = _record(env, version)
    other = (record.files[0], record.files[1] + 1, *record.files[2:])  # another mtime
    reads = _count_index_reads(reader, monkeypatch)
    daemon.announce(1, version, record=record._replace(files=other))
    daemon.wait_ack(1, version)
    assert reads  # the index decided (and its own verified record matched the files)
    assert reader._adoption.records_refused == 0  # not malformed: only not these files
    assert float(reader.get(1)["w"][0]) == 4.0


def _publish_pair(env: Env, value: float, *, table: bool = True) -> int:
    """A version of slot 1 whose tensor ``a`` is new and ``b`` is the same every time (the
    writer links it to the previous version's file instead of writing it again)."""
    ctx = Context({"a": np.full(8, value, np.float32), "b": np.arange(16, dtype=np.float32)})
    version = env.writer.save_context(1, ctx, record_verified=True)
    if table:
        env.table.set(1, version)
    return version


def _follow_pair(env: Env) -> tuple[Any, Reader, Context]:
    """A reader following slot 1 that adopted a two-tensor version from its record."""
    daemon, reader = _following(env)
    held = _announce_and_get(env, daemon, reader, _publish_pair(env, 2.0))
    return daemon, reader, held


def _announce_and_get(env: Env, daemon: Any, reader: Reader, version: int) -> Context:
    """Announce ``version`` with its record, wait for the reader's ack, and get it."""
    daemon.announce(1, version, record=_record(env, version))
    daemon.wait_ack(1, version)
    ctx = reader.get(1)
    assert ctx.version == version
    return ctx


def test_a_file_the_next_version_shares_is_served_from_the_map_already_held(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, reader, before = _follow_pair(env)
    reused = reader._store.held_maps.reused
    version = _publish_pair(env, 3.0)
    reads = _count_index_reads(reader, monkeypatch)
    after = _announce_and_get(env, daemon, reader, version)
    assert reads == []
    assert after["b"] is before["b"]  # the same map: no open, no second mapping
    assert after["a"] is not before["a"] and float(after["a"][0]) == 3.0
    assert reader._store.held_maps.reused == reused + 1


def test_a_held_map_is_not_reused_once_its_path_names_another_file(env: Env) -> None:
    daemon, reader, before = _follow_pair(env)
    reused = reader._store.held_maps.reused
    version = _publish_pair(env, 5.0)
    path = layout.tensor_path_str(str(env.store_dir), 1, version, 1)  # b, linked to the last
    copy = path + ".copy"
    with open(path, "rb") as src, open(copy, "wb") as dst:
        dst.write(src.read())
    os.replace(copy, path)  # the same bytes in another file: not the one the reader mapped
    after = _announce_and_get(env, daemon, reader, version)
    assert after["b"] is not before["b"]
    assert reader._store.held_maps.reused == reused
    assert np.array_equal(after["b"], before["b"])


def test_a_map_lent_writable_is_never_served_to_a_later_version(env: Env) -> None:
    """A torch tensor over a held map takes this process's edits (a LoRA merge): the next
    version maps that file afresh and sees the file's bytes, not the edit."""
    from ctxstore.readers import torch as ctx_torch

    daemon, reader, before = _follow_pair(env)
    ctx_torch.state_dict(before)["b"].add_(100.0)  # private copy-on-write pages
    assert float(before["b"][1]) == 101.0
    after = _announce_and_get(env, daemon, reader, _publish_pair(env, 3.0))
    assert after["b"] is not before["b"]
    assert np.array_equal(after["b"], np.arange(16, dtype=np.float32))


def test_two_names_on_one_file_stay_two_arrays_in_the_next_version(env: Env) -> None:
    """The writer links identical tensors of a version to one file; the reader mapped them
    as two arrays, and a version that shares that file must not make them one object."""
    daemon, reader = _following(env)
    same = np.arange(16, dtype=np.float32)
    for value in (2.0, 3.0):
        ctx = Context({"a": np.full(8, value, np.float32), "b": same, "c": same})
        version = env.writer.save_context(1, ctx, record_verified=True)
        env.table.set(1, version)
        after = _announce_and_get(env, daemon, reader, version)
    assert after["b"] is not after["c"]
    assert np.array_equal(after["b"], after["c"])


def test_a_link_to_the_held_file_in_place_of_a_tensor_file_is_refused(env: Env) -> None:
    """The same inode reached through a symbolic link is not a stored file: the reader
    must not be served its held map (an lstat, not a stat, compares the identity)."""
    daemon, reader, before = _follow_pair(env)
    version = _publish_pair(env, 5.0)
    path = layout.tensor_path_str(str(env.store_dir), 1, version, 1)
    os.rename(path, path + ".real")
    os.symlink(path + ".real", path)
    daemon.announce(1, version, record=_record(env, version))
    daemon.wait(lambda s, m: isinstance(m, DamageReport) and m.version == version, "report")
    assert reader._store.held_maps.reused == 0
    assert reader.get(1) is before  # the newest intact version, as it was


def test_the_ack_is_written_before_the_callbacks_are_handed_over() -> None:
    order: list[str] = []

    class Adoption:
        def adopt_announced(self, slot: int, version: int, record: object) -> None:
            order.append("adopted, ack posted")

    class Book:
        def follows(self, slot: int) -> bool:
            return True

        def deliver(self, message: object) -> None:
            order.append("callbacks handed over")

    handler = ReaderSessionHandler(
        "r",
        Adoption(),  # type: ignore[arg-type]
        Book(),  # type: ignore[arg-type]
        attach_table=lambda: None,
        detach_table=lambda: None,
        heartbeat_interval=1.0,
        send_now=lambda: order.append("ack written"),
    )
    handler.message_received(Announce(slot=1, version=2, seq=1, committed_at=0))
    assert order == ["adopted, ack posted", "ack written", "callbacks handed over"]


def test_acks_of_announcements_received_together_leave_in_one_send(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.publish(2, 1.0)
    daemon = env.daemon()
    reader = env.reader(heartbeat_interval=60.0)
    reader.get(1)
    reader.get(2)
    daemon.wait(lambda s, m: isinstance(m, Subscribe) and 2 in m.slots, "follow of slot 2")
    first, second = env.publish(1, 2.0), env.publish(2, 2.0)
    written: list[bytes] = []
    real_flush = _Session.flush

    def flush(self: _Session) -> None:
        if self.unsent:
            written.append(bytes(self.unsent))
        real_flush(self)

    monkeypatch.setattr(_Session, "flush", flush)
    (session,) = daemon.live_sessions()
    with session.lock:  # both frames in one write: the reader receives them together
        frames = b""
        for slot, version in ((1, first), (2, second)):
            session.seq += 1
            announce = Announce(slot=slot, version=version, seq=session.seq, committed_at=0)
            frames += session.conn.send(announce)
        session.sock.sendall(frames)
    daemon.wait_ack(1, first)
    daemon.wait_ack(2, second)
    acks = [encode_frame(Ack(slot=1, version=first)), encode_frame(Ack(slot=2, version=second))]
    assert [chunk for chunk in written if acks[0] in chunk or acks[1] in chunk] == [b"".join(acks)]


def test_publishers_and_tools_still_reach_a_daemon_that_speaks_protocol_1_only(
    tmp_path: Path,
) -> None:
    """Only readers use what protocol 2 added: a publisher's, watcher's or admin tool's hello
    asks for protocol 1, so upgrading them before the daemon is restarted breaks nothing."""
    import socket

    from ctxstore.client import DaemonClient
    from ctxstore.protocol import Error
    from ctxstore.wire import NEED_DATA

    path = Path(tempfile_dir()) / "old.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    asked: list[int] = []

    def old_daemon() -> None:  # answers one hello as a protocol-1 daemon does
        peer, _ = server.accept()
        with peer:
            conn = Connection(Role.SERVER)
            event: Any = NEED_DATA
            while event is NEED_DATA:
                conn.receive_data(peer.recv(65536))
                event = conn.next_event()
            assert isinstance(event, Hello)
            asked.append(event.protocol)
            answer = (Welcome(protocol=1, session=1, daemon_pid=os.getpid())
                      if event.protocol == 1 else
                      Error(kind="protocol", message=f"client speaks protocol {event.protocol}; "
                            "this side speaks 1", fatal=True))  # fmt: skip
            peer.sendall(encode_frame(answer))
            peer.recv(1)  # until the client hangs up

    thread = threading.Thread(target=old_daemon, daemon=True)
    thread.start()
    try:
        with DaemonClient(path, timeout=WAIT) as client:
            assert client.daemon_pid == os.getpid()
    finally:
        server.close()
        thread.join(WAIT)
        path.unlink(missing_ok=True)
    assert asked == [1]


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="ctxo-", dir="/tmp")  # AF_UNIX paths are short
