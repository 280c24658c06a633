"""sd_notify: messages reach a real datagram socket named by NOTIFY_SOCKET.

`NotifySink` stands in for systemd's side of the protocol and is meant for
reuse: the daemon's end-to-end test starts `ctxstore daemon` with
``NOTIFY_SOCKET=sink.address`` and waits on ``sink.wait_for("READY")``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.notify import NotifyMessage, NotifySink

from ctxstore.daemon.notify import Notifier, parse_notify_address, status_loop, watchdog_loop
from ctxstore.errors import InvalidInputError


@pytest.fixture
def notify_sink(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySink]:
    """A NotifySink whose address is exported as NOTIFY_SOCKET for the test."""
    sink = NotifySink()
    monkeypatch.setenv("NOTIFY_SOCKET", sink.address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sink
    sink.close()


def _only(sink: NotifySink) -> NotifyMessage:
    messages = sink.drain()
    assert len(messages) == 1, [m.raw for m in messages]
    return messages[0]


# --- messages on the wire ----------------------------------------------------------------


def test_ready_sends_ready_and_status_from_our_pid(notify_sink: NotifySink) -> None:
    with Notifier() as notifier:
        assert notifier.enabled
        assert notifier.ready(status="serving 3 slots")
    message = _only(notify_sink)
    assert message.raw == b"READY=1\nSTATUS=serving 3 slots"
    assert message.pid == os.getpid()


def test_ready_without_status_is_a_single_assignment(notify_sink: NotifySink) -> None:
    with Notifier() as notifier:
        notifier.ready()
    assert _only(notify_sink).raw == b"READY=1"


def test_status_is_flattened_to_one_line(notify_sink: NotifySink) -> None:
    # A newline would smuggle a second assignment (e.g. READY=1) into the datagram.
    with Notifier() as notifier:
        notifier.status("committing slot 7\nREADY=1")
    assert _only(notify_sink).fields == {"STATUS": "committing slot 7 READY=1"}


def test_stopping_and_watchdog(notify_sink: NotifySink) -> None:
    with Notifier() as notifier:
        assert notifier.watchdog()
        assert notifier.stopping(status="draining")
    first, second = notify_sink.drain()
    assert first.fields == {"WATCHDOG": "1"}
    assert second.fields == {"STOPPING": "1", "STATUS": "draining"}


def test_reloading_carries_monotonic_usec(notify_sink: NotifySink) -> None:
    with Notifier(clock_usec=lambda: 123_456_789) as notifier:
        notifier.reloading()
        notifier.ready(status="reloaded")
    reload_msg, ready_msg = notify_sink.drain()
    assert reload_msg.fields == {"RELOADING": "1", "MONOTONIC_USEC": "123456789"}
    assert ready_msg.fields == {"READY": "1", "STATUS": "reloaded"}


def test_reloading_default_clock_is_clock_monotonic(notify_sink: NotifySink) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    with Notifier() as notifier:
        notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert before <= int(_only(notify_sink).fields["MONOTONIC_USEC"]) <= after


def test_extend_timeout_in_microseconds(notify_sink: NotifySink) -> None:
    with Notifier() as notifier:
        notifier.extend_timeout(1.5)
        with pytest.raises(InvalidInputError, match="positive duration"):
            notifier.extend_timeout(0)
    assert _only(notify_sink).fields == {"EXTEND_TIMEOUT_USEC": "1500000"}


def test_abstract_namespace_address(monkeypatch: pytest.MonkeyPatch) -> None:
    sink = NotifySink(abstract=True)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", sink.address)
        assert sink.address.startswith("@")
        with Notifier() as notifier:
            assert notifier.ready()
        assert _only(sink).raw == b"READY=1"
    finally:
        sink.close()


def test_environment_mapping_can_be_passed_explicitly(
    notify_sink: NotifySink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET")
    with Notifier({"NOTIFY_SOCKET": notify_sink.address}) as notifier:
        notifier.ready()
    assert _only(notify_sink).raw == b"READY=1"


# --- addresses -----------------------------------------------------------------------------


def test_parse_notify_address_forms() -> None:
    assert parse_notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert parse_notify_address("@sd-notify") == b"\0sd-notify"
    for bad in ("relative/notify", "@", "vsock:2:1234"):
        with pytest.raises(InvalidInputError, match="NOTIFY_SOCKET"):
            parse_notify_address(bad)


# --- outside systemd and on failure: never raise into the daemon ----------------------------


def test_no_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    with Notifier() as notifier:
        assert not notifier.enabled
        assert notifier.ready(status="x") is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
        assert notifier.watchdog_interval() is None


def test_unusable_notify_socket_value_disables_with_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING), Notifier({"NOTIFY_SOCKET": "not/absolute"}) as n:
        assert not n.enabled
        assert n.ready() is False
    assert "sd_notify disabled" in caplog.text


def test_send_failure_is_logged_once_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gone = str(tmp_path / "nobody-listens.sock")
    with caplog.at_level(logging.DEBUG), Notifier({"NOTIFY_SOCKET": gone}) as notifier:
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "sd_notify" in warnings[0].getMessage()


def test_sends_after_close_are_no_ops(notify_sink: NotifySink) -> None:
    notifier = Notifier()
    notifier.close()
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notify_sink.drain() == []


# --- watchdog period ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "expected"),
    [("30000000", 15.0), ("1", 0.0000005), ("5000000", 2.5)],
)
def test_watchdog_interval_is_half_the_period(
    notify_sink: NotifySink, usec: str, expected: float
) -> None:
    env = {"NOTIFY_SOCKET": notify_sink.address, "WATCHDOG_USEC": usec}
    with Notifier(env) as notifier:
        assert notifier.watchdog_interval() == pytest.approx(expected)


def test_watchdog_interval_for_our_pid(notify_sink: NotifySink) -> None:
    env = {
        "NOTIFY_SOCKET": notify_sink.address,
        "WATCHDOG_USEC": "20000000",
        "WATCHDOG_PID": str(os.getpid()),
    }
    with Notifier(env) as notifier:
        assert notifier.watchdog_interval() == 10.0


@pytest.mark.parametrize("pid", [str(os.getpid() + 1), "1", "not-a-pid"])
def test_watchdog_for_another_pid_is_not_ours(notify_sink: NotifySink, pid: str) -> None:
    env = {"NOTIFY_SOCKET": notify_sink.address, "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": pid}
    with Notifier(env) as notifier:
        assert notifier.watchdog_interval() is None


@pytest.mark.parametrize("usec", ["0", "-5", "", "soon", "1.5"])
def test_bad_watchdog_usec_means_no_watchdog(notify_sink: NotifySink, usec: str) -> None:
    env = {"NOTIFY_SOCKET": notify_sink.address, "WATCHDOG_USEC": usec}
    with Notifier(env) as notifier:
        assert notifier.watchdog_interval() is None


def test_no_watchdog_usec_means_no_watchdog(notify_sink: NotifySink) -> None:
    with Notifier() as notifier:
        assert notifier.watchdog_interval() is None


# --- watchdog loop: cadence through an injected sleep ---------------------------------------


class _Stop(Exception):
    """Ends a watchdog_loop run after a fixed number of sleeps."""


class _ScriptedSleep:
    """Records each requested sleep and stops the loop after ``rounds`` of them."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.requested: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.requested.append(seconds)
        if len(self.requested) >= self.rounds:
            raise _Stop


def _run_loop(
    notifier: Notifier, interval: float, health: list[bool], sleep: _ScriptedSleep
) -> None:
    states = iter(health)

    async def main() -> None:
        with pytest.raises(_Stop):
            await watchdog_loop(notifier, interval, lambda: next(states), sleep=sleep)

    asyncio.run(main())


def test_watchdog_loop_pings_once_per_interval(notify_sink: NotifySink) -> None:
    env = {"NOTIFY_SOCKET": notify_sink.address, "WATCHDOG_USEC": "8000000"}
    sleep = _ScriptedSleep(rounds=5)
    with Notifier(env) as notifier:
        interval = notifier.watchdog_interval()
        assert interval == 4.0
        _run_loop(notifier, interval, [True] * 5, sleep)
    assert sleep.requested == [4.0] * 5
    assert [m.fields for m in notify_sink.drain()] == [{"WATCHDOG": "1"}] * 5


def test_watchdog_loop_withholds_pings_while_unhealthy(
    notify_sink: NotifySink, caplog: pytest.LogCaptureFixture
) -> None:
    health = [True, True, False, False, False, True]
    sleep = _ScriptedSleep(rounds=len(health))
    with caplog.at_level(logging.WARNING), Notifier() as notifier:
        _run_loop(notifier, 1.0, health, sleep)
    assert len(notify_sink.drain()) == health.count(True)
    assert "unhealthy" in caplog.text
    assert "healthy again" in caplog.text


def test_watchdog_loop_counts_a_raising_health_check_as_unhealthy(
    notify_sink: NotifySink, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> bool:
        raise RuntimeError("store handle lost")

    async def main() -> None:
        with pytest.raises(_Stop):
            await watchdog_loop(notifier, 1.0, broken, sleep=_ScriptedSleep(rounds=3))

    with caplog.at_level(logging.WARNING), Notifier() as notifier:
        asyncio.run(main())
    assert notify_sink.drain() == []
    assert "store handle lost" in caplog.text


def test_watchdog_loop_stops_on_cancel_with_real_sleep(notify_sink: NotifySink) -> None:
    """Bounded real run: ping, then cancel while the loop sleeps; no timing asserted."""

    async def main() -> None:
        task = asyncio.create_task(watchdog_loop(notifier, 3600.0, lambda: True))
        await asyncio.sleep(0)  # let the task send its first ping and start sleeping
        notify_sink.wait_for("WATCHDOG", timeout=10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with Notifier() as notifier:
        asyncio.run(main())


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan"), float("inf")])
def test_watchdog_loop_rejects_bad_interval(notify_sink: NotifySink, interval: float) -> None:
    async def main() -> None:
        await watchdog_loop(notifier, interval, lambda: True)

    with Notifier() as notifier, pytest.raises(InvalidInputError, match="watchdog interval"):
        asyncio.run(main())


def test_status_loop_sends_changes_only_and_ends_when_the_daemon_stops(
    notify_sink: NotifySink,
) -> None:
    """Nothing follows the shutdown's own line: the loop checks ``running`` before each send."""
    texts = iter(["2 peers", "2 peers", "3 peers", "4 peers"])
    running = iter([True, True, True, False])
    sleep = _ScriptedSleep(rounds=10)
    with Notifier() as notifier:
        asyncio.run(status_loop(notifier, lambda: next(texts), lambda: next(running), sleep=sleep))
        notifier.stopping("daemon shutting down")
    sent = [m.fields for m in notify_sink.drain()]
    assert sent == [
        {"STATUS": "2 peers"},
        {"STATUS": "3 peers"},
        {"STOPPING": "1", "STATUS": "daemon shutting down"},
    ]
    assert len(sleep.requested) == 3
