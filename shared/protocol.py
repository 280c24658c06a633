"""The ctxstore socket protocol as a pure object: bytes in, messages out, and back.

Sans-IO in the manner of h11: a :class:`Connection` holds one side's view of
one connection. The caller moves bytes (an asyncio server in the daemon, a
thread in a reader); this module only parses, validates and tracks state. It
does no I/O, starts no threads and reads no clock.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of
msgpack (see :mod:`ctxstore.messages`). A length above the connection's bound
is refused as soon as the four header bytes arrive, before any body is
buffered. The lifecycle is the table :data:`TRANSITIONS`, in one place.

Loop shape on either side::

    conn.receive_data(chunk)            # b"" at EOF
    while True:
        event = conn.next_event()       # raises RemoteProtocolError on violations
        if event is NEED_DATA or event is CLOSED:
            break
        handle(event)                   # maybe: transport.write(conn.send(reply))

On RemoteProtocolError, write ``error_frame_for(exc)`` and close.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, NoReturn, TypeAlias

from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    ROLES,
    Ack,
    Announce,
    DamageReport,
    Error,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    Ping,
    Pong,
    Progress,
    PublishBuild,
    Published,
    PublishFile,
    PublishShm,
    Repaired,
    RepairRequest,
    Status,
    StatusRequest,
    Subscribe,
    Subscribed,
    TensorSpec,
    Unsubscribe,
    Welcome,
    decode_body,
    encode_body,
    error_for,
)

DEFAULT_MAX_FRAME_SIZE: Final = 1 << 20
MIN_FRAME_SIZE: Final = 64
MAX_FRAME_SIZE: Final = 1 << 30
HEADER: Final = struct.Struct(">I")


class Role(enum.Enum):
    """Which end of the socket: a client connects (reader, publisher); the server is the daemon."""

    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """The state of one side's stream of frames."""

    START = "START"  # client: nothing sent yet; server: no Hello received yet
    AWAIT_WELCOME = "AWAIT_WELCOME"  # client: Hello sent, Welcome not yet received
    SEND_WELCOME = "SEND_WELCOME"  # server: Hello received, owes Welcome (or refuses)
    READY = "READY"  # handshake done
    DONE = "DONE"  # this side sent Goodbye or a fatal Error: it sends nothing more
    ERROR = "ERROR"  # this side broke the protocol; the connection must be closed


class Signal(enum.Enum):
    """What :meth:`Connection.next_event` returns when it has no message."""

    NEED_DATA = "NEED_DATA"  # feed more bytes with receive_data()
    CLOSED = "CLOSED"  # the peer closed at a frame boundary; nothing more will come


NEED_DATA: Final = Signal.NEED_DATA
CLOSED: Final = Signal.CLOSED
Event: TypeAlias = Message | Signal

#: The event name of a fatal Error in the table (a non-fatal one is just "error").
FATAL_ERROR: Final = "error(fatal)"

_C, _S = Role.CLIENT, Role.SERVER
_CLIENT_REQUESTS = (
    "subscribe",
    "unsubscribe",
    "ack",
    "damage_report",
    "heartbeat",
    "publish_file",
    "publish_build",
    "publish_shm",
    "status_request",
    "repair_request",
    "ping",
    "pong",
)
_SERVER_MESSAGES = (
    "subscribed",
    "announce",
    "progress",
    "published",
    "status",
    "repaired",
    "error",
    "ping",
    "pong",
)
_END = {"goodbye": State.DONE, FATAL_ERROR: State.DONE}

#: (sender, sender's state) -> {event the sender may send: sender's next state}.
#: Anything absent is a protocol violation: Local if we would send it, Remote if we received it.
TRANSITIONS: Final[Mapping[tuple[Role, State], Mapping[str, State]]] = MappingProxyType(
    {
        (_C, State.START): {"hello": State.AWAIT_WELCOME},
        (_C, State.AWAIT_WELCOME): _END,
        (_C, State.READY): {**dict.fromkeys(_CLIENT_REQUESTS, State.READY), **_END},
        (_S, State.START): _END,
        (_S, State.SEND_WELCOME): {"welcome": State.READY, **_END},
        (_S, State.READY): {**dict.fromkeys(_SERVER_MESSAGES, State.READY), **_END},
    }
)

#: Events that also move the other side: event -> (other side, from state, to state).
PEER_TRANSITIONS: Final[Mapping[str, tuple[Role, State, State]]] = MappingProxyType(
    {
        "hello": (_S, State.START, State.SEND_WELCOME),
        "welcome": (_C, State.AWAIT_WELCOME, State.READY),
    }
)


def event_name(message: Message) -> str:
    """The key of ``message`` in :data:`TRANSITIONS`."""
    if isinstance(message, Error) and message.fatal:
        return FATAL_ERROR
    return message.TYPE


def encode_frame(message: Message, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Length header + body of ``message``, with no state check (see :meth:`Connection.send`)."""
    body = encode_body(message)
    if len(body) > max_frame_size:
        raise LocalProtocolError(
            f"{message.TYPE!r} frame would be {len(body)} bytes; the limit is {max_frame_size}"
        )
    return HEADER.pack(len(body)) + body


def error_frame_for(
    exc: BaseException, *, request_id: int | None = None, fatal: bool = True
) -> bytes:
    """A ready-to-write Error frame reporting ``exc``, whatever the connection's state.

    A server answers a RemoteProtocolError with this frame and then closes.
    """
    return encode_frame(error_for(exc, request_id=request_id, fatal=fatal))


class Connection:
    """One side of one connection: parses the peer's frames and checks ours against the table."""

    __slots__ = (
        "_buffer",
        "_eof",
        "_error",
        "_last_seq",
        "_states",
        "max_buffer_size",
        "max_frame_size",
        "protocol",
        "role",
    )

    def __init__(
        self,
        role: Role,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_buffer_size: int | None = None,
    ) -> None:
        """``max_frame_size`` bounds frame bodies both ways, ``max_buffer_size`` unread bytes.

        The buffer bound defaults to one full frame plus 1 MiB of read-ahead:
        feed chunks of at most 1 MiB and drain events after each one.
        """
        if not MIN_FRAME_SIZE <= max_frame_size <= MAX_FRAME_SIZE:
            raise LocalProtocolError(
                f"max_frame_size must be between {MIN_FRAME_SIZE} and {MAX_FRAME_SIZE}"
            )
        if max_buffer_size is None:
            max_buffer_size = HEADER.size + max_frame_size + (1 << 20)
        if max_buffer_size < HEADER.size + max_frame_size:
            raise LocalProtocolError("max_buffer_size must hold at least one full frame")
        self.role: Final = role
        self.max_frame_size: Final = max_frame_size
        self.max_buffer_size: Final = max_buffer_size
        #: the protocol version agreed by the handshake, None before it
        self.protocol: int | None = None
        self._states = {Role.CLIENT: State.START, Role.SERVER: State.START}
        self._buffer = bytearray()
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self._last_seq = 0

    @property
    def their_role(self) -> Role:
        return Role.SERVER if self.role is Role.CLIENT else Role.CLIENT

    @property
    def our_state(self) -> State:
        return self._states[self.role]

    @property
    def their_state(self) -> State:
        return self._states[self.their_role]

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a message: after ``next_event()`` gave
        NEED_DATA, the part of a frame still being received (0 between frames)."""
        return len(self._buffer)

    @property
    def states(self) -> Mapping[Role, State]:
        return MappingProxyType(dict(self._states))

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed its end."""
        if self._error is not None:
            return
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() called with bytes after EOF")
            return
        if not data:
            self._eof = True
            return
        if len(self._buffer) + len(data) > self.max_buffer_size:
            self._fail(
                RemoteProtocolError(
                    f"peer sent more than {self.max_buffer_size} bytes that are not yet processed"
                )
            )
        self._buffer += data

    def next_event(self) -> Event:
        """The next message from the peer, NEED_DATA, or CLOSED; raises RemoteProtocolError."""
        if self._error is not None:
            raise self._error
        try:
            body = self._take_frame()
            if body is None:
                return CLOSED if self._eof else NEED_DATA
            message = decode_body(body)
            self._apply(self._plan(self.their_role, message, RemoteProtocolError), message)
        except RemoteProtocolError as exc:
            self._fail(exc)
        return message

    def send(self, message: Message, *, frame: bytes | None = None) -> bytes:
        """The frame for ``message``; raises LocalProtocolError if we may not send it now.

        ``frame``: ``encode_frame(message)`` done once by the caller for many
        connections (one announcement to every subscriber); it is checked
        against this connection's state and frame limit like any other.
        """
        if frame is not None and type(message) is Announce and self._may_announce(message, frame):
            self._last_seq = message.seq  # what _apply does for an announcement, nothing else
            return frame
        if self._error is not None:
            raise LocalProtocolError(
                "the connection is in ERROR; write error_frame_for(exc) and close"
            )
        plan = self._plan(self.role, message, LocalProtocolError)
        if frame is None:
            frame = encode_frame(message, max_frame_size=self.max_frame_size)
        elif len(frame) - HEADER.size > self.max_frame_size:
            raise LocalProtocolError(
                f"{message.TYPE!r} frame is {len(frame) - HEADER.size} bytes; "
                f"the limit is {self.max_frame_size}"
            )
        self._apply(plan, message)
        return frame

    def _may_announce(self, announce: Announce, frame: bytes) -> bool:
        """The fan-out's fast path (one shared frame to many connections): True when
        :meth:`send` would accept ``announce`` and change nothing but the seq. Anything
        else (a state that forbids it, a seq that does not increase, a frame over
        the limit) takes the full path, which says what is wrong."""
        state = self._states[self.role]
        return (
            self._error is None
            and TRANSITIONS.get((self.role, state), {}).get("announce") is state
            and announce.seq > self._last_seq
            and len(frame) - HEADER.size <= self.max_frame_size
        )

    # -- internals ---------------------------------------------------------------------------

    def _fail(self, exc: RemoteProtocolError) -> NoReturn:
        self._error = exc
        self._states[self.their_role] = State.ERROR
        self._buffer.clear()
        raise exc

    def _take_frame(self) -> bytearray | None:
        """The next complete frame body, None if incomplete; bounds checked on the header."""
        buffer = self._buffer
        if len(buffer) < HEADER.size:
            if self._eof and buffer:
                raise RemoteProtocolError("peer closed the connection inside a frame header")
            return None
        (length,) = HEADER.unpack_from(buffer)
        if length > self.max_frame_size:
            raise RemoteProtocolError(
                f"peer announced a {length}-byte frame; the limit is {self.max_frame_size}"
            )
        if length == 0:
            raise RemoteProtocolError("peer sent an empty frame")
        end = HEADER.size + length
        if len(buffer) < end:
            if self._eof:
                raise RemoteProtocolError(
                    f"peer closed the connection inside a frame ({len(buffer) - HEADER.size} "
                    f"of {length} bytes)"
                )
            return None
        body = buffer[HEADER.size : end]
        del buffer[:end]
        return body

    def _plan(
        self, sender: Role, message: Message, error: type[ProtocolError]
    ) -> list[tuple[Role, State]]:
        """The state changes ``message`` from ``sender`` causes, or raise ``error``."""
        name = event_name(message)
        state = self._states[sender]
        allowed = TRANSITIONS.get((sender, state), {})
        if name not in allowed:
            raise error(_refusal(sender, state, name, allowed))
        self._check_content(sender, message, error)
        changes = [(sender, allowed[name])]
        peer = PEER_TRANSITIONS.get(name)
        if peer is not None and self._states[peer[0]] is peer[1]:
            changes.append((peer[0], peer[2]))
        return changes

    def _check_content(self, sender: Role, message: Message, error: type[ProtocolError]) -> None:
        """Rules that depend on the connection, not only on the message."""
        who = sender.value
        match message:
            case Hello(protocol=version) | Welcome(protocol=version) if version != PROTOCOL_VERSION:
                raise error(f"{who} speaks protocol {version}; this side speaks {PROTOCOL_VERSION}")
            case Announce(seq=seq) if seq <= self._last_seq:
                raise error(
                    f"{who} sent announce seq {seq} after seq {self._last_seq}; seq must increase"
                )
            case _:
                pass

    def _apply(self, changes: list[tuple[Role, State]], message: Message) -> None:
        for role, state in changes:
            self._states[role] = state
        match message:
            case Welcome(protocol=version):
                self.protocol = version
            case Announce(seq=seq):
                self._last_seq = seq
            case _:
                pass


def _refusal(sender: Role, state: State, name: str, allowed: Mapping[str, State]) -> str:
    who = sender.value
    if not any(name in events for (role, _), events in TRANSITIONS.items() if role is sender):
        return f"a {who} never sends {name!r}"
    if state is State.DONE:
        return f"{who} sent {name!r} after its goodbye"
    expected = ", ".join(allowed) or "nothing"
    return f"{who} may not send {name!r} in state {state.value} (expected: {expected})"


__all__ = [
    "CLOSED",
    "DEFAULT_MAX_FRAME_SIZE",
    "FATAL_ERROR",
    "HEADER",
    "MESSAGE_TYPES",
    "NEED_DATA",
    "PEER_TRANSITIONS",
    "PROTOCOL_VERSION",
    "ROLES",
    "TRANSITIONS",
    "Ack",
    "Announce",
    "DamageReport",
    "Connection",
    "Error",
    "Event",
    "Goodbye",
    "Heartbeat",
    "Hello",
    "Message",
    "Ping",
    "Pong",
    "Progress",
    "PublishBuild",
    "PublishFile",
    "PublishShm",
    "Published",
    "RepairRequest",
    "Repaired",
    "Role",
    "Signal",
    "State",
    "Status",
    "StatusRequest",
    "Subscribe",
    "Subscribed",
    "TensorSpec",
    "Unsubscribe",
    "Welcome",
    "decode_body",
    "encode_body",
    "encode_frame",
    "error_for",
    "error_frame_for",
    "event_name",
]
