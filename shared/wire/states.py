"""The lifecycle of one connection as a table: who may send what, in which state.

:data:`TRANSITIONS` maps (sender, sender's state) to the events that sender
may send and the state each leads to; :data:`PEER_TRANSITIONS` lists the events
that move the other side too. :class:`~ctxstore.wire.connection.Connection`
checks every frame, both ways, against them; docs/protocol.md draws the same
table.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from .codec import Message
from .messages import Error


class Role(enum.Enum):
    """Which end of the socket: a client connects (reader, publisher); the server is the daemon."""

    CLIENT = "client"
    SERVER = "server"
    #: members are singletons compared by identity: hash them so, in C (Enum's own
    #: ``__hash__`` is a Python call, and every frame looks states up by role)
    __hash__ = object.__hash__


class State(enum.Enum):
    """The state of one side's stream of frames."""

    START = "START"  # client: nothing sent yet; server: no Hello received yet
    AWAIT_WELCOME = "AWAIT_WELCOME"  # client: Hello sent, Welcome not yet received
    SEND_WELCOME = "SEND_WELCOME"  # server: Hello received, owes Welcome (or refuses)
    READY = "READY"  # handshake done
    DONE = "DONE"  # this side sent Goodbye or a fatal Error: it sends nothing more
    ERROR = "ERROR"  # this side broke the protocol; the connection must be closed
    __hash__ = object.__hash__  # as Role's


class Signal(enum.Enum):
    """What :meth:`Connection.next_event` returns when it has no message."""

    NEED_DATA = "NEED_DATA"  # feed more bytes with receive_data()
    CLOSED = "CLOSED"  # the peer closed at a frame boundary; nothing more will come


NEED_DATA: Final = Signal.NEED_DATA
CLOSED: Final = Signal.CLOSED

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


def refusal(sender: Role, state: State, name: str, allowed: Mapping[str, State]) -> str:
    who = sender.value
    if not any(name in events for (role, _), events in TRANSITIONS.items() if role is sender):
        return f"a {who} never sends {name!r}"
    if state is State.DONE:
        return f"{who} sent {name!r} after its goodbye"
    expected = ", ".join(allowed) or "nothing"
    return f"{who} may not send {name!r} in state {state.value} (expected: {expected})"
