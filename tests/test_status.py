"""`ctxstore status` and `ctxstore watch`: the Status frame, its tables, and both commands live.

The pure parts (rows, trimming to one frame, formatting) are tested without a
daemon; the commands run against a real daemon process with real readers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from support.daemon import DaemonProcess, running_daemon

from ctxstore import Context
from ctxstore.cli import main
from ctxstore.cli.status_text import duration, format_event, format_status, held_text
from ctxstore.client import DaemonClient, publish
from ctxstore.daemon.status_rows import build_status, reader_rows
from ctxstore.errors import RemoteProtocolError
from ctxstore.messages import MAX_STATUS_ROWS, Status, StatusRequest, decode_body, encode_body
from ctxstore.readers import Reader, VersionEvent
from ctxstore.versiontable import segment_name

# -- rows, trimming, formatting (no daemon) -------------------------------------------------------


@dataclass
class Peer:
    session: int
    pid: int = 100
    name: str = "worker"
    role: str = "reader"
    uid: int = 1000
    connected_at: float = 10.0
    last_seen: float = 40.0
    held: set[tuple[int, int]] = field(default_factory=set)
    uss: int = 1 << 20
    pss: int = 3 << 20
    acks: int = 0


def test_reader_rows_report_newest_held_lag_and_older_versions() -> None:
    peers = [
        Peer(2, held={(3, 1), (3, 2), (5, 4)}),
        Peer(1, pid=7, role="admin"),
        Peer(3, held={(3, 3), (9, 1)}),
    ]
    rows = reader_rows(peers, current={3: 2, 5: 6}, now=42.5)
    assert [row["session"] for row in rows] == [1, 2, 3]
    admin, behind, ahead = rows
    assert admin["held"] == {} and admin["lag"] == {} and admin["role"] == "admin"
    assert behind["held"] == {"3": 2, "5": 4}
    assert behind["lag"] == {"3": 0, "5": 2}
    assert behind["older"] == {"3": [1]}
    assert (behind["connected_s"], behind["last_seen_s"]) == (32.5, 2.5)
    assert ahead["lag"] == {"3": -1}  # rolled back, not followed yet; slot 9 has no current
    assert Status(request_id=1, readers=tuple(rows)).readers[1]["held"]["5"] == 4


def _slot(i: int) -> dict[str, Any]:
    return {
        "slot": i,
        "model_type": "llm",
        "current_version": 2,
        "latest_version": 3,
        "n_versions": 3,
        "aliases": {"best": 2},
    }


def test_build_status_trims_to_one_frame_and_says_so() -> None:
    readers = reader_rows([Peer(i, held={(1, 1)}) for i in range(1, 4)], {1: 1}, 50.0)
    slots = [_slot(i) for i in range(5000)]
    status = build_status(7, {"pid": 1}, readers, slots, slots_total=6000, max_frame_size=4096)
    assert len(encode_body(status)) <= 4096
    assert len(status.readers) == 3  # readers first
    daemon = status.daemon
    assert 0 < daemon["slots_shown"] == len(status.slots) < 5000
    assert (daemon["slots_total"], daemon["readers_total"], daemon["truncated"]) == (6000, 3, True)
    assert [row["slot"] for row in status.slots] == list(range(len(status.slots)))
    assert "showing the first" in format_status(status)
    assert decode_body(encode_body(status)) == status


def test_build_status_caps_rows_and_keeps_small_answers_whole() -> None:
    slots = [{"slot": i} for i in range(MAX_STATUS_ROWS + 5)]
    status = build_status(1, {}, [], slots, max_frame_size=1 << 20)
    assert len(status.slots) == MAX_STATUS_ROWS and status.daemon["truncated"] is True
    small = build_status(1, {"pid": 3}, [], slots[:4], max_frame_size=1 << 20)
    assert len(small.slots) == 4 and small.daemon["truncated"] is False
    assert small.daemon["pid"] == 3


def test_format_status_tables() -> None:
    readers = reader_rows(
        [
            Peer(1, pid=11, name="w1", held={(3, 1), (3, 2)}, pss=5 << 20),
            Peer(2, pid=12, name="w2", held={(3, 1)}, pss=7 << 20),
            Peer(4, pid=13, name="trainer", role="publisher"),
        ],
        {3: 2},
        now=40.0,
    )
    status = build_status(
        1,
        {"pid": 812, "uptime_s": 3725.0, "commits": 4, "subscribers": 3, "store": "/s"},
        readers,
        [_slot(3), {**_slot(4), "aliases": {}, "model_type": None}],
        max_frame_size=1 << 20,
    )
    text = format_status(status)
    assert "daemon pid 812, up 1h02m, 4 commits this run, 3 connections" in text
    assert "total PSS 12.0 MiB" in text
    assert "also connected: trainer (publisher)" in text
    lines = text.splitlines()
    w1 = next(line.split() for line in lines if " w1 " in line)
    w2 = next(line.split() for line in lines if " w2 " in line)
    assert w1[:5] == ["11", "w1", "3:v2(+1)", "0", "1.0"]
    assert w2[:4] == ["12", "w2", "3:v1", "1"]
    assert ["3", "llm", "2", "3", "3", "best=2"] in [line.split() for line in lines]
    assert ["4", "-", "2", "3", "3", "-"] in [line.split() for line in lines]


def test_small_formatters() -> None:
    assert [duration(s) for s in (0.25, 45, 723, 11040, 183600)] == [
        "0.2s",
        "45s",
        "12m03s",
        "3h04m",
        "2d03h",
    ]
    assert duration(None) == duration(float("nan")) == duration(True) == "?"
    held = {str(s): 1 for s in range(10, 16)}
    assert held_text(held) == "10:v1 11:v1 12:v1 13:v1 +2 more"
    assert held_text({}) == held_text("junk") == "-"
    event = VersionEvent(
        slot=3,
        version=4,
        previous=3,
        source="announce",
        committed_at=100.0,
        model_type="llm",
        aliases={"best": 4},
    )
    line = format_event(event, 100.0025)
    assert "announce  slot 3  version 4  type llm  aliases best=4  latency 2.50 ms" in line


# -- the decoder refuses malformed status frames --------------------------------------------------


def _body(**wire: Any) -> bytes:
    return msgpack.packb(wire, use_bin_type=True)


def _status_wire(**changes: Any) -> dict[str, Any]:
    return {"type": "status", "request_id": 1, "daemon": {}, "readers": [], "slots": [], **changes}


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        ({"type": "status_request"}, "missing field.*request_id"),
        ({"type": "status_request", "request_id": -1}, "status_request.request_id"),
        ({"type": "status_request", "request_id": 1, "x": 1}, "unknown field"),
        ({"type": "status", "request_id": 1, "daemon": {}, "readers": []}, "missing.*slots"),
        (_status_wire(daemon=[]), "status.daemon: must be a map"),
        (_status_wire(readers={}), "status.readers: must be an array"),
        (_status_wire(slots=["x"]), r"status.slots: \[0\] must be a map"),
        (_status_wire(slots=[{}] * 10_001), "10001 rows; the limit is 10000"),
        (_status_wire(daemon={"a": _deep(40)}), "deeper"),
        (_status_wire(readers=[{"pss": float("nan")}]), "not a finite number"),
        (_status_wire(request_id="1"), "status.request_id"),
    ],
)
def test_decoder_refuses_malformed_status(wire: dict[str, Any], match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_body(_body(**wire))


def test_status_messages_round_trip() -> None:
    for message in (
        StatusRequest(request_id=9),
        Status(request_id=9, daemon={"pid": 2}, readers=({"held": {"1": 2}},), slots=()),
    ):
        assert decode_body(encode_body(message)) == message


# -- both commands against a real daemon ---------------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    with running_daemon(tmp_path) as proc:
        yield proc


def _args(daemon: DaemonProcess, *rest: str) -> list[str]:
    return [*rest, "--store", str(daemon.store), "--socket", str(daemon.socket)]


def _status(daemon: DaemonProcess) -> Status:
    with DaemonClient(daemon.socket, role="admin", name="test-status", timeout=10) as client:
        rid = client.next_request_id()
        reply = client.request(StatusRequest(request_id=rid), rid)
    assert isinstance(reply, Status)
    return reply


def _until(condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


def _ctx(value: float) -> Context:
    return Context({"w": np.full(8, value)})


def test_status_shows_readers_lag_and_slots(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(3, _ctx(1), socket=daemon.socket, model_type="llm", alias="best")
    publish(3, _ctx(2), socket=daemon.socket)
    publish(4, _ctx(3), socket=daemon.socket, model_type="cnn")
    with Reader(daemon.store, daemon.socket, name="worker-1", heartbeat_interval=0.1) as reader:
        assert reader.get(3).version == 2
        reader.get(3, "best")

        def caught_up() -> dict[str, Any] | None:
            rows = [r for r in _status(daemon).readers if r["name"] == "worker-1"]
            # a heartbeat sent between the two get()s above reports no older version yet
            if rows and rows[0]["held"] == {"3": 2} and rows[0]["older"] and rows[0]["pss"] > 0:
                return dict(rows[0])
            return None

        row = _until(caught_up)
        assert row["pid"] == os.getpid() and row["role"] == "reader"
        assert row["lag"] == {"3": 0} and row["older"] == {"3": (1,)}
        assert row["uss"] > 0

        assert main(_args(daemon, "status")) == 0
        text = capsys.readouterr().out
        assert f"daemon pid {daemon.proc.pid}" in text and "3 commits this run" in text
        worker = next(line.split() for line in text.splitlines() if "worker-1" in line)
        assert worker[:4] == [str(os.getpid()), "worker-1", "3:v2(+1)", "0"]
        slot_lines = [line.split() for line in text.splitlines()]
        assert ["3", "llm", "2", "2", "2", "best=1"] in slot_lines
        assert ["4", "cnn", "1", "1", "1", "-"] in slot_lines

        assert main(_args(daemon, "status", "--json")) == 0
        body = json.loads(capsys.readouterr().out)
        assert body["daemon"]["pid"] == daemon.proc.pid
        assert body["daemon"]["store"] == str(daemon.store)
        assert body["daemon"]["version_table"] == segment_name(daemon.store)
        assert body["daemon"]["truncated"] is False
        assert {"slot": 3, "model_type": "llm", "current_version": 2, "latest_version": 2,
                "n_versions": 2, "aliases": {"best": 1}} in body["slots"]  # fmt: skip
        worker_row = next(r for r in body["readers"] if r["name"] == "worker-1")
        assert worker_row["held"] == {"3": 2} and worker_row["lag"] == {"3": 0}


def test_status_does_not_count_its_own_connection(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """Once the reader is the only other peer: 1 connection, its row and no other.

    Waits for that state, because the publisher's and earlier status commands'
    connections linger until the daemon reads their EOF.
    """
    publish(1, _ctx(1), socket=daemon.socket)

    def text_once_settled() -> str | None:
        assert main(_args(daemon, "status")) == 0
        out: str = capsys.readouterr().out
        return out if "worker-1" in out and "also connected" not in out else None

    def json_once_settled() -> dict[str, Any] | None:
        assert main(_args(daemon, "status", "--json")) == 0
        body: dict[str, Any] = json.loads(capsys.readouterr().out)
        others = [row for row in body["readers"] if row["role"] != "reader"]
        return body if body["readers"] and not others else None

    with Reader(daemon.store, daemon.socket, name="worker-1") as reader:
        assert reader.get(1).version == 1
        text = _until(text_once_settled)
        assert "1 commit this run, 1 connection\n" in text
        body = _until(json_once_settled)
    assert [row["name"] for row in body["readers"]] == ["worker-1"]
    assert body["daemon"]["subscribers"] == 1
    assert (body["daemon"]["readers_total"], body["daemon"]["readers_shown"]) == (1, 1)


def test_status_watch_refreshes_count_times(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(1, _ctx(1), socket=daemon.socket)
    argv = _args(daemon, "status", "--watch", "--count", "3", "--interval", "0.01")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("ctxstore status at ") == 3
    assert out.count("slots: 1") == 3
    assert "\x1b[" not in out  # not a terminal: frames follow one another
    assert main([*argv, "--json"]) == 0
    frames = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(frames) == 3 and all(f["daemon"]["slots_total"] == 1 for f in frames)


def test_status_without_a_daemon_fails_clearly(tmp_path: Path) -> None:
    sock = tmp_path / "none.sock"
    result = subprocess.run(
        [sys.executable, "-m", "ctxstore.cli", "status", "--socket", str(sock)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert f"cannot reach the ctxstore daemon at {sock}" in result.stderr
    assert "Traceback" not in result.stderr


def _read_lines(proc: subprocess.Popen[str], until: Callable[[str], bool]) -> list[str]:
    """stdout lines up to the first one ``until`` accepts (the watch's --timeout bounds it)."""
    assert proc.stdout is not None
    lines = []
    while True:
        line = proc.stdout.readline()
        assert line, f"watch ended early: {lines!r}"
        lines.append(line.rstrip("\n"))
        if until(line):
            return lines


def test_watch_prints_each_announcement(daemon: DaemonProcess) -> None:
    publish(5, _ctx(0), socket=daemon.socket, model_type="llm")
    argv = _args(daemon, "watch", "5", "--count", "3", "--timeout", "60")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctxstore.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The snapshot line proves the subscription is in place: nothing after it is missed.
        first = _read_lines(proc, lambda line: "current" in line)
        assert "slot 5  version 1  type llm" in first[-1]
        publish(5, _ctx(1), socket=daemon.socket, alias="best")
        publish(6, _ctx(9), socket=daemon.socket)  # not watched
        publish(5, _ctx(2), socket=daemon.socket)
        publish(5, _ctx(3), socket=daemon.socket)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    announced = [line for line in out.splitlines() if "announce" in line]
    assert len(announced) == 3
    assert [line.split()[5] for line in announced] == ["2", "3", "4"]
    assert "aliases best=2" in announced[0]
    assert all(line.endswith(" ms") for line in announced)
    assert "slot 6" not in out
    assert "connected" in err


def test_watch_all_slots_as_json_and_timeout_exit_codes(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(8, _ctx(0), socket=daemon.socket, model_type="cnn", alias="best")
    # Only the snapshot arrives: --count 1 is not reached before the timeout.
    assert main(_args(daemon, "watch", "--json", "--count", "1", "--timeout", "1")) == 1
    captured = capsys.readouterr()
    event = json.loads(captured.out.splitlines()[0])
    assert event["source"] == "current" and (event["slot"], event["version"]) == (8, 1)
    assert event["model_type"] == "cnn" and event["aliases"] == {"best": 1}
    assert event["latency_ms"] is None
    assert "0 of 1 announcements" in captured.err
    assert main(_args(daemon, "watch", "8", "--timeout", "0.2")) == 0
