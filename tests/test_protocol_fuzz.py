"""Hostile bytes against the protocol: every input decodes or raises RemoteProtocolError.

Nothing else may escape (no ValueError, TypeError, KeyError, MemoryError...),
the outcome must not depend on how the bytes were chunked, and a declared
container size must cost nothing until the bytes behind it exist.
"""

from __future__ import annotations

import dataclasses
import itertools
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxstore.errors import RemoteProtocolError
from ctxstore.protocol import (
    CLOSED,
    HEADER,
    MESSAGE_TYPES,
    NEED_DATA,
    Ack,
    Announce,
    Connection,
    Error,
    Event,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    Ping,
    Pong,
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
    Welcome,
    decode_body,
    encode_body,
    encode_frame,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CLIENT_MESSAGES: list[Message] = [
    Hello(role="reader", name="worker-1", pid=4321),
    Subscribe(request_id=1, slots=(1, 2, 3), groups=("llm",)),
    Ack(slot=1, version=7),
    Heartbeat(pid=4321, name="worker-1", held=((1, 6), (1, 7)), uss=1 << 20, pss=3 << 20),
    PublishFile(request_id=2, slot=4, path="/tmp/w.npz", alias="best", metadata={"step": 10}),
    PublishBuild(request_id=3, slot=5, node_type="llm", config={"d_model": 64, "layers": [1, 2]}),
    PublishShm(
        request_id=4,
        slot=6,
        shm_name="/ctxstore-pub-1",
        manifest=(TensorSpec("w", "<f4", (2, 3), 0, 24), TensorSpec("b", "|u1", (3,), 24, 3)),
        config={"kind": "cnn"},
    ),
    Unsubscribe(slots=(3,)),
    StatusRequest(request_id=5),
    RepairRequest(request_id=6, slot=None),
    Ping(nonce=1),
    Pong(nonce=2),
    Goodbye(reason="done"),
]
SERVER_MESSAGES: list[Message] = [
    Welcome(session=3, daemon_pid=99, versions={1: 6, 2: 1}),
    Subscribed(request_id=1, versions={1: 6}),
    Announce(slot=1, version=7, seq=1, committed_at=1.5, model_type="llm", aliases={"best": 7}),
    Announce(slot=2, version=2, seq=4, committed_at=2.5),
    Published(request_id=2, slot=4, version=1),
    Status(
        request_id=5,
        daemon={"pid": 99, "uptime_s": 1.5, "truncated": False},
        readers=({"pid": 4321, "held": {"1": 7}, "lag": {"1": 0}},),
        slots=({"slot": 1, "aliases": {"best": 7}}, {"slot": 2, "model_type": None}),
    ),
    Repaired(
        request_id=6,
        problems=({"kind": "wrong_size", "detail": "x", "slot": 1, "version": 2, "tensor": "w"},),
        problems_total=1,
        repairs=({"slot": 1, "from_version": 2, "to_version": 1, "damaged": [2]},),
    ),
    Error(kind="not_found", message="no such node", request_id=3),
    Ping(nonce=9),
    Pong(nonce=1),
    Goodbye(reason="stopping"),
]
HELLO_FRAME = encode_frame(CLIENT_MESSAGES[0])


def server() -> Connection:
    return Connection(Role.SERVER)


def server_ready() -> Connection:
    conn = server()
    conn.receive_data(HELLO_FRAME)
    assert conn.next_event() == CLIENT_MESSAGES[0]
    conn.send(SERVER_MESSAGES[0])
    return conn


def client() -> Connection:
    conn = Connection(Role.CLIENT)
    conn.send(CLIENT_MESSAGES[0])
    return conn


Outcome = tuple[list[Event], str | None]


def outcome(make: Callable[[], Connection], chunks: list[bytes]) -> Outcome:
    """Feed ``chunks`` then EOF; the events read and the RemoteProtocolError text, if any.

    Any exception other than RemoteProtocolError propagates and fails the test.
    """
    conn = make()
    events: list[Event] = []
    try:
        for chunk in [*(c for c in chunks if c), b""]:  # b"" means EOF: only at the end
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not NEED_DATA:
                events.append(event)
                if event is CLOSED:
                    break
    except RemoteProtocolError as exc:
        assert conn.their_state is State.ERROR
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
        return events, str(exc)
    assert events[-1] is CLOSED
    for event in events[:-1]:
        assert isinstance(event, MESSAGE_TYPES[event.TYPE])  # type: ignore[union-attr]
        assert decode_body(encode_body(event)) == event  # type: ignore[arg-type]
    return events, None


def check_any_chunking(make: Callable[[], Connection], data: bytes, cuts: list[int]) -> Outcome:
    """Whole, one byte at a time, and cut at ``cuts``: the same outcome each time."""
    whole = outcome(make, [data])
    assert outcome(make, [data[i : i + 1] for i in range(len(data))]) == whole
    edges = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    assert outcome(make, [data[a:b] for a, b in itertools.pairwise(edges)]) == whole
    return whole


#: who reads -> (connection in the state the stream expects, the frames it reads)
STREAMS: dict[str, tuple[Callable[[], Connection], list[Message]]] = {
    "server": (server_ready, CLIENT_MESSAGES[1:]),
    "server before hello": (server, CLIENT_MESSAGES[:1]),
    "client": (client, SERVER_MESSAGES),
}
ROLES = {
    role: (make, b"".join(encode_frame(m) for m in messages))
    for role, (make, messages) in STREAMS.items()
}
roles = st.sampled_from(sorted(ROLES))
cuts = st.lists(st.integers(0, 10_000), max_size=8)


@FUZZ
@given(roles, st.binary(max_size=300), cuts)
def test_random_bytes(role: str, data: bytes, cut: list[int]) -> None:
    make, _ = ROLES[role]
    check_any_chunking(make, data, cut)


@FUZZ
@given(roles, st.binary(max_size=200), cuts)
def test_random_bytes_after_valid_frames(role: str, junk: bytes, cut: list[int]) -> None:
    make, stream = ROLES[role]
    check_any_chunking(make, stream[: len(stream) // 2] + junk, cut)


@st.composite
def mutated(draw: st.DrawFn, stream: bytes) -> bytes:
    data = bytearray(stream)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if action == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "set" and at < len(data):
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0xC1, 0xDD, 0xDF, 0xDB, 0xC0, 0x7F]))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif action == "truncate":
            del data[at:]
    return bytes(data)


@FUZZ
@given(st.data(), roles, cuts)
def test_mutated_valid_streams(data: st.DataObject, role: str, cut: list[int]) -> None:
    make, stream = ROLES[role]
    check_any_chunking(make, data.draw(mutated(stream)), cut)


@FUZZ
@given(st.binary(max_size=400))
def test_decode_random_bodies(body: bytes) -> None:
    try:
        message = decode_body(body)
    except RemoteProtocolError:
        return
    assert decode_body(encode_body(message)) == message


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def decodes_or_refuses(wire: Any) -> None:
    body = msgpack.packb(wire, use_bin_type=True)
    try:
        message = decode_body(body)
    except RemoteProtocolError:
        return
    assert decode_body(encode_body(message)) == message


FIELD_NAMES = st.sampled_from(
    sorted({f.name for cls in MESSAGE_TYPES.values() for f in dataclasses.fields(cls)})
)


@FUZZ
@given(st.data(), st.sampled_from(CLIENT_MESSAGES + SERVER_MESSAGES), msgpack_values)
def test_wrong_field_types(data: st.DataObject, message: Message, value: Any) -> None:
    wire = message.to_wire()
    key = data.draw(st.sampled_from(sorted(wire)))
    decodes_or_refuses({**wire, key: value})


@FUZZ
@given(
    st.sampled_from([*MESSAGE_TYPES, "", "HELLO"]),
    st.dictionaries(FIELD_NAMES | st.text(max_size=12), msgpack_values, max_size=8),
)
def test_random_maps(kind: str, fields: dict[str, Any]) -> None:
    decodes_or_refuses({"type": kind, **fields})


@FUZZ
@given(st.integers(0, 2**32 - 1), st.sampled_from([64, 1000, 1 << 20]))
def test_length_header_bound(length: int, limit: int) -> None:
    conn = Connection(Role.SERVER, max_frame_size=limit)
    conn.receive_data(HEADER.pack(length))
    if length == 0 or length > limit:
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
    else:
        assert conn.next_event() is NEED_DATA


HUGE_HEADERS = {
    "fixarray": b"\x9f",
    "fixmap": b"\x8f",
    "array16": b"\xdc\xff\xff",
    "array32": b"\xdd\xff\xff\xff\xff",
    "map16": b"\xde\xff\xff",
    "map32": b"\xdf\xff\xff\xff\xff",
    "str8": b"\xd9\xff",
    "str16": b"\xda\xff\xff",
    "str32": b"\xdb\xff\xff\xff\xff",
    "bin8": b"\xc4\xff",
    "bin16": b"\xc5\xff\xff",
    "bin32": b"\xc6\xff\xff\xff\xff",
    "ext8": b"\xc7\xff\x01",
    "ext16": b"\xc8\xff\xff\x01",
    "ext32": b"\xc9\xff\xff\xff\xff\x01",
    "array32 in array32": b"\xdd\x00\x00\x00\x02\xdd\xff\xff\xff\xff",
    "map32 in array32": b"\xdd\x00\x00\x00\x02\xdf\xff\xff\xff\xff",
}


def _packed(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value)
    return packed


PLACEMENTS: dict[str, Callable[[bytes], bytes]] = {
    "body": lambda huge: huge,
    "field": lambda huge: b"\x83" + _packed("type") + _packed("ack") + _packed("slot") + huge,
    "in config": lambda huge: (
        b"\x86"
        + b"".join(
            _packed(x) for x in ["type", "publish_build", "request_id", 1, "slot", 1, "node_type"]
        )
        + _packed("llm")
        + _packed("alias")
        + _packed(None)
        + _packed("config")
        + b"\x81"
        + _packed("a")
        + huge
    ),
}


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
@pytest.mark.parametrize("header", sorted(HUGE_HEADERS))
def test_declared_sizes_cost_nothing(header: str, placement: str) -> None:
    body = PLACEMENTS[placement](HUGE_HEADERS[header])
    conn = server()
    conn.receive_data(encode_frame(CLIENT_MESSAGES[0]))
    conn.next_event()
    tracemalloc.start()
    try:
        conn.receive_data(HEADER.pack(len(body)) + body)
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"{peak} bytes allocated for a {len(body)}-byte frame"


@pytest.mark.parametrize("role", sorted(ROLES))
def test_every_truncation(role: str) -> None:
    make, messages = STREAMS[role]
    stream = ROLES[role][1]
    boundaries = {0}
    for message in messages:
        boundaries.add(max(boundaries) + len(encode_frame(message)))
    for cut in range(len(stream) + 1):
        events, error = outcome(make, [stream[:cut]])
        if cut in boundaries:
            assert error is None
            assert len(events) == sorted(boundaries).index(cut) + 1  # messages, then CLOSED
        else:
            assert error is not None
            assert "closed the connection inside" in error


@FUZZ
@given(roles, cuts)
def test_valid_streams_survive_any_chunking(role: str, cut: list[int]) -> None:
    make, stream = ROLES[role]
    events, error = check_any_chunking(make, stream, cut)
    assert error is None
    assert events[:-1] == STREAMS[role][1]


LONG = settings(FUZZ, max_examples=20_000)


@pytest.mark.slow
@LONG
@given(st.data(), roles, cuts)
def test_mutated_valid_streams_long(data: st.DataObject, role: str, cut: list[int]) -> None:
    make, stream = ROLES[role]
    check_any_chunking(make, data.draw(mutated(stream)), cut)


@pytest.mark.slow
@LONG
@given(st.data(), st.sampled_from(CLIENT_MESSAGES + SERVER_MESSAGES), msgpack_values)
def test_wrong_field_types_long(data: st.DataObject, message: Message, value: Any) -> None:
    wire = message.to_wire()
    decodes_or_refuses({**wire, data.draw(st.sampled_from(sorted(wire))): value})
