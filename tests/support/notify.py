"""A stand-in for systemd's side of sd_notify."""

from __future__ import annotations

import os
import select
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class NotifyMessage:
    """One datagram as systemd would see it: sender pid and its assignments."""

    pid: int | None
    fields: dict[str, str]
    raw: bytes


class NotifySink:
    """A datagram socket that collects sd_notify messages, like systemd's notify socket.

    Binds a filesystem socket in a short private directory (AF_UNIX paths are
    limited to 107 bytes, and pytest's tmp_path can be longer), or an abstract
    address with ``abstract=True``. ``address`` is the value for NOTIFY_SOCKET.
    SO_PASSCRED is on, so each message carries the sender's pid (what
    NotifyAccess=main checks).
    """

    def __init__(self, *, abstract: bool = False) -> None:
        self._dir = tempfile.mkdtemp(prefix="ctxn-")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if abstract:
            name = f"ctxstore-test-notify-{os.getpid()}-{os.path.basename(self._dir)}"
            self._sock.bind(b"\0" + name.encode())
            self.address = "@" + name
        else:
            self.address = os.path.join(self._dir, "notify.sock")
            self._sock.bind(self.address)
        self.received: list[NotifyMessage] = []

    def receive(self, timeout: float) -> NotifyMessage | None:
        """The next message, or None when none arrives within ``timeout`` seconds."""
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            return None
        data, ancdata, _, _ = self._sock.recvmsg(65536, socket.CMSG_SPACE(_UCRED.size))
        pid = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        message = NotifyMessage(pid=pid, fields=fields, raw=data)
        self.received.append(message)
        return message

    def wait_for(self, key: str, value: str = "1", *, timeout: float = 30.0) -> NotifyMessage:
        """Receive until a message assigns ``key=value``; fail the test after ``timeout``.

        ``timeout`` bounds the whole wait; it is a deadline, not a timing assertion.
        """
        return self.wait_until(
            lambda m: m.fields.get(key) == value, timeout=timeout, wanted=f"{key}={value}"
        )

    def wait_until(
        self,
        predicate: Callable[[NotifyMessage], bool],
        *,
        timeout: float = 30.0,
        wanted: str = "matching message",
    ) -> NotifyMessage:
        """Receive until a message satisfies ``predicate``; fail the test after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.receive(remaining)
            if message is not None and predicate(message):
                return message
        pytest.fail(f"no {wanted} within {timeout}s; got {[m.raw for m in self.received]}")

    def drain(self) -> list[NotifyMessage]:
        """Every message already queued, without waiting."""
        messages = []
        while (message := self.receive(0)) is not None:
            messages.append(message)
        return messages

    def close(self) -> None:
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)
