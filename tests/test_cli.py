"""The command line's answers to a user's usual mistakes: what was wrong, and what to do."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support.daemon import DaemonProcess, running_daemon

from ctxstore import Context, PersistentStore, RemoteError, cli
from ctxstore.cli import inspection, measure
from ctxstore.messages import Error
from ctxstore.protocol import encode_frame


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctxstore.cli", *args], capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("command", "api_call"),
    [
        (["rollback", "1"], "POST /slots/1/rollback"),
        (["alias", "1", "best", "1"], "PUT /slots/1/aliases/best"),
        (["alias", "1", "best", "--delete"], "DELETE /slots/1/aliases/best"),
        (["pin", "1", "1"], "POST /slots/1/versions/1/pin"),
        (["pin", "1", "--unpin"], "DELETE /slots/1/versions/current/pin"),
    ],
)
def test_a_change_refused_while_the_daemon_holds_the_store_names_the_api_call(
    tmp_path: Path, command: list[str], api_call: str
) -> None:
    store_dir = tmp_path / "store"
    with PersistentStore(store_dir) as store:  # the writer lock held, as by a daemon
        for value in (1.0, 2.0):
            store.save_context(1, Context({"w": np.full(4, value)}))
        result = run(*command, "--store", str(store_dir))
        assert store.current_version(1) == 2 and "best" not in store.get_aliases(1)
    assert result.returncode == 1
    assert "locked by pid" in result.stderr
    assert api_call in result.stderr
    assert "Traceback" not in result.stderr


def test_verify_of_a_slot_the_store_does_not_know_is_an_error(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    with PersistentStore(store_dir) as store:
        store.save_context(1, Context({"w": np.zeros(4)}))
    assert run("verify", "1", "--store", str(store_dir)).returncode == 0
    unknown = run("verify", "99", "--store", str(store_dir))
    assert unknown.returncode == 1
    assert "slot 99 does not exist" in unknown.stderr
    assert "no problems" not in unknown.stdout


CHATTY = textwrap.dedent(
    """
    import sys
    from ctxstore import cli
    from ctxstore.cli import inspection
    def chatty(args):
        for i in range(1_000_000):
            print(f"line {i}")
        return 0
    inspection.cmd_slots = chatty
    sys.exit(cli.main(["slots", "--store", sys.argv[1]]))
    """
)


def test_output_into_a_pipe_whose_reader_left_ends_quietly(tmp_path: Path) -> None:
    """``ctxstore watch | head -1``: no traceback, the exit status of a SIGPIPE death."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHATTY, str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == "line 0\n"
    proc.stdout.close()  # what head does after its line
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141, err
    assert err == ""


def test_bench_without_its_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(measure, "BENCH_EXTRA_MODULES", ("rich", "no_such_module_for_ctxstore"))
    assert cli.main(["bench", "--help"]) == 1
    err = capsys.readouterr().err
    assert "no_such_module_for_ctxstore" in err and "rich" not in err.split("needs")[1]
    assert "[bench]" in err


def test_demo_takes_no_store_it_would_ignore() -> None:
    """The demo makes its own temporary store: a --store would be silently ignored."""
    result = run("demo", "--store", "/tmp/somewhere")
    assert result.returncode == 2
    assert "unrecognized arguments: --store" in result.stderr


def test_versions_marks_the_current_one_and_shows_pins_and_aliases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store_dir = tmp_path / "store"
    with PersistentStore(store_dir) as store:
        for value in (1.0, 2.0, 3.0):
            store.save_context(1, Context({"w": np.full(4, value)}))
        store.set_alias(1, "best", 3)
        store.pin(1, 1)
        store.rollback(1, 2)  # the current version is neither the newest nor the first
    assert cli.main(["versions", "1", "--store", str(store_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["version", "current", "pinned", "aliases", "tensors", "bytes"]
    rows = {line.split()[0]: line.split()[1:4] for line in lines[2:]}
    assert rows == {"1": ["-", "yes", "-"], "2": ["*", "-", "-"], "3": ["-", "-", "best"]}

    assert cli.main(["versions", "1", "--json", "--store", str(store_dir)]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["current_version"] == 2
    assert [(v["version"], v["current"], v["pinned"], v["aliases"]) for v in body["versions"]] == [
        (1, False, True, []),
        (2, True, False, []),
        (3, False, False, ["best"]),
    ]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    with running_daemon(tmp_path) as proc:
        yield proc


#: what the old messages began with: a request's wire field, or the daemon's error kind
WIRE_OR_KIND = re.compile(
    r"(publish_file|publish_build|publish_shm)\.|\b(not_found|invalid_input): "
)


def test_errors_read_ctxstore_command_error_and_say_what_was_wrong(
    daemon: DaemonProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Errors refused by the client, by the daemon and by the store, and a watch that ran
    out of time: each is one line ``ctxstore COMMAND: error: MESSAGE``, exit status 1."""
    weights = tmp_path / "w.npy"
    np.save(weights, np.zeros(4, "f4"))
    missing = tmp_path / "missing.npy"
    cases = [
        (["publish", "1", str(weights), "--alias", "bad alias!"], "alias 'bad alias!' is not"),
        (["publish", "1", str(weights), "--alias", "latest"], "alias 'latest' is reserved"),
        (["publish", "1", str(weights), "--type", "bad type!"], "model type 'bad type!' is not"),
        (["publish", "1", str(missing)], f"weights file '{missing}' does not exist"),
        (["build", "1", "--type", "nope"], "unknown node type 'nope'"),
        (["build", "1", "--type", "llm", "--set", "d_model=NaN"], "llm config key 'd_model' must"),
        (["versions", "9"], "slot 9 does not exist"),
        (["watch", "1", "--count", "1", "--timeout", "0.2"], "0 of 1 announcements in 0.2s"),
    ]  # fmt: skip
    wrong = []
    for argv, expected in cases:
        status = cli.main([*argv, "--store", str(daemon.store), "--socket", str(daemon.socket)])
        err = capsys.readouterr().err
        last = err.splitlines()[-1] if err else ""
        command = argv[0]
        if (
            status != 1
            or not last.startswith(f"ctxstore {command}: error: {expected}")
            or WIRE_OR_KIND.search(err)
            or err.count(": error: ") != 1
        ):
            wrong.append((argv, status, err))
    assert wrong == []


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (FileNotFoundError(2, "No such file or directory", "/x/y.json"),
         "/x/y.json: No such file or directory"),
        (RemoteError("internal", "ValueError: boom"), "the daemon failed: ValueError: boom"),
        (RemoteError("not_found", "slot 4 does not exist"), "slot 4 does not exist"),
    ],
)  # fmt: skip
def test_errors_from_the_system_and_the_daemon_are_printed_like_the_others(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failure: BaseException,
    message: str,
) -> None:
    def failing(args: object) -> int:
        raise failure

    monkeypatch.setattr(inspection, "cmd_slots", failing)
    assert cli.main(["slots", "--store", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"ctxstore slots: error: {message}\n"


def test_a_refused_connection_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A daemon that refuses a peer (a uid it does not allow) answers hello with an error."""
    path = tmp_path / "refusing.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(30)

    def refuse() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(30)
            conn.recv(65536)  # the hello: answering before it came could break the client's send
            refusal = Error(kind="forbidden", message="uid 4242 is not allowed", fatal=True)
            conn.sendall(encode_frame(refusal))

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    try:
        assert cli.main(["status", "--socket", str(path)]) == 1
    finally:
        thread.join(30)
        server.close()
    assert capsys.readouterr().err == (
        f"ctxstore status: error: the ctxstore daemon at {path} refused the connection: "
        "uid 4242 is not allowed\n"
    )
