"""The sans-IO protocol, exercised with no socket: two Connections passing bytes in memory."""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxstore.errors import (
    InvalidInputError,
    LocalProtocolError,
    NotFoundError,
    RemoteError,
    RemoteProtocolError,
)
from ctxstore.protocol import (
    CLOSED,
    DEFAULT_MAX_FRAME_SIZE,
    HEADER,
    MESSAGE_TYPES,
    NEED_DATA,
    PROTOCOL_VERSION,
    TRANSITIONS,
    Ack,
    Announce,
    Connection,
    DamageReport,
    Error,
    Event,
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
    Role,
    State,
    Status,
    StatusRequest,
    Subscribe,
    Subscribed,
    TensorSpec,
    Unsubscribe,
    VersionRecord,
    Welcome,
    decode_body,
    encode_body,
    encode_frame,
    error_for,
    error_frame_for,
)
from ctxstore.validation import MAX_SLOT, MAX_VERSION, RESERVED_ALIASES

FEEDS: dict[str, Callable[[bytes], Iterable[bytes]]] = {
    "whole": lambda data: [data],
    "bytewise": lambda data: [data[i : i + 1] for i in range(len(data))],
    "chunks-of-7": lambda data: [data[i : i + 7] for i in range(0, len(data), 7)],
}


def drain(conn: Connection) -> list[Event]:
    """Every event up to and including NEED_DATA or CLOSED."""
    events: list[Event] = []
    while True:
        event = conn.next_event()
        events.append(event)
        if event is NEED_DATA or event is CLOSED:
            return events


def feed_all(conn: Connection, data: bytes, feed: str = "whole") -> list[Event]:
    """Feed ``data`` chunked by ``feed``, draining after each chunk; the messages read."""
    events: list[Event] = []
    for chunk in FEEDS[feed](data):
        conn.receive_data(chunk)
        events.extend(drain(conn)[:-1])
    return events


class ConnectionPair:
    """A client and a server joined by memory; ``feed`` chooses how bytes are chunked."""

    def __init__(self, feed: str = "whole") -> None:
        self.client = Connection(Role.CLIENT)
        self.server = Connection(Role.SERVER)
        self.feed = feed

    def peer(self, conn: Connection) -> Connection:
        return self.server if conn is self.client else self.client

    def send(self, conn: Connection, *messages: Message) -> list[Event]:
        """Send ``messages`` from ``conn``; return what the other side reads (minus NEED_DATA)."""
        data = b"".join(conn.send(message) for message in messages)
        return feed_all(self.peer(conn), data, self.feed)

    def close(self, conn: Connection) -> list[Event]:
        """``conn`` closes its socket: the other side sees EOF."""
        other = self.peer(conn)
        other.receive_data(b"")
        return drain(other)

    def handshake(self, versions: dict[int, int] | None = None) -> Welcome:
        assert self.send(self.client, HELLO) == [HELLO]
        welcome = Welcome(session=7, daemon_pid=4242, versions=versions or {})
        assert self.send(self.server, welcome) == [welcome]
        return welcome


HELLO = Hello(role="reader", name="worker-1", pid=1234)


@pytest.fixture(params=sorted(FEEDS))
def pair(request: pytest.FixtureRequest) -> ConnectionPair:
    return ConnectionPair(request.param)


# -- full exchanges --------------------------------------------------------------------------------


def test_handshake_moves_both_sides_to_ready(pair: ConnectionPair) -> None:
    assert pair.client.states == {Role.CLIENT: State.START, Role.SERVER: State.START}
    assert pair.send(pair.client, HELLO) == [HELLO]
    assert pair.client.our_state is State.AWAIT_WELCOME
    assert pair.server.their_state is State.AWAIT_WELCOME
    assert pair.server.our_state is State.SEND_WELCOME
    assert pair.server.protocol is None
    welcome = Welcome(session=1, daemon_pid=99, versions={3: 17, 4: 2})
    [received] = pair.send(pair.server, welcome)
    assert isinstance(received, Welcome)
    assert dict(received.versions) == {3: 17, 4: 2}
    for conn in (pair.client, pair.server):
        assert conn.states == {Role.CLIENT: State.READY, Role.SERVER: State.READY}
        assert conn.protocol == PROTOCOL_VERSION


def test_reader_session(pair: ConnectionPair) -> None:
    pair.handshake({1: 3})
    client, server = pair.client, pair.server
    subscribe = Subscribe(request_id=1, slots=(1, 2), groups=("llm",), all=False)
    assert pair.send(client, subscribe) == [subscribe]
    subscribed = Subscribed(request_id=1, versions={1: 3})
    assert pair.send(server, subscribed) == [subscribed]
    announces = [
        Announce(slot=1, version=4, seq=10, committed_at=1700000000.5, model_type="llm"),
        Announce(slot=2, version=1, seq=12, committed_at=1700000001.0, aliases={"best": 1}),
    ]
    assert pair.send(server, *announces) == announces
    acks = [Ack(slot=1, version=4), Ack(slot=2, version=1)]
    heartbeat = Heartbeat(pid=1234, name="worker-1", held=((1, 3), (1, 4)), uss=10, pss=20)
    assert pair.send(client, *acks, heartbeat) == [*acks, heartbeat]
    assert pair.send(server, Ping(nonce=5)) == [Ping(nonce=5)]
    assert pair.send(client, Pong(nonce=5)) == [Pong(nonce=5)]
    assert pair.send(client, Unsubscribe(groups=("llm",))) == [Unsubscribe(groups=("llm",))]
    assert pair.send(client, Goodbye(reason="shutting down")) == [Goodbye(reason="shutting down")]
    assert client.our_state is State.DONE
    assert server.their_state is State.DONE
    assert pair.close(client) == [CLOSED]
    assert pair.close(server) == [CLOSED]
    assert server.next_event() is CLOSED  # stays closed


def test_publisher_session(pair: ConnectionPair) -> None:
    pair.send(pair.client, Hello(role="publisher", name="trainer", pid=77))
    pair.send(pair.server, Welcome(session=2, daemon_pid=1))
    client, server = pair.client, pair.server
    requests: list[Message] = [
        PublishFile(request_id=1, slot=5, path="/data/w.npz", model_type="cnn", alias="best"),
        PublishBuild(request_id=2, slot=6, node_type="llm", config={"d_model": 256}),
        PublishShm(
            request_id=3,
            slot=7,
            shm_name="/ctxstore-publish-77-1",
            manifest=(TensorSpec("embed.weight", "<f4", (4, 8), 0, 128),),
            config={"layers": [1, 2]},
            metadata={"step": 1000},
        ),
    ]
    assert pair.send(client, *requests) == requests
    answers: list[Message] = [
        Published(request_id=1, slot=5, version=1),
        error_for(NotFoundError("no node type 'llm'"), request_id=2, fatal=False),
        Published(request_id=3, slot=7, version=9),
    ]
    assert pair.send(server, *answers) == answers
    assert client.states == {Role.CLIENT: State.READY, Role.SERVER: State.READY}
    bye = Goodbye(reason="daemon stopping")
    assert pair.send(server, bye) == [bye]
    assert pair.send(client, Ack(slot=5, version=1)) == [Ack(slot=5, version=1)]  # in flight
    assert pair.close(server) == [CLOSED]
    assert client.their_state is State.DONE


def test_server_may_refuse_before_and_after_hello() -> None:
    early = ConnectionPair()
    bye = Goodbye(reason="not allowed")
    assert early.send(early.server, bye) == [bye]
    assert early.client.their_state is State.DONE
    late = ConnectionPair()
    late.send(late.client, HELLO)
    refusal = error_for(RemoteProtocolError("role not allowed"))
    assert late.send(late.server, refusal) == [refusal]
    assert late.client.their_state is State.DONE
    assert late.client.our_state is State.AWAIT_WELCOME
    assert late.send(late.client, Goodbye()) == [Goodbye()]


def test_chunking_does_not_change_events() -> None:
    stream = [Welcome(session=1, daemon_pid=2, versions={1: 1})] + [
        Announce(slot=i % 3, version=i + 1, seq=i + 1, committed_at=float(i)) for i in range(20)
    ]
    results = []
    for feed in sorted(FEEDS):
        pair = ConnectionPair(feed)
        pair.send(pair.client, HELLO)
        results.append(pair.send(pair.server, *stream))
    assert results == [stream] * len(FEEDS)


def test_example_frame_in_docs_is_exact() -> None:
    frame = encode_frame(Ack(slot=3, version=2))
    assert frame.hex(" ") in DOCS.read_text()
    assert len(frame) == HEADER.size + HEADER.unpack_from(frame)[0]


# -- every message type round-trips ----------------------------------------------------------------

_no_control = st.characters(exclude_categories=("Cc", "Cs"))
_labels = st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,63}", fullmatch=True).filter(
    lambda s: ".." not in s
)
_aliases = _labels.filter(lambda s: s not in RESERVED_ALIASES)
_slots = st.integers(0, MAX_SLOT)
_versions = st.integers(1, MAX_VERSION)
_ids = st.integers(0, 2**63 - 1)
_pids = st.integers(1, 2**31 - 1)
_version_maps = st.dictionaries(_slots, _versions, max_size=6)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_json_maps = st.dictionaries(st.text(max_size=8), _json, max_size=4)
_optional_labels = st.none() | _labels
_optional_aliases = st.none() | _aliases
_publish_keys = st.none() | st.from_regex(r"[A-Za-z0-9_-]{8,40}", fullmatch=True)


@st.composite
def _tensor_specs(draw: st.DrawFn) -> TensorSpec:
    name = draw(st.from_regex(r"[a-z][a-z0-9_]{0,12}(\.[a-z0-9_]{1,6}){0,3}", fullmatch=True))
    dtype = draw(st.sampled_from(["<f4", "<f8", "<f2", "|u1", "|b1", "<i8", "<c8", ">i4"]))
    shape = tuple(draw(st.lists(st.integers(0, 6), max_size=4)))
    itemsize = int(dtype[2:])
    return TensorSpec(name, dtype, shape, draw(_ids), itemsize * math.prod(shape))


MESSAGE_STRATEGIES: dict[type[Message], st.SearchStrategy[Any]] = {
    Hello: st.builds(
        Hello, role=st.sampled_from(["reader", "publisher", "admin"]), name=_labels, pid=_pids
    ),
    Welcome: st.builds(
        Welcome, session=st.integers(1, 2**63 - 1), daemon_pid=_pids, versions=_version_maps
    ),
    Subscribe: st.builds(
        Subscribe,
        request_id=_ids,
        slots=st.lists(_slots, max_size=5).map(tuple),
        groups=st.lists(_labels, max_size=3).map(tuple),
        all=st.booleans(),
    ),
    Subscribed: st.builds(Subscribed, request_id=_ids, versions=_version_maps),
    Unsubscribe: st.builds(
        Unsubscribe,
        slots=st.lists(_slots, max_size=5).map(tuple),
        groups=st.lists(_labels, max_size=3).map(tuple),
        all=st.booleans(),
    ),
    Announce: st.builds(
        Announce,
        slot=_slots,
        version=_versions,
        seq=st.integers(1, 2**63 - 1),
        committed_at=st.floats(0, 4e9),
        model_type=_optional_labels,
        aliases=st.dictionaries(_aliases, _versions, max_size=3),
        record=st.none()
        | st.builds(
            VersionRecord,
            config=st.just('{"a":1}'),
            metadata=st.text(max_size=20),
            tensors=st.just((("w", "<f4", (2, 3), 128, 24), ("b", "|u1", (), 64, 1))),
            files=st.tuples(*[st.integers(-(2**63), 2**64 - 1)] * 8),
        ),
    ),
    Ack: st.builds(Ack, slot=_slots, version=_versions),
    DamageReport: st.builds(
        DamageReport, slot=_slots, version=_versions, detail=st.text(_no_control, max_size=50)
    ),
    Heartbeat: st.builds(
        Heartbeat,
        pid=_pids,
        name=_labels,
        held=st.lists(st.tuples(_slots, _versions), unique=True, max_size=5).map(tuple),
        uss=_ids,
        pss=_ids,
    ),
    PublishFile: st.builds(
        PublishFile,
        request_id=_ids,
        slot=_slots,
        path=st.text(_no_control, max_size=40).map(lambda s: "/" + s),
        model_type=_optional_labels,
        alias=_optional_aliases,
        metadata=_json_maps,
        key=_publish_keys,
        progress=st.booleans(),
    ),
    PublishBuild: st.builds(
        PublishBuild,
        request_id=_ids,
        slot=_slots,
        node_type=_labels,
        config=_json_maps,
        alias=_optional_aliases,
        key=_publish_keys,
        progress=st.booleans(),
    ),
    PublishShm: st.builds(
        PublishShm,
        request_id=_ids,
        slot=_slots,
        shm_name=st.from_regex(r"/[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}", fullmatch=True),
        manifest=st.lists(_tensor_specs(), unique_by=lambda spec: spec.name, max_size=4).map(tuple),
        config=_json_maps,
        metadata=_json_maps,
        model_type=_optional_labels,
        alias=_optional_aliases,
        key=_publish_keys,
        progress=st.booleans(),
    ),
    Progress: st.builds(
        Progress,
        request_id=_ids,
        stage=st.sampled_from(["waiting", "reading", "committing"]),
        done=_ids,
        total=_ids,
        elapsed=st.floats(0, 1e6),
    ),
    Published: st.builds(Published, request_id=_ids, slot=_slots, version=_versions),
    StatusRequest: st.builds(StatusRequest, request_id=_ids),
    Status: st.builds(
        Status,
        request_id=_ids,
        daemon=_json_maps,
        readers=st.lists(_json_maps, max_size=3).map(tuple),
        slots=st.lists(_json_maps, max_size=3).map(tuple),
    ),
    RepairRequest: st.builds(RepairRequest, request_id=_ids, slot=st.none() | _slots),
    Repaired: st.builds(
        Repaired,
        request_id=_ids,
        problems=st.lists(_json_maps, max_size=3).map(tuple),
        problems_total=_ids,
        repairs=st.lists(_json_maps, max_size=3).map(tuple),
    ),
    Error: st.builds(
        Error,
        kind=_labels,
        message=st.text(st.characters(exclude_categories=("Cc", "Cs"), include_characters="\n\t")),
        request_id=st.none() | _ids,
        fatal=st.booleans(),
    ),
    Goodbye: st.builds(Goodbye, reason=st.text(_no_control, max_size=50)),
    Ping: st.builds(Ping, nonce=_ids),
    Pong: st.builds(Pong, nonce=_ids),
}
messages = st.one_of(*MESSAGE_STRATEGIES.values())


def test_every_message_type_has_a_strategy() -> None:
    assert set(MESSAGE_STRATEGIES) == set(MESSAGE_TYPES.values())


@settings(max_examples=300, deadline=None)
@given(messages)
def test_round_trip(message: Message) -> None:
    body = encode_body(message)
    decoded = decode_body(body)
    assert decoded == message
    assert type(decoded) is type(message)
    assert encode_body(decoded) == body
    frame = encode_frame(message)
    assert HEADER.unpack_from(frame)[0] == len(body)
    assert decode_body(frame[HEADER.size :]) == message
    wire = msgpack.unpackb(body)
    assert wire["type"] == message.TYPE
    sent = {f.name for f in dataclasses.fields(message)}
    sent -= {name for name in message.OMIT_NONE if getattr(message, name) is None}
    assert set(wire) - {"type"} == sent


def test_a_publish_from_before_keys_and_progress_is_still_understood() -> None:
    """Fields added after protocol 1 may be absent (defaults apply); the others may not."""
    old = {"type": "publish_build", "request_id": 1, "slot": 2, "node_type": "llm",
           "config": {}, "alias": None}  # fmt: skip
    message = decode_body(msgpack.packb(old))
    assert message == PublishBuild(request_id=1, slot=2, node_type="llm")
    assert (message.key, message.progress) == (None, False)
    del old["alias"]
    with pytest.raises(RemoteProtocolError, match=r"missing field\(s\) alias$"):
        decode_body(msgpack.packb(old))
    with pytest.raises(RemoteProtocolError, match="unknown field"):
        decode_body(msgpack.packb({**old, "alias": None, "extra": 1}))


@pytest.mark.parametrize("key", ["short", "has space in it", "x" * 129, 12345678, ""])
def test_a_bad_publish_key_is_refused(key: object) -> None:
    body = PublishFile(request_id=1, slot=1, path="/a.npy").to_wire()
    body["key"] = key
    with pytest.raises(RemoteProtocolError, match=r"publish_file\.key: .* is not a publish key"):
        decode_body(msgpack.packb(body))


def test_only_the_server_sends_progress() -> None:
    server, client = server_fresh(), Connection(Role.CLIENT)
    server.receive_data(client.send(Hello(role="publisher", name="p", pid=1)))
    assert isinstance(server.next_event(), Hello)
    client.receive_data(server.send(Welcome(session=1, daemon_pid=2)))
    assert isinstance(client.next_event(), Welcome)
    update = Progress(request_id=1, stage="committing", done=5, total=9, elapsed=1.5)
    client.receive_data(server.send(update))
    assert client.next_event() == update
    with pytest.raises(LocalProtocolError, match="never sends 'progress'"):
        client.send(update)


# -- remote violations: RemoteProtocolError, then ERROR for good -----------------------------------


def frame(message: Message) -> bytes:
    return encode_frame(message)


def raw(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def raw_body(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


ACK_MSG = Ack(slot=1, version=1)
TYPE_KEY = b"\x81\xa4type"  # a map of one entry, then the key "type": its value follows
DUPLICATE_KEY = b"\x84\xa4type\xa3ack\xa4slot\x01\xa7version\x01\xa4slot\x02"


def server_fresh() -> Connection:
    return Connection(Role.SERVER)


def server_ready() -> Connection:
    pair = ConnectionPair()
    pair.handshake()
    return pair.server


def server_after_goodbye() -> Connection:
    pair = ConnectionPair()
    pair.handshake()
    pair.send(pair.client, Goodbye())
    return pair.server


def client_waiting() -> Connection:
    conn = Connection(Role.CLIENT)
    conn.send(HELLO)
    return conn


def client_ready() -> Connection:
    pair = ConnectionPair()
    pair.handshake()
    pair.send(pair.server, Announce(slot=1, version=1, seq=5, committed_at=0.0))
    return pair.client


ACK = {"type": "ack", "slot": 1, "version": 1}
ANNOUNCE = Announce(slot=1, version=2, seq=9, committed_at=0.0)
UNSUBSCRIBE = Unsubscribe()
HEARTBEAT = Heartbeat(pid=1, name="a")
PUBLISH_FILE = PublishFile(request_id=1, slot=1, path="/w.npy")
PUBLISH_BUILD = PublishBuild(request_id=1, slot=1, node_type="llm")
PUBLISH_SHM = PublishShm(request_id=1, slot=1, shm_name="/a", manifest=())
WELCOME = Welcome(session=1, daemon_pid=1)
STATUS = Status(request_id=1, daemon={"pid": 1}, slots=({"slot": 1},))


def bad(message: Message, **changes: Any) -> bytes:
    """A frame of ``message`` with some wire fields replaced."""
    return raw({**message.to_wire(), **changes})


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def hello(**changes: Any) -> Hello:
    return dataclasses.replace(HELLO, **changes)


REMOTE_VIOLATIONS: list[tuple[str, Callable[[], Connection], bytes, str]] = [
    ("subscribe before hello", server_fresh, frame(Subscribe(request_id=1)), "state START"),
    ("second hello", server_ready, frame(HELLO), "may not send 'hello' in state READY"),
    ("welcome from a client", server_fresh, frame(WELCOME), "never"),
    ("announce from a client", server_ready, frame(ANNOUNCE), "client never sends 'announce'"),
    ("non-fatal error from a client", server_ready, frame(Error(kind="x", message="")), "never"),
    ("frame after goodbye", server_after_goodbye, frame(ACK_MSG), "after its goodbye"),
    ("hello from the server", client_waiting, frame(HELLO), "server never sends 'hello'"),
    ("announce before welcome", client_waiting, frame(ANNOUNCE), "state SEND_WELCOME"),
    ("subscribe from the server", client_ready, frame(Subscribe(request_id=1)), "never"),
    ("second welcome", client_ready, frame(WELCOME), "state READY"),
    (
        "unknown protocol in hello",
        server_fresh,
        frame(hello(protocol=3)),
        "client speaks protocol 3; this side speaks 1 and 2",
    ),
    ("other protocol in welcome", client_waiting, bad(WELCOME, protocol=3), "protocol 3"),
    ("announce seq repeats", client_ready, bad(ANNOUNCE, seq=5), "seq must increase"),
    ("empty frame", server_fresh, b"\0\0\0\0", "empty frame"),
    ("oversized header", server_fresh, HEADER.pack(DEFAULT_MAX_FRAME_SIZE + 1), "limit is"),
    ("body is an array", server_ready, raw([1, 2]), "must be a map, got array"),
    ("body is an int", server_ready, raw(5), "must be a map, got integer"),
    ("body is a string", server_ready, raw("hello"), "must be a map, got string"),
    ("too many entries", server_ready, raw({str(i): i for i in range(20)}), "map of 20 entries"),
    ("map16 header cut", server_ready, raw_body(b"\xde\x00"), "truncated map header"),
    (
        "map16 of one entry",
        server_ready,
        raw_body(b"\xde\x00\x01\xa4type\xa1x"),
        "unknown frame type 'x'",
    ),
    ("no type", server_ready, raw({"slot": 1}), "no 'type' field"),
    ("type is an int", server_ready, raw({"type": 1}), "int 'type'"),
    ("unknown type", server_ready, raw({"type": "launch"}), "unknown frame type 'launch'"),
    ("missing field", server_ready, raw({"type": "ack", "slot": 1}), "missing field.*version"),
    ("extra field", server_ready, raw({**ACK, "junk": 0}), "unknown field.*junk"),
    ("slot as string", server_ready, raw({**ACK, "slot": "1"}), "ack.slot: slot must be an int"),
    ("bool as int", server_ready, raw({**ACK, "version": True}), "ack.version"),
    ("float as int", server_ready, raw({**ACK, "slot": 1.0}), "ack.slot"),
    ("negative slot", server_ready, raw({**ACK, "slot": -1}), "ack.slot"),
    ("slot too big", server_ready, raw({**ACK, "slot": 2**31}), "ack.slot"),
    ("version zero", server_ready, raw({**ACK, "version": 0}), "ack.version"),
    ("nil for list", server_ready, bad(UNSUBSCRIBE, slots=None), "slots: must be an array"),
    ("bad group label", server_ready, bad(UNSUBSCRIBE, groups=["../x"]), "unsubscribe.groups"),
    ("bad held pair", server_ready, bad(HEARTBEAT, held=[[1]]), "heartbeat.held"),
    ("escape in name", server_fresh, bad(HELLO, name="a\x1b[2J"), "hello.name"),
    ("unknown role", server_fresh, bad(HELLO, role="root"), "hello.role: must be one of"),
    ("pid zero", server_fresh, bad(HELLO, pid=0), "hello.pid"),
    ("relative path", server_ready, bad(PUBLISH_FILE, path="w.npy"), "not absolute"),
    ("reserved alias", server_ready, bad(PUBLISH_BUILD, alias="latest"), "reserved"),
    ("config not a map", server_ready, bad(PUBLISH_BUILD, config=[]), "config: must be a map"),
    ("config too deep", server_ready, bad(PUBLISH_BUILD, config={"a": nested(40)}), "deeper"),
    ("shm name with slash", server_ready, bad(PUBLISH_SHM, shm_name="/a/b"), "shared-memory"),
    ("nbytes lie", server_ready, bad(PUBLISH_SHM, manifest=[["w", "<f4", [2], 0, 4]]), "nbytes 4"),
    ("object dtype", server_ready, bad(PUBLISH_SHM, manifest=[["w", "|O8", [1], 0, 8]]), "dtype"),
    (
        "repeated tensor",
        server_ready,
        bad(PUBLISH_SHM, manifest=[["w", "|u1", [], 0, 1]] * 2),
        "twice",
    ),
    ("status from a client", server_ready, frame(STATUS), "client never sends 'status'"),
    ("status request from the server", client_ready, frame(StatusRequest(request_id=1)), "never"),
    ("status row not a map", client_ready, bad(STATUS, readers=[1]), r"status.readers: \[0\]"),
    ("status rows", client_ready, bad(STATUS, slots=[{}] * 10_001), "limit is 10000"),
    ("status nan", client_ready, bad(STATUS, daemon={"up": math.inf}), "status.daemon"),
    ("slot twice", client_waiting, bad(WELCOME, versions=[[1, 1], [1, 2]]), "names a slot twice"),
    ("nan timestamp", client_ready, bad(ANNOUNCE, committed_at=math.nan), "finite"),
    ("repeated key", server_ready, raw_body(DUPLICATE_KEY), "repeated key"),
    ("trailing bytes", server_ready, raw_body(msgpack.packb(ACK) + b"\xc0"), "bytes after"),
    ("invalid utf-8", server_ready, raw_body(b"\x81\xa4type\xa2\xff\xfe"), "not valid msgpack"),
    ("reserved byte", server_ready, raw_body(b"\xc1"), "got the reserved byte"),
    ("reserved byte inside", server_ready, raw_body(TYPE_KEY + b"\xc1"), "not valid msgpack"),
    ("truncated body", server_ready, raw_body(b"\x83\xa4type\xa3ack"), "not valid msgpack"),
    ("binary value", server_ready, raw({**ACK, "slot": b"\x01"}), "not valid msgpack"),
    ("extension value", server_ready, raw_body(b"\x81\xa4type\xd4\x01\x00"), "not valid msgpack"),
    ("int map key", server_ready, raw_body(b"\x81\x01\x02"), "not valid msgpack"),
    ("huge array body", server_ready, raw_body(b"\xdd\xff\xff\xff\xff"), "got array"),
    ("huge map body", server_ready, raw_body(b"\xdf\xff\xff\xff\xff"), "4294967295 entries"),
    ("huge array", server_ready, raw_body(TYPE_KEY + b"\xdd\xff\xff\xff\xff"), "max_array_len"),
    ("huge map", server_ready, raw_body(TYPE_KEY + b"\xdf\xff\xff\xff\xff"), "max_map_len"),
    ("nested too deep", server_ready, raw_body(TYPE_KEY + b"\x91" * 2000 + b"\x01"), "1024"),
]


@pytest.mark.parametrize(
    ("setup", "data", "match"),
    [case[1:] for case in REMOTE_VIOLATIONS],
    ids=[case[0] for case in REMOTE_VIOLATIONS],
)
@pytest.mark.parametrize("feed", ["whole", "bytewise"])
def test_remote_violation(
    setup: Callable[[], Connection], data: bytes, match: str, feed: str
) -> None:
    conn = setup()
    with pytest.raises(RemoteProtocolError, match=match) as caught:
        feed_all(conn, data, feed)
    assert conn.their_state is State.ERROR
    with pytest.raises(RemoteProtocolError) as again:
        conn.next_event()
    assert again.value is caught.value
    conn.receive_data(frame(Ack(slot=1, version=1)))  # ignored, no matter what arrives
    with pytest.raises(LocalProtocolError, match="ERROR"):
        conn.send(Goodbye())
    error = decode_body(error_frame_for(caught.value)[HEADER.size :])
    assert error == Error(kind="remote_protocol", message=str(caught.value), fatal=True)


def test_oversized_header_is_refused_before_the_body() -> None:
    conn = server_fresh()
    conn.receive_data(HEADER.pack(2**32 - 1)[:3])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(HEADER.pack(2**32 - 1)[3:])
    with pytest.raises(RemoteProtocolError, match="4294967295-byte frame; the limit is 1048576"):
        conn.next_event()


def test_frame_bound_is_per_connection() -> None:
    small = Connection(Role.SERVER, max_frame_size=64)
    hello = frame(Hello(role="reader", name="a" * 60, pid=1))
    small.receive_data(hello)
    with pytest.raises(RemoteProtocolError, match="limit is 64"):
        small.next_event()
    big = Connection(Role.SERVER, max_frame_size=128)
    big.receive_data(hello)
    assert isinstance(big.next_event(), Hello)


def test_buffer_cap() -> None:
    conn = Connection(Role.SERVER, max_frame_size=64, max_buffer_size=100)
    conn.receive_data(bytes(60))
    with pytest.raises(RemoteProtocolError, match="more than 100 bytes"):
        conn.receive_data(bytes(41))
    assert conn.their_state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="more than 100 bytes"):
        conn.next_event()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\0\0", "inside a frame header"),
        (frame(HELLO)[:-1], r"inside a frame \(.* of .* bytes\)"),
        (frame(HELLO) + b"\0", "inside a frame header"),
    ],
)
def test_eof_inside_a_frame(data: bytes, match: str) -> None:
    conn = server_fresh()
    conn.receive_data(data)
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=match):
        drain(conn)


def test_eof_at_a_frame_boundary_without_goodbye_is_closed() -> None:
    conn = server_fresh()
    conn.receive_data(frame(HELLO))
    conn.receive_data(b"")
    assert drain(conn) == [HELLO, CLOSED]
    assert conn.their_state is State.AWAIT_WELCOME  # the peer left without a goodbye


def test_bytes_after_eof_are_our_bug() -> None:
    conn = server_fresh()
    conn.receive_data(b"")
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        conn.receive_data(b"x")


def test_fatal_error_ends_the_peer() -> None:
    pair = ConnectionPair()
    pair.handshake()
    bye = error_frame_for(RemoteProtocolError("bad frame"))
    pair.client.receive_data(bye)
    [event, _] = drain(pair.client)
    assert isinstance(event, Error)
    assert event.fatal
    assert event.kind == "remote_protocol"
    assert pair.client.their_state is State.DONE
    with pytest.raises(RemoteError, match="remote_protocol: bad frame"):
        raise event.exception()
    pair.client.receive_data(frame(ANNOUNCE))
    with pytest.raises(RemoteProtocolError, match="after its goodbye"):
        pair.client.next_event()


# -- local violations: LocalProtocolError, nothing changes -----------------------------------------


def client_fresh() -> Connection:
    return Connection(Role.CLIENT)


def server_ready_protocol_1() -> Connection:
    """A daemon's side of a session with a reader from before protocol 2."""
    conn = server_fresh()
    conn.receive_data(frame(hello(protocol=1)))
    assert isinstance(conn.next_event(), Hello)
    conn.send(Welcome(protocol=1, session=1, daemon_pid=1))
    return conn


RECORD = VersionRecord("{}", "{}", (("w", "<f4", (2,), 128, 8),), (136, 1, 2, 3))


def test_a_daemon_answers_a_protocol_1_reader_in_protocol_1() -> None:
    server = server_ready_protocol_1()
    assert server.protocol == 1
    plain = Announce(slot=1, version=2, seq=1, committed_at=0)
    client = Connection(Role.CLIENT)
    client.send(hello(protocol=1))
    client.receive_data(frame(Welcome(protocol=1, session=1, daemon_pid=1)))
    assert isinstance(client.next_event(), Welcome)
    client.receive_data(server.send(plain))
    assert client.next_event() == plain


def test_a_protocol_1_reader_refuses_an_announced_record() -> None:
    client = Connection(Role.CLIENT)
    client.send(hello(protocol=1))
    client.receive_data(frame(Welcome(protocol=1, session=1, daemon_pid=1)))
    assert isinstance(client.next_event(), Welcome)
    client.receive_data(frame(Announce(slot=1, version=2, seq=1, committed_at=0, record=RECORD)))
    with pytest.raises(RemoteProtocolError, match="records came with protocol 2"):
        client.next_event()


def test_a_protocol_2_pair_passes_the_record() -> None:
    pair = ConnectionPair()
    pair.handshake()
    announce = Announce(slot=1, version=2, seq=1, committed_at=0, record=RECORD)
    pair.client.receive_data(pair.server.send(announce, frame=frame(announce)))
    got = pair.client.next_event()
    assert got == announce
    assert isinstance(got, Announce) and got.record == RECORD


def server_owing_welcome() -> Connection:
    conn = server_fresh()
    conn.receive_data(frame(HELLO))
    drain(conn)
    return conn


def small_server_ready() -> Connection:
    conn = Connection(Role.SERVER, max_frame_size=64)
    conn.receive_data(frame(HELLO))
    drain(conn)
    conn.send(Welcome(session=1, daemon_pid=1))
    return conn


def client_done() -> Connection:
    conn = ConnectionPair()
    conn.handshake()
    conn.client.send(Goodbye())
    return conn.client


LOCAL_VIOLATIONS: list[tuple[str, Callable[[], Connection], Message, str]] = [
    ("client subscribes before hello", client_fresh, Subscribe(request_id=1), "state START"),
    ("client sends welcome", client_fresh, WELCOME, "never"),
    ("client hello twice", client_waiting, HELLO, "state AWAIT_WELCOME"),
    ("client subscribes before welcome", client_waiting, Subscribe(request_id=1), "AWAIT_WELCOME"),
    ("client non-fatal error", client_ready, Error(kind="x", message="y"), "never"),
    ("client after goodbye", client_done, ACK_MSG, "after its goodbye"),
    ("client other protocol", client_fresh, hello(protocol=3), "protocol 3"),
    ("server welcome before hello", server_fresh, WELCOME, "state START"),
    ("server announces before welcome", server_fresh, ANNOUNCE, "state START"),
    ("server sends hello", server_ready, HELLO, "never"),
    (
        "server other protocol",
        server_owing_welcome,
        Welcome(protocol=1, session=1, daemon_pid=1),
        "speaks protocol 1; the hello asked for 2",
    ),
    (
        "server announces a record to a protocol-1 peer",
        server_ready_protocol_1,
        Announce(slot=1, version=2, seq=1, committed_at=0, record=RECORD),
        "records came with protocol 2",
    ),
    ("oversized frame", small_server_ready, Error(kind="x", message="m" * 1000), "limit is 64"),
]


@pytest.mark.parametrize(
    ("setup", "message", "match"),
    [case[1:] for case in LOCAL_VIOLATIONS],
    ids=[case[0] for case in LOCAL_VIOLATIONS],
)
def test_local_violation_changes_nothing(
    setup: Callable[[], Connection], message: Message, match: str
) -> None:
    conn = setup()
    before = dict(conn.states)
    with pytest.raises(LocalProtocolError, match=match):
        conn.send(message)
    assert conn.states == before
    assert conn.next_event() is NEED_DATA  # still usable


def test_announce_seq_must_increase_when_sending() -> None:
    conn = server_ready()
    conn.send(Announce(slot=1, version=1, seq=3, committed_at=0.0))
    with pytest.raises(LocalProtocolError, match="seq 3 after seq 3"):
        conn.send(Announce(slot=2, version=1, seq=3, committed_at=0.0))
    conn.send(Announce(slot=2, version=1, seq=4, committed_at=0.0))


def test_connection_arguments_are_checked() -> None:
    with pytest.raises(LocalProtocolError, match="max_frame_size"):
        Connection(Role.CLIENT, max_frame_size=10)
    with pytest.raises(LocalProtocolError, match="one full frame"):
        Connection(Role.CLIENT, max_frame_size=1000, max_buffer_size=1000)


# -- building messages locally ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Ack(slot=-1, version=1), "ack.slot"),
        (lambda: Ack(slot=1, version="2"), "ack.version: version must be an integer"),
        (lambda: Hello(role="reader", name="", pid=1), "hello.name"),
        (lambda: Goodbye(reason="x" * 2000), "goodbye.reason: is 2000 UTF-8 bytes"),
        (lambda: Goodbye(reason="\ud800"), "goodbye.reason: is not valid Unicode"),
        (lambda: Error(kind="x", message="a\x00b"), r"error.message: contains control char"),
        (lambda: Subscribe(request_id=-1), "subscribe.request_id"),
        (lambda: Heartbeat(pid=1, name="a", held=((1, 1), (1, 1))), "repeats"),
        (lambda: Announce(slot=1, version=1, seq=0, committed_at=0.0), "announce.seq"),
        (lambda: Announce(slot=1, version=1, seq=1, committed_at=-1.0), "committed_at"),
        (lambda: dataclasses.replace(PUBLISH_BUILD, config={"a": math.inf}), "not a finite"),
        (lambda: TensorSpec("../x", "<f4", (1,), 0, 4), "tensor name"),
        (lambda: TensorSpec("x", "<f4", (-1,), 0, 4), "shape"),
        (lambda: TensorSpec("x", "<f4", (1,) * 33, 0, 4), "more than 32 dimensions"),
        (lambda: TensorSpec("x", "<i3", (1,), 0, 3), "numpy does not know"),
        (lambda: TensorSpec("x", "|V0", (1,), 0, 0), "zero-size"),
    ],
)
def test_invalid_messages_cannot_be_built(build: Callable[[], Any], match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        build()


def test_messages_are_frozen_and_normalized() -> None:
    welcome = Welcome(session=1, daemon_pid=1, versions=[[2, 3]])
    assert dict(welcome.versions) == {2: 3}
    with pytest.raises(TypeError):
        welcome.versions[2] = 4  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        welcome.session = 2  # type: ignore[misc]
    spec = TensorSpec("w", "f4", [2], 0, 8)  # type: ignore[arg-type]
    assert (spec.dtype, spec.shape) == ("<f4", (2,))
    build = PublishBuild(request_id=1, slot=1, node_type="llm", config={"layers": [1, 2]})
    assert build.config["layers"] == (1, 2)
    assert msgpack.unpackb(encode_body(build))["config"] == {"layers": [1, 2]}


def test_error_for_any_exception() -> None:
    error = error_for(ValueError("bad\x00\x1b thing\n" + "é" * 5000))
    assert error.kind == "internal"
    assert error.fatal
    assert error.message.startswith("ValueError: bad?? thing\n")
    assert len(error.message.encode()) <= 4096
    assert error_for(NotFoundError("slot 3"), request_id=4, fatal=False) == Error(
        kind="not_found", message="slot 3", request_id=4, fatal=False
    )
    assert error_for(RemoteError("bad kind!", "x")).kind == "internal"


# -- the state table and the docs ------------------------------------------------------------------

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def test_state_table_covers_every_message() -> None:
    events = {name for table in TRANSITIONS.values() for name in table}
    assert events == {*MESSAGE_TYPES, "error(fatal)"}
    targets = {state for table in TRANSITIONS.values() for state in table.values()}
    assert targets <= {State.AWAIT_WELCOME, State.READY, State.DONE}


def test_docs_describe_every_message_and_state() -> None:
    text = DOCS.read_text()
    for name in MESSAGE_TYPES:
        assert f"`{name}`" in text, name
    for state in State:
        assert state.value in text, state
    assert f"PROTOCOL_VERSION = {PROTOCOL_VERSION}" in text


def test_a_frame_encoded_once_is_checked_per_connection() -> None:
    """The daemon encodes an announcement once for all subscribers: each connection
    still checks its own state, seq order and frame limit, and the bytes are the same."""
    shared = encode_frame(ANNOUNCE)
    ready = server_ready()
    assert ready.send(ANNOUNCE, frame=shared) is shared
    assert shared == frame(ANNOUNCE)
    with pytest.raises(LocalProtocolError, match="seq must increase"):
        ready.send(ANNOUNCE, frame=shared)  # seq 9 again
    with pytest.raises(LocalProtocolError):
        server_fresh().send(ANNOUNCE, frame=shared)  # no handshake yet
    small = ConnectionPair()
    small.server = Connection(Role.SERVER, max_frame_size=len(shared) - HEADER.size - 1)
    small.handshake()  # the welcome fits; the announcement does not
    with pytest.raises(LocalProtocolError, match=f"limit is {len(shared) - HEADER.size - 1}"):
        small.server.send(ANNOUNCE, frame=shared)
