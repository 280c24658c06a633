"""The wire format does not move: every message kind encodes to the bytes it always did,
and every malformed body is refused with the words it always was.

``tests/wire_golden.json`` was written by the code before the ``ctxstore.wire``
package existed (``python tests/test_wire_golden.py --write`` on that commit); the
protocol-2 samples at the end (``hello-2``, ``announce-record``) were added when
protocol 2 gave announce its version record, every entry before them unchanged.
It holds the encoded body of each sample message below, and, for each field of
each sample, what the decoder made of that field replaced by each of a few hostile
values: the re-encoded body when it accepted it, the refusal text when it did not.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from ctxstore.errors import RemoteProtocolError
from ctxstore.wire import (
    MESSAGE_TYPES,
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
    VersionRecord,
    Welcome,
    decode_body,
    encode_body,
)

GOLDEN = pathlib.Path(__file__).with_name("wire_golden.json")

#: what each field of each sample is replaced with, one at a time
HOSTILE: tuple[Any, ...] = (
    None, True, -1, 0, 2**31, 2**63, 1.5, "", "x", "/dev/shm/x", "A" * 300, "a\x00b",
    [], [1, 2], [[1, 2], [1, 2]], [["a", 1]], {}, {"a": 1}, {"latest": 3}, {"1": float("inf")},
)  # fmt: skip


def samples() -> Iterator[tuple[str, Message]]:
    """One or more of each message kind: defaults and every optional field set."""
    spec = TensorSpec("layer.0/w", "<f4", (2, 3), 0, 24)
    bf16 = TensorSpec("b", "bfloat16", (4,), 64, 8)
    # protocol 1's handshake, as it always was (a daemon still answers a protocol-1 peer)
    yield "hello", Hello(protocol=1, role="reader", name="worker-1", pid=4242)
    yield "welcome", Welcome(protocol=1, session=7, daemon_pid=99, versions={0: 3, 12: 1})
    yield "welcome-empty", Welcome(protocol=1, session=1, daemon_pid=1)
    yield "subscribe", Subscribe(request_id=5, slots=(1, 2), groups=("llm",), all=False)
    yield "subscribe-all", Subscribe(request_id=0, all=True)
    yield "subscribed", Subscribed(request_id=5, versions={1: 4, 2: 9})
    yield "unsubscribe", Unsubscribe(slots=(3,), groups=("a.b",), all=True)
    yield "announce", Announce(slot=1, version=2, seq=3, committed_at=1.25e9,
                               model_type="llama", aliases={"prod": 2, "canary": 1})  # fmt: skip
    yield "announce-min", Announce(slot=0, version=1, seq=1, committed_at=0)
    yield "ack", Ack(slot=2**31 - 1, version=2**63 - 1)
    yield "damage_report", DamageReport(slot=1, version=2, detail="checksum of 'w' differs")
    yield "heartbeat", Heartbeat(pid=12, name="r", held=((1, 2), (3, 4)), uss=10, pss=2**40)
    yield "publish_file", PublishFile(request_id=1, slot=2, path="/data/x.npz",
                                      model_type="cnn", alias="best",
                                      metadata={"a": [1, 2.5, None, {"b": "c"}]},
                                      key="abcdefgh-1", progress=True)  # fmt: skip
    yield "publish_file-min", PublishFile(request_id=1, slot=2, path="/x")
    yield "publish_build", PublishBuild(request_id=3, slot=4, node_type="llm",
                                        config={"layers": 2, "f": 0.5}, alias="x",
                                        key="K" * 128, progress=True)  # fmt: skip
    yield "publish_shm", PublishShm(request_id=9, slot=8, shm_name="/ctx-1.a",
                                    manifest=(spec, bf16), config={"c": True},
                                    metadata={"m": "é"}, model_type="t", alias="al",
                                    key="________", progress=False)  # fmt: skip
    yield "publish_shm-empty", PublishShm(request_id=0, slot=0, shm_name="/_", manifest=())
    yield "published", Published(request_id=1, slot=2, version=3)
    yield "progress", Progress(request_id=1, stage="reading", done=5, total=10, elapsed=0.5)
    yield "progress-min", Progress(request_id=1, stage="waiting")
    yield "status_request", StatusRequest(request_id=77)
    daemon = {"pid": 3, "nested": {"l": [1, {"x": None}]}}
    readers = ({"name": "r", "held": [[1, 2]]},)
    yield "status", Status(request_id=1, daemon=daemon, readers=readers, slots=({"slot": 1},))
    yield "status-min", Status(request_id=1)
    yield "repair_request", RepairRequest(request_id=2, slot=5)
    yield "repair_request-all", RepairRequest(request_id=2)
    problems = ({"kind": "k", "detail": "d"},)
    repairs = ({"slot": 1, "to_version": None},)
    yield "repaired", Repaired(request_id=2, problems=problems, problems_total=4, repairs=repairs)
    yield "error", Error(kind="not_found", message="no slot 3\n\tat all", request_id=4, fatal=True)
    yield "error-min", Error(kind="internal", message="")
    yield "goodbye", Goodbye(reason="bye now")
    yield "goodbye-min", Goodbye()
    yield "ping", Ping(nonce=0)
    yield "pong", Pong(nonce=2**63 - 1)
    # protocol 2 (added last, so the entries above keep their golden data): its hello and
    # an announcement with a version record
    yield "hello-2", Hello(role="reader", name="worker-1", pid=4242)
    record = VersionRecord('{"layers":2}', "{}", (("w", "<f4", (2, 3), 128, 24),), (152, 1, 2, 3))
    yield "announce-record", Announce(slot=1, version=2, seq=3, committed_at=1.5, record=record)


def outcome(body: bytes) -> str:
    """What decoding ``body`` gives: ``ok <sha256 of the re-encoded body>`` or ``refused <why>``."""
    try:
        message = decode_body(body)
    except RemoteProtocolError as exc:
        return f"refused {exc}"
    return f"ok {hashlib.sha256(encode_body(message)).hexdigest()[:24]}"


def variants(wire: dict[str, Any]) -> Iterator[tuple[str, bytes]]:
    """``wire`` with one field replaced by each hostile value then removed, field by field,
    and with an unknown field added (named ``+``)."""
    for name in wire:
        for value in HOSTILE:
            yield name, msgpack.packb({**wire, name: value})
        yield name, msgpack.packb({k: v for k, v in wire.items() if k != name})
    yield "+", msgpack.packb({**wire, "extra": 1})


def decisions() -> dict[str, dict[str, list[str]]]:
    """sample -> field -> the outcome of each of its variants, in order."""
    table: dict[str, dict[str, list[str]]] = {}
    for label, message in samples():
        wire = msgpack.unpackb(encode_body(message), raw=False)
        fields: dict[str, list[str]] = table.setdefault(label, {})
        for name, body in variants(wire):
            fields.setdefault(name, []).append(outcome(body))
    return table


def current() -> dict[str, Any]:
    """The fixture's content as this code makes it (outcomes stored once, cited by index)."""
    outcomes: list[str] = []
    index: dict[str, int] = {}
    cited = {
        label: {
            name: [index.setdefault(o, len(index)) for o in found] for name, found in fields.items()
        }
        for label, fields in decisions().items()
    }
    outcomes = sorted(index, key=index.__getitem__)
    encoded = {label: encode_body(message).hex() for label, message in samples()}
    return {"encoded": encoded, "outcomes": outcomes, "decided": cited}


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(GOLDEN.read_text())
    return loaded


def test_every_message_kind_encodes_to_the_golden_bytes(golden: dict[str, Any]) -> None:
    encoded = {label: encode_body(message).hex() for label, message in samples()}
    assert encoded == golden["encoded"]
    assert len({type(message).TYPE for _, message in samples()}) == len(MESSAGE_TYPES)


def test_the_golden_bytes_decode_back_to_the_same_messages(golden: dict[str, Any]) -> None:
    for label, message in samples():
        assert decode_body(bytes.fromhex(golden["encoded"][label])) == message, label


def test_every_hostile_variant_is_decided_as_before(golden: dict[str, Any]) -> None:
    outcomes = golden["outcomes"]
    before = {
        (label, name): [outcomes[i] for i in cited]
        for label, fields in golden["decided"].items()
        for name, cited in fields.items()
    }
    now = {
        (label, name): found
        for label, fields in decisions().items()
        for name, found in fields.items()
    }
    assert now.keys() == before.keys()
    changed = {
        key: list(zip(before[key], found, strict=True))
        for key, found in now.items()
        if found != before[key]
    }
    assert changed == {}
    assert sum(o.startswith("refused") for o in outcomes) > 500


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    GOLDEN.write_text(json.dumps(current(), indent=0) + "\n")
