"""A fake daemon: a Unix-socket server speaking the daemon's side of the protocol,
recording every frame it gets, for reader tests; and the environment around it
(a store, its version table, a short socket path)."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import posix_ipc

from ctxstore.context import Context
from ctxstore.errors import (
    ProtocolError,
)
from ctxstore.protocol import (
    CLOSED,
    NEED_DATA,
    Ack,
    Announce,
    Connection,
    Heartbeat,
    Hello,
    Message,
    Ping,
    Pong,
    Role,
    Subscribe,
    Subscribed,
    Welcome,
)
from ctxstore.readers import Reader
from ctxstore.store import PersistentStore
from ctxstore.versiontable import VersionTable, VersionTableWriter, segment_name

WAIT = 10.0  # upper bound for anything a test waits for; never reached when things work


class FakeSession:
    """One accepted connection, served by its own thread with protocol.Connection(SERVER)."""

    def __init__(self, daemon: FakeDaemon, sock: socket.socket, number: int) -> None:
        self.daemon = daemon
        self.sock = sock
        self.number = number
        self.conn = Connection(Role.SERVER)
        self.lock = threading.Lock()
        self.pid: int | None = None
        self.seq = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        try:
            while True:
                data = self.sock.recv(65536)
                self.conn.receive_data(data)
                while True:
                    event = self.conn.next_event()
                    if event is NEED_DATA:
                        break
                    if event is CLOSED:
                        return
                    self.handle(event)  # answered first: whoever waits for it sees the answer sent
                    self.daemon.record(self, event)
        except (OSError, ProtocolError):
            return
        finally:
            self.daemon.record_end(self)

    def handle(self, message: Message) -> None:
        match message:
            case Hello(pid=pid):
                self.pid = pid
                self.send(Welcome(session=self.number, daemon_pid=os.getpid()))
            case Subscribe():
                versions = self.daemon.snapshot(message)
                self.send(Subscribed(request_id=message.request_id, versions=versions))
            case _:
                pass

    def send(self, message: Message) -> None:
        with self.lock, contextlib.suppress(OSError, ProtocolError):
            self.sock.sendall(self.conn.send(message))

    def announce(self, slot: int, version: int, **fields: Any) -> None:
        with self.lock:
            self.seq += 1
            message = Announce(
                slot=slot, version=version, seq=self.seq, committed_at=time.time(), **fields
            )
            with contextlib.suppress(OSError, ProtocolError):
                self.sock.sendall(self.conn.send(message))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(WAIT)
        self.sock.close()


class FakeDaemon:
    """A Unix-socket server that speaks the daemon's side and records every frame it gets."""

    def __init__(self, path: Path, store: PersistentStore) -> None:
        self.path = path
        self.store = store
        self.cond = threading.Condition()
        self.log: list[tuple[FakeSession, Message]] = []
        self.sessions: list[FakeSession] = []
        self.ended: list[FakeSession] = []
        self.stopping = False
        self.nonces = itertools.count(1000)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(16)
        self.listener.settimeout(0.02)
        self.thread = threading.Thread(target=self.accept_loop, daemon=True)
        self.thread.start()

    def accept_loop(self) -> None:
        while not self.stopping:
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            with self.cond:
                self.sessions.append(FakeSession(self, sock, len(self.sessions) + 1))

    def record(self, session: FakeSession, message: Message) -> None:
        with self.cond:
            self.log.append((session, message))
            self.cond.notify_all()

    def record_end(self, session: FakeSession) -> None:
        with self.cond:
            self.ended.append(session)
            self.cond.notify_all()

    def snapshot(self, request: Subscribe) -> dict[int, int]:
        if request.all:
            return self.store.current_versions()
        slots = set(request.slots)
        for group in request.groups:
            slots.update(self.store.hierarchy.list_by_group(group))
        versions = {slot: self.store.current_version(slot) for slot in slots}
        return {slot: v for slot, v in versions.items() if v is not None}

    def wait(
        self, predicate: Callable[[FakeSession, Message], bool], what: str = "a message"
    ) -> tuple[FakeSession, Message]:
        """The first logged frame matching ``predicate``, waiting for it if need be.

        A frame is logged once it has been answered (a subscribe's snapshot sent), so
        what the caller sends next reaches the reader after that answer.
        """
        deadline = time.monotonic() + WAIT
        with self.cond:
            while True:
                for session, message in self.log:
                    if predicate(session, message):
                        return session, message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    kinds = [m.TYPE for _, m in self.log]
                    raise AssertionError(f"the fake daemon never received {what}; got {kinds}")
                self.cond.wait(remaining)

    def wait_ack(self, slot: int, version: int, pid: int | None = None) -> None:
        self.wait(
            lambda s, m: m == Ack(slot=slot, version=version) and (pid is None or s.pid == pid),
            f"ack {slot}/{version}",
        )

    def wait_heartbeat(self, predicate: Callable[[Heartbeat], bool]) -> Heartbeat:
        _, message = self.wait(
            lambda s, m: isinstance(m, Heartbeat) and predicate(m), "a matching heartbeat"
        )
        assert isinstance(message, Heartbeat)
        return message

    def messages(self, kind: type[Message]) -> list[Message]:
        with self.cond:
            return [m for _, m in self.log if isinstance(m, kind)]

    def live_sessions(self) -> list[FakeSession]:
        with self.cond:
            return [s for s in self.sessions if s not in self.ended and s.pid is not None]

    def announce(self, slot: int, version: int, **fields: Any) -> None:
        for session in self.live_sessions():
            session.announce(slot, version, **fields)

    def barrier(self) -> None:
        """Return once every reader handled what we sent before and sent what it had posted.

        Two ping round trips: the reader's loop drains its outbox between them.
        """
        for _ in range(2):
            nonce = next(self.nonces)
            self.send_all(Ping(nonce=nonce))
            self.wait(lambda s, m, n=nonce: m == Pong(nonce=n), f"pong {nonce}")

    def send_all(self, message: Message) -> None:
        for session in self.live_sessions():
            session.send(message)

    def stop(self) -> None:
        self.stopping = True
        self.listener.close()
        self.thread.join(WAIT)
        with self.cond:
            sessions = list(self.sessions)
        for session in sessions:
            session.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class Env:
    store_dir: Path
    sock: Path
    writer: PersistentStore
    table: VersionTableWriter
    daemons: list[FakeDaemon] = field(default_factory=list)
    readers: list[Reader] = field(default_factory=list)

    def publish(self, slot: int, value: float = 0.0, *, table: bool = True, **kw: Any) -> int:
        ctx = Context({"w": np.full(8, value, dtype=np.float32)}, {"value": value})
        version = self.writer.save_context(slot, ctx, **kw)
        if table:
            self.table.set(slot, version)
        return version

    def daemon(self) -> FakeDaemon:
        fake = FakeDaemon(self.sock, self.writer)
        self.daemons.append(fake)
        return fake

    def reader(self, **options: Any) -> Reader:
        options.setdefault("name", "test-reader")
        options.setdefault("heartbeat_interval", 0.05)
        options.setdefault("reconnect_backoff", (0.01, 0.05))
        reader = Reader(self.store_dir, self.sock, **options)
        self.readers.append(reader)
        return reader

    def new_table(self) -> VersionTableWriter:
        """What a restarted daemon does: reclaim the segment with a new incarnation."""
        self.table.close()
        self.table.unlink()
        self.table = VersionTable.create(segment_name(self.store_dir), 64)
        self.table.set_many(self.writer.current_versions())
        return self.table


@contextlib.contextmanager
def make_env(tmp_path: Path) -> Iterator[Env]:
    """A store with slot 1 at version 1, its version table, and a short socket path."""
    sock_dir = Path(tempfile.mkdtemp(prefix="ctxr-", dir="/tmp"))  # AF_UNIX paths are short
    store_dir = tmp_path / "store"
    writer = PersistentStore(store_dir)
    table = VersionTable.create(segment_name(store_dir), 64)
    environment = Env(store_dir, sock_dir / "d.sock", writer, table)
    environment.publish(1, 1.0)
    try:
        yield environment
    finally:
        for reader in environment.readers:
            reader.close()
        for fake in environment.daemons:
            fake.stop()
        environment.table.close()
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(segment_name(store_dir))
        writer.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
