"""The ctxstore socket protocol as a pure object: bytes in, messages out, and back.

Sans-IO in the manner of h11: a :class:`Connection` holds one side's view of
one connection. The caller moves bytes (an asyncio server in the daemon, a
thread in a reader); this module only parses, validates and tracks state. It
does no I/O, starts no threads and reads no clock.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of
msgpack (see :mod:`ctxstore.wire.codec`). A length above the connection's bound
is refused as soon as the four header bytes arrive, before any body is
buffered. The lifecycle is the table :data:`~ctxstore.wire.states.TRANSITIONS`, in one place.

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

import struct
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, NoReturn, TypeAlias

from ..errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .codec import Message, decode_body, encode_body, error_for
from .messages import (
    PROTOCOL_VERSION,
    RECORD_PROTOCOL,
    SUPPORTED_PROTOCOLS,
    Announce,
    Hello,
    Welcome,
)
from .states import (
    CLOSED,
    NEED_DATA,
    PEER_TRANSITIONS,
    TRANSITIONS,
    Role,
    Signal,
    State,
    event_name,
    refusal,
)

DEFAULT_MAX_FRAME_SIZE: Final = 1 << 20
MIN_FRAME_SIZE: Final = 64
MAX_FRAME_SIZE: Final = 1 << 30
HEADER: Final = struct.Struct(">I")

Event: TypeAlias = Message | Signal
#: the messages :meth:`Connection._check_content` has rules for (the others skip its match)
_CONTENT_RULED: Final = frozenset({Hello, Welcome, Announce})


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
        "_hello_protocol",
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
        self._hello_protocol: int = PROTOCOL_VERSION
        self._states = {Role.CLIENT: State.START, Role.SERVER: State.START}
        self._buffer = bytearray()
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self._last_seq = 0

    def _spoken(self) -> str:
        """The versions this side speaks, in words."""
        *older, newest = SUPPORTED_PROTOCOLS
        return f"{', '.join(map(str, older))} and {newest}" if older else str(newest)

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
            sender = self.their_role
            if type(message) is Announce and self._may_announce(message, sender):
                self._last_seq = message.seq  # all that _plan and _apply would do
            else:
                self._apply(self._plan(sender, message, RemoteProtocolError), message)
        except RemoteProtocolError as exc:
            self._fail(exc)
        return message

    def send(self, message: Message, *, frame: bytes | None = None) -> bytes:
        """The frame for ``message``; raises LocalProtocolError if we may not send it now.

        ``frame``: ``encode_frame(message)`` done once by the caller for many
        connections (one announcement to every subscriber); it is checked
        against this connection's state and frame limit like any other.
        """
        if (
            frame is not None
            and type(message) is Announce
            and len(frame) - HEADER.size <= self.max_frame_size
            and self._may_announce(message, self.role)
        ):
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

    def _may_announce(self, announce: Announce, sender: Role) -> bool:
        """The announcement's fast path, both ways (one shared frame sent to many
        connections; each one received by a reader): True when ``sender`` may send
        ``announce`` now and it changes nothing but the seq. Anything else (a state
        that forbids it, a seq that does not increase, a record before protocol 2)
        takes the full path, which says what is wrong."""
        state = self._states[sender]
        return (
            self._error is None
            and TRANSITIONS.get((sender, state), {}).get("announce") is state
            and announce.seq > self._last_seq
            and (announce.record is None or (self.protocol or 0) >= RECORD_PROTOCOL)
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
            raise error(refusal(sender, state, name, allowed))
        self._check_content(sender, message, error)
        changes = [(sender, allowed[name])]
        peer = PEER_TRANSITIONS.get(name)
        if peer is not None and self._states[peer[0]] is peer[1]:
            changes.append((peer[0], peer[2]))
        return changes

    def _check_content(self, sender: Role, message: Message, error: type[ProtocolError]) -> None:
        """Rules that depend on the connection, not only on the message."""
        if type(message) not in _CONTENT_RULED:
            return
        who = sender.value
        match message:
            case Hello(protocol=version) if version not in SUPPORTED_PROTOCOLS:
                raise error(f"{who} speaks protocol {version}; this side speaks {self._spoken()}")
            case Welcome(protocol=version) if version != self._hello_protocol:
                asked = self._hello_protocol
                raise error(f"{who} speaks protocol {version}; the hello asked for {asked}")
            case Announce(record=record) if (
                record is not None and (self.protocol or 0) < RECORD_PROTOCOL
            ):
                raise error(
                    f"{who} sent an announce with a version record on protocol "
                    f"{self.protocol}; records came with protocol {RECORD_PROTOCOL}"
                )
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
            case Hello(protocol=version):
                self._hello_protocol = version
            case Welcome(protocol=version):
                self.protocol = version
            case Announce(seq=seq):
                self._last_seq = seq
            case _:
                pass
