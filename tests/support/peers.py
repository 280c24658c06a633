"""Raw protocol peers: a blocking one and one driven from an asyncio loop, for tests
that need to see every frame the daemon sends."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path
from typing import Any

from ctxstore.messages import Hello, Subscribe, Subscribed, Welcome
from ctxstore.protocol import NEED_DATA, Connection, Role

_OPEN_PEERS: list[RawPeer] = []


class RawPeer:
    """A protocol client over a blocking socket, for tests that need to see every frame."""

    def __init__(self, path: Path, name: str = "raw") -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        _OPEN_PEERS.append(self)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.conn = Connection(Role.CLIENT)
        self.send(Hello(role="reader", name=name, pid=os.getpid()))
        assert isinstance(self.next(), Welcome)

    def send(self, message: object) -> None:
        self.sock.sendall(self.conn.send(message))  # type: ignore[arg-type]

    def next(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
                continue
            return event

    def subscribe(self, **what: object) -> Subscribed:
        self.send(Subscribe(request_id=1, **what))  # type: ignore[arg-type]
        reply = self.next()
        assert isinstance(reply, Subscribed)
        return reply

    def close(self) -> None:
        self.sock.close()


class AsyncPeer:
    """A protocol client on the daemon's socket, driven from the test's loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = Connection(Role.CLIENT)

    @classmethod
    async def connect(cls, path: Path, name: str) -> AsyncPeer:
        peer = cls(*await asyncio.open_unix_connection(str(path)))
        await peer.send(Hello(role="reader", name=name, pid=os.getpid()))
        assert isinstance(await peer.next(), Welcome)
        return peer

    async def send(self, message: Any) -> None:
        self.writer.write(self.conn.send(message))
        await self.writer.drain()

    async def next(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                return event
            self.conn.receive_data(await self.reader.read(65536))

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def close_open_peers() -> None:
    """Close every RawPeer a test opened (conftest calls this after each test)."""
    while _OPEN_PEERS:
        _OPEN_PEERS.pop().close()
