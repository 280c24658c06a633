"""The command line's answers to a user's usual mistakes: what was wrong, and what to do."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ctxstore import Context, PersistentStore, cli


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
    def chatty(args):
        for i in range(1_000_000):
            print(f"line {i}")
        return 0
    cli.cmd_slots = chatty
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
    monkeypatch.setattr(cli, "BENCH_EXTRA_MODULES", ("rich", "no_such_module_for_ctxstore"))
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
