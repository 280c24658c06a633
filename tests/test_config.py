"""Daemon configuration: file < CTXSTORE_* < flags, validation, config show, logs, SIGHUP."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support.daemon import DaemonProcess, failed_start, start_daemon, wait_for_socket
from support.notify import NotifySink

from ctxstore import Context, InvalidInputError
from ctxstore.cli import build_parser
from ctxstore.cli import main as cli_main
from ctxstore.client import publish
from ctxstore.daemon.config import (
    KEYS,
    DaemonConfig,
    HookSpec,
    LoadedConfig,
    plan_reload,
)
from ctxstore.daemon.logs import JsonFormatter, setup_logging
from ctxstore.daemon.main import loader_from_args
from ctxstore.versiontable import segment_name

TOKEN = "0123456789abcdef-token"


def load(argv: list[str], environ: dict[str, str] | None = None) -> LoadedConfig:
    """What ``ctxstore daemon ARGV`` would run with, in the environment ``environ``."""
    args = build_parser().parse_args(["daemon", *argv])
    return loader_from_args(args).load(environ or {})


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def toml(tmp_path: Path) -> Path:
    return tmp_path / "ctxstore.toml"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    path.chmod(0o600)
    return path


# -- precedence ----------------------------------------------------------------------------------

PRECEDENCE = [
    # key, field, file value, env (variable, text), flag argv, expected (file, env, flag)
    ("retention", "retention", "3", ("CTXSTORE_RETENTION", "4"), ["--retention", "5"], (3, 4, 5)),
    ("log_level", "log_level", '"debug"', ("CTXSTORE_LOG_LEVEL", "error"),
     ["--log-level", "warning"], ("DEBUG", "ERROR", "WARNING")),
    ("log_format", "log_format", '"json"', ("CTXSTORE_LOG_FORMAT", "text"),
     ["--log-format", "json"], ("json", "text", "json")),
    ("stuck_timeout", "stuck_timeout", "1.5", ("CTXSTORE_STUCK_TIMEOUT", "2"),
     ["--stuck-timeout", "3"], (1.5, 2.0, 3.0)),
    ("http", "http", '"127.0.0.1:1"', ("CTXSTORE_HTTP", "off"), ["--http", "[::1]:3"],
     ("127.0.0.1:1", "off", "[::1]:3")),
    ("allow_uids", "allow_uids", "[1]", ("CTXSTORE_ALLOW_UIDS", "2, 3"),
     ["--allow-uid", "4", "--allow-uid", "5"], ({1}, {2, 3}, {4, 5})),
    ("socket", "socket", '"/f.sock"', ("CTXSTORE_SOCKET", "/e.sock"), ["--socket", "/a.sock"],
     (Path("/f.sock"), Path("/e.sock"), Path("/a.sock"))),
    ("import_roots", "import_roots", '["/f", "/f"]', ("CTXSTORE_IMPORT_ROOTS", "/e1:/e2:"),
     ["--import-root", "/a", "--import-root", "/b"],
     ((Path("/f"),), (Path("/e1"), Path("/e2")), (Path("/a"), Path("/b")))),
]  # fmt: skip


@pytest.mark.parametrize(("key", "field", "in_file", "env", "flag", "expected"), PRECEDENCE)
def test_file_then_environment_then_flags(
    toml: Path,
    key: str,
    field: str,
    in_file: str,
    env: tuple[str, str],
    flag: list[str],
    expected: tuple[object, object, object],
) -> None:
    write(toml, f"{key} = {in_file}\n")
    config = ["--config", str(toml)]
    steps = [(config, {}), (config, dict([env])), ([*config, *flag], dict([env]))]
    for (argv, environ), want, source in zip(steps, expected, ("file", "env", "flag"), strict=True):
        loaded = load(argv, environ)
        assert getattr(loaded.config, field) == want
        assert loaded.origins[field].kind == source
    assert load([]).origins.get(field) is None  # nothing given: the default


def test_tables_map_to_fields_and_defaults_fill_the_rest(toml: Path) -> None:
    write(toml, """
        retention = 2
        [jobs]
        concurrency = 4
        backoff_initial = 0.5
        [hooks]
        check_finite = true
        best_metric = "val_loss"
        best_mode = "MAX"
        [[hooks.pre_commit]]
        target = "mypkg.checks:no_empty"
        priority = 10
        options = { limit = 3, names = ["a", "b"] }
        [[hooks.post_commit]]
        target = "entrypoint:notify-slack"
    """.replace("\n        ", "\n"))  # fmt: skip
    config = load(["--config", str(toml)]).config
    assert (config.retention, config.jobs_concurrency, config.jobs_backoff_initial) == (2, 4, 0.5)
    assert (config.check_finite, config.best_metric, config.best_mode) == (True, "val_loss", "max")
    assert config.pre_commit_hooks == (
        HookSpec("mypkg.checks:no_empty", 10, {"limit": 3, "names": ["a", "b"]}),
    )
    assert config.post_commit_hooks[0].entry_point == "notify-slack"
    assert (config.jobs_max_attempts, config.jobs_backoff_max) == (3, 60.0)


def test_which_file_is_read(tmp_path: Path) -> None:
    explicit = write(tmp_path / "a.toml", "retention = 1\n")
    from_env = write(tmp_path / "b.toml", "retention = 2\n")
    confdir = tmp_path / "etc"
    confdir.mkdir()
    write(confdir / "ctxstore.toml", "retention = 3\n")
    environ = {"CTXSTORE_CONFIG": str(from_env), "CONFIGURATION_DIRECTORY": str(confdir)}
    assert load(["--config", str(explicit)], environ).config.retention == 1
    assert load([], environ).config.retention == 2
    loaded = load([], {"CONFIGURATION_DIRECTORY": str(confdir)})
    assert (loaded.config.retention, loaded.file) == (3, confdir / "ctxstore.toml")
    assert load([], {"CONFIGURATION_DIRECTORY": str(tmp_path / "none")}).file is None
    with pytest.raises(InvalidInputError, match=r"missing\.toml: cannot read"):
        load([], {"CTXSTORE_CONFIG": str(tmp_path / "missing.toml")})


def test_relative_paths_in_the_file_are_taken_from_its_directory(tmp_path: Path) -> None:
    toml = write(tmp_path / "ctxstore.toml", 'store = "data"\ntoken_file = "~/token"\n')
    config = load(["--config", str(toml)]).config
    assert config.store == tmp_path / "data"
    assert config.token_file == Path("~/token").expanduser()
    assert load(["--config", str(toml), "--store", "rel"]).config.store == Path("rel")


def test_environment_values_are_parsed_from_text(toml: Path, token_file: Path) -> None:
    write(toml, f'token_file = "{token_file}"\nsocket_group = "g"\n')
    environ = {
        "CTXSTORE_CHECK_FINITE": "yes",
        "CTXSTORE_TOKEN_FILE": "",  # empty clears an optional setting
        "CTXSTORE_JOBS_BACKOFF_MAX": "120",
        "CTXSTORE_BEST_METRIC": "acc",
        "CTXSTORE_HOME": "/srv/ctx",
        "CTXSTORE_DAEMON_ARGS": "--retention 9",  # not a setting: systemd's, ignored
    }
    config = load(["--config", str(toml)], environ).config
    assert config.check_finite is True
    assert config.token_file is None
    assert config.socket_group == "g"
    assert (config.jobs_backoff_max, config.best_metric) == (120.0, "acc")
    assert config.store == Path("/srv/ctx")
    assert config.retention == 5


# -- validation ----------------------------------------------------------------------------------

BAD_VALUES = [
    # table, line, key shown, value shown
    ("", "retention = 0", "retention", "0"),
    ("", 'retention = "5"', "retention", "'5'"),
    ("", "retention = true", "retention", "True"),
    ("", "max_frame_size = 10", "max_frame_size", "10"),
    ("", "stuck_timeout = 0", "stuck_timeout", "0"),
    ("", "silent_timeout = -1.5", "silent_timeout", "-1.5"),
    ("", "table_capacity = 1000", "table_capacity", "1000"),
    ("", 'log_level = "LOUD"', "log_level", "'LOUD'"),
    ("", 'log_format = "xml"', "log_format", "'xml'"),
    ("", 'http = "localhost"', "http", "'localhost'"),
    ("", 'http = "127.0.0.1:70000"', "http", "'127.0.0.1:70000'"),
    ("", 'http = "::1:80"', "http", "'::1:80'"),
    ("", 'http = "bad host!:80"', "http", "'bad host!:80'"),
    ("", "http = 8470", "http", "8470"),
    ("", "max_body_bytes = 10", "max_body_bytes", "10"),
    ("", "ready_min_free_bytes = -1", "ready_min_free_bytes", "-1"),
    ("", "allow_uids = [-1]", "allow_uids", "[-1]"),
    ("", 'allow_gids = "1000"', "allow_gids", "'1000'"),
    ("", 'socket_group = ""', "socket_group", "''"),
    ("", 'store = ""', "store", "''"),
    ("", 'import_roots = "/srv"', "import_roots", "'/srv'"),
    ("", 'import_roots = ["models"]', "import_roots", "must be absolute paths, not 'models'"),
    ("", 'import_roots = [""]', "import_roots", "non-empty path"),
    ("jobs", "concurrency = 0", "jobs.concurrency", "0"),
    ("jobs", "max_attempts = 1.5", "jobs.max_attempts", "1.5"),
    ("jobs", "backoff_initial = 0", "jobs.backoff_initial", "0"),
    ("hooks", 'best_mode = "median"', "hooks.best_mode", "'median'"),
    ("hooks", 'check_finite = "yes"', "hooks.check_finite", "'yes'"),
    ("hooks", 'best_metric = ""', "hooks.best_metric", "''"),
    ("hooks", "post_commit_timeout = 0", "hooks.post_commit_timeout", "0"),
    ("hooks", 'pre_commit = [{ target = "nodots" }]', "hooks.pre_commit", "'nodots'"),
    ("hooks", 'post_commit = [{ target = "a:b", priority = "high" }]', "hooks.post_commit", "high"),
    ("hooks", 'post_commit = [{ target = "a:b", when = 1 }]', "hooks.post_commit", "'when'"),
    ("hooks", 'pre_commit = "mod:fn"', "hooks.pre_commit", "'mod:fn'"),
    ("", "jobs = 3", "jobs", "3"),
]


@pytest.mark.parametrize(("table", "line", "key", "shown"), BAD_VALUES)
def test_a_bad_value_is_reported_with_file_key_and_value(
    toml: Path, table: str, line: str, key: str, shown: str
) -> None:
    write(toml, f"[{table}]\n{line}\n" if table else f"{line}\n")
    with pytest.raises(InvalidInputError) as caught:
        load(["--config", str(toml)])
    message = str(caught.value)
    assert f"config file {toml}" in message
    assert f"{key} = " in message
    assert shown in message
    assert "\n" not in message


def test_every_setting_with_a_check_refuses_a_wrong_type(toml: Path) -> None:
    for key in KEYS:
        name = key.path.rpartition(".")[2]
        table = key.path.rpartition(".")[0]
        line = f'{name} = {{ nested = "table" }}'
        write(toml, f"[{table}]\n{line}\n" if table else f"{line}\n")
        with pytest.raises(InvalidInputError, match=rf"{key.path} = \{{'nested'"):
            load(["--config", str(toml)])


def test_unknown_keys_are_refused_with_a_suggestion(toml: Path) -> None:
    cases = {
        "retension = 5\n": "unknown key 'retension'; did you mean 'retention'?",
        "[jobs]\nconcurency = 1\n": "key 'jobs.concurency'; did you mean 'jobs.concurrency'",
        "[server]\nport = 1\n": "unknown key 'server'",
        "jobs_concurrency = 1\n": "did you mean 'jobs.concurrency'",
    }
    for text, expected in cases.items():
        write(toml, text)
        with pytest.raises(InvalidInputError, match=f"config file {toml}: ") as caught:
            load(["--config", str(toml)])
        assert expected in str(caught.value)


def test_bad_toml_names_the_file_and_line(toml: Path) -> None:
    write(toml, "retention = 5\nlog_level = \n")
    with pytest.raises(InvalidInputError, match=r"ctxstore\.toml: not valid TOML: .*line 2"):
        load(["--config", str(toml)])


def test_environment_and_flag_errors_name_their_source() -> None:
    with pytest.raises(InvalidInputError) as caught:
        load([], {"CTXSTORE_RETENTION": "many"})
    assert str(caught.value) == (
        "environment variable CTXSTORE_RETENTION: retention = 'many': must be an integer"
    )
    with pytest.raises(InvalidInputError, match="environment variable CTXSTORE_CHECK_FINITE"):
        load([], {"CTXSTORE_CHECK_FINITE": "maybe"})
    with pytest.raises(InvalidInputError) as caught:
        load(["--retention", "0"])
    assert str(caught.value) == "flag --retention: retention = 0: must be between 1 and 1000000"
    with pytest.raises(InvalidInputError, match="flag --log-format: log_format = 'xml'"):
        load(["--log-format", "xml"])


def test_backoff_initial_may_not_exceed_the_maximum(toml: Path) -> None:
    write(toml, "[jobs]\nbackoff_max = 5\n")
    with pytest.raises(InvalidInputError) as caught:
        load(["--config", str(toml)], {"CTXSTORE_JOBS_BACKOFF_INITIAL": "10"})
    assert "jobs.backoff_initial = 10 must not exceed jobs.backoff_max = 5" in str(caught.value)
    assert f"config file {toml}" in str(caught.value)
    assert "CTXSTORE_JOBS_BACKOFF_INITIAL" in str(caught.value)


def test_config_built_in_code_is_checked_too() -> None:
    with pytest.raises(InvalidInputError, match="retention = 0: must be between"):
        DaemonConfig(retention=0)
    with pytest.raises(InvalidInputError, match=r"hooks\.best_mode = 'up'"):
        DaemonConfig(best_mode="up")
    config = DaemonConfig(log_level="debug", http="OFF", allow_uids=[1, 2])  # type: ignore[arg-type]
    assert (config.log_level, config.http, config.allow_uids) == ("DEBUG", "off", {1, 2})
    assert config.reload() is config  # no loader: nothing to read again
    assert DaemonConfig().http_address() == ("127.0.0.1", 8470)
    assert DaemonConfig(http="[::1]:0").http_address() == ("::1", 0)
    assert DaemonConfig(http="off").http_address() is None


@pytest.mark.parametrize(
    "target", ["pkg:fn", "pkg.mod:Class.method", "entrypoint:notify-slack", "_p.m2:_f"]
)
def test_hook_targets_in_the_accepted_forms(target: str) -> None:
    spec = HookSpec(target, 3, {"a": [1]})
    assert hash(spec) == hash(HookSpec(target, 3, {"a": [1]}))
    assert spec.options["a"] == (1,)
    with pytest.raises(TypeError):
        spec.options["b"] = 2  # type: ignore[index]


@pytest.mark.parametrize("target", ["pkg", "pkg:", ":fn", "pkg.:fn", "a b:c", "entrypoint:", 3])
def test_hook_targets_in_other_forms_are_refused(target: object) -> None:
    with pytest.raises(InvalidInputError, match=r"must be 'package\.module:attribute'"):
        HookSpec(target)  # type: ignore[arg-type]


def test_hook_options_must_be_json_like() -> None:
    with pytest.raises(InvalidInputError, match="hook options"):
        HookSpec("a:b", options={"x": object()})
    with pytest.raises(InvalidInputError, match="priority"):
        HookSpec("a:b", priority=True)


# -- the token file ------------------------------------------------------------------------------


def test_token_is_read_and_stripped_once_per_configuration(token_file: Path) -> None:
    config = DaemonConfig(token_file=token_file)
    assert config.token() == TOKEN
    token_file.write_text("a-new-token-after-start")
    assert config.token() == TOKEN  # kept until a reload builds a new configuration
    assert config == DaemonConfig(token_file=token_file)
    assert DaemonConfig(token_file=token_file).token() == "a-new-token-after-start"
    assert DaemonConfig().token() is None


@pytest.mark.parametrize(
    ("content", "mode", "problem"),
    [
        (TOKEN, 0o640, "mode 0640 lets group or others use it; run: chmod 600"),
        (TOKEN, 0o604, "mode 0604"),
        ("\n \n", 0o600, "is empty"),
        ("short", 0o600, "at least 16 are required"),
        ("two words and more words", 0o600, "printable ASCII without spaces"),
        ("x" * 5000, 0o600, "at most 4096 bytes"),
    ],
)
def test_a_bad_token_file_is_refused(tmp_path: Path, content: str, mode: int, problem: str) -> None:
    path = write(tmp_path / "token", content)
    path.chmod(mode)
    with pytest.raises(InvalidInputError, match=f"token_file {path}: ") as caught:
        DaemonConfig(token_file=path).token()
    assert problem in str(caught.value)


def test_a_missing_token_file_or_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="cannot open: No such file"):
        DaemonConfig(token_file=tmp_path / "nope").token()
    tmp_path.joinpath("dir").mkdir(mode=0o700)
    with pytest.raises(InvalidInputError, match="is not a regular file"):
        DaemonConfig(token_file=tmp_path / "dir").token()


# -- reload planning -----------------------------------------------------------------------------


def test_plan_reload_applies_live_settings_and_defers_the_rest(toml: Path) -> None:
    write(toml, 'retention = 3\nlog_level = "INFO"\nmax_body_bytes = 2048\n')
    running = load(["--config", str(toml), "--stuck-timeout", "7"]).config
    write(toml, 'retention = 4\nlog_level = "DEBUG"\nmax_body_bytes = 4096\nstuck_timeout = 1\n')
    plan = plan_reload(running)
    assert (plan.config.retention, plan.config.log_level) == (4, "DEBUG")
    assert plan.config.stuck_timeout == 7.0  # flags stay as given
    assert plan.config.max_body_bytes == 2048  # bound at start
    assert plan.changed == ("retention", "log_level")
    assert plan.pending == (("max_body_bytes", 2048, 4096),)
    assert plan.config.loader is running.loader
    write(toml, "retention = 0\n")
    with pytest.raises(InvalidInputError, match=f"config file {toml}: retention = 0"):
        plan_reload(running)


def test_plan_reload_refuses_a_token_file_that_went_bad(toml: Path, token_file: Path) -> None:
    write(toml, f'token_file = "{token_file}"\n')
    running = load(["--config", str(toml)]).config
    assert running.token() == TOKEN
    token_file.write_text("the-token-after-a-reload")
    assert plan_reload(running).config.token() == "the-token-after-a-reload"
    token_file.chmod(0o644)
    with pytest.raises(InvalidInputError, match="chmod 600"):
        plan_reload(running)


def test_plan_reload_says_the_admin_token_changed_and_never_shows_it(
    toml: Path, token_file: Path
) -> None:
    """The token lives in its file, so a rotation changes no setting: the plan still says it."""
    write(toml, f'token_file = "{token_file}"\nretention = 3\n')
    running = load(["--config", str(toml)]).config
    assert running.token() == TOKEN  # read at start, as the daemon does
    assert plan_reload(running).describe() == "nothing"
    token_file.write_text("the-token-after-a-rotation")
    plan = plan_reload(running)
    assert plan.changed == ()
    assert plan.token_change == "admin token rotated"
    assert plan.describe() == "admin token rotated"
    write(toml, f'token_file = "{token_file}"\nretention = 4\n')
    token_file.write_text(TOKEN)
    rotated_back = plan_reload(plan.config)  # the token the reload read counts as the running one
    assert rotated_back.describe() == "retention, admin token rotated"
    assert "token-after" not in rotated_back.describe() and TOKEN not in rotated_back.describe()
    write(toml, "retention = 4\n")
    assert plan_reload(running).describe() == "retention, token_file, admin token removed"
    assert plan_reload(load(["--config", str(toml)]).config).token_change is None
    write(toml, f'token_file = "{token_file}"\n')
    without = load(["--config", str(toml), "--retention", "4"]).config.replace(token_file=None)
    assert plan_reload(without).describe() == "token_file, admin token required"


def test_a_restart_only_change_keeps_the_token_the_reload_read(
    toml: Path, token_file: Path
) -> None:
    """A plan that keeps a restart-only value still holds the token it read: the next reload
    compares against that one, not against whatever the file holds by then."""
    write(toml, f'token_file = "{token_file}"\nmax_body_bytes = 2048\n')
    running = load(["--config", str(toml)]).config
    running.token()
    write(toml, f'token_file = "{token_file}"\nmax_body_bytes = 4096\n')
    token_file.write_text("the-second-token-0001")
    first = plan_reload(running)
    assert first.pending and first.token_change == "admin token rotated"
    token_file.write_text("the-third-token-000002")
    assert plan_reload(first.config).token_change == "admin token rotated"


# -- ctxstore config show ------------------------------------------------------------------------


def test_config_show_prints_values_and_sources(
    toml: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [k for k in os.environ if k.startswith("CTXSTORE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CTXSTORE_LOG_LEVEL", "warning")
    write(toml, 'retention = 3\nhttp = "off"\n[[hooks.pre_commit]]\ntarget = "m:f"\n')
    argv = ["config", "show", "--config", str(toml), "--retention", "7", "--import-root", "/m"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[3:]}
    assert out.splitlines()[0] == f"configuration file: {toml}"
    assert lines["retention"] == ["retention", "7", "flag", "--retention", "live"]
    assert lines["log_level"] == ["log_level", '"WARNING"', "env", "CTXSTORE_LOG_LEVEL", "live"]
    assert lines["http"] == ["http", '"off"', "file", str(toml), "restart"]
    assert lines["jobs.concurrency"] == ["jobs.concurrency", "2", "default", "restart"]
    assert lines["import_roots"] == ["import_roots", '["/m"]', "flag", "--import-root", "live"]
    assert len(lines) == len(KEYS)

    assert cli_main(["config", "show", "--config", str(toml), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["config_file"] == str(toml)
    settings = shown["settings"]
    assert set(settings) == {key.path for key in KEYS}
    assert settings["retention"] == {"value": 3, "source": "file", "from": str(toml),
                                     "reload": "live"}  # fmt: skip
    assert settings["log_level"]["source"] == "env"
    assert settings["hooks.pre_commit"]["value"] == [{"target": "m:f", "priority": 0,
                                                      "options": {}}]  # fmt: skip
    assert settings["token_file"] == {"value": None, "source": "default", "from": None,
                                      "reload": "live"}  # fmt: skip


def test_config_show_refuses_a_bad_configuration(
    toml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(toml, "retention = -2\n")
    assert cli_main(["config", "show", "--config", str(toml)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"ctxstore config show: error: config file {toml}: retention = -2: "
        "must be between 1 and 1000000\n"
    )


# -- logs ----------------------------------------------------------------------------------------


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
def test_json_logs_are_one_object_per_line_with_exceptions() -> None:
    stream = io.StringIO()
    setup_logging("INFO", "json", stream)
    log = logging.getLogger("ctxstore.test")
    log.debug("hidden")
    log.info("hello %s", "world")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"ts", "level", "logger", "message"}
    assert (first["level"], first["logger"], first["message"]) == ("INFO", "ctxstore.test",
                                                                   "hello world")  # fmt: skip
    assert first["ts"].endswith("+00:00")
    assert "ValueError: boom\nsecond line" in second["exception"]


@pytest.mark.usefixtures("root_logging")
def test_setup_logging_again_switches_format_and_level_without_a_second_handler() -> None:
    stream = io.StringIO()
    first = setup_logging("INFO", "text", stream)
    log = logging.getLogger("ctxstore.test")
    log.debug("not yet")
    log.info("as text")
    assert setup_logging("DEBUG", "json") is first
    log.debug("now json")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(" INFO ctxstore.test: as text")
    assert json.loads(lines[1])["message"] == "now json"
    with pytest.raises(InvalidInputError, match="log format"):
        setup_logging("INFO", "xml")


def test_json_formatter_without_exception_has_exactly_the_documented_keys() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "m %d", (1,), None)
    assert json.loads(JsonFormatter().format(record))["message"] == "m 1"


# -- the daemon process --------------------------------------------------------------------------


def test_the_daemon_exits_1_with_one_line_on_a_bad_config_file(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.toml", 'http = "off"\n[jobs]\nmax_attempts = 0\n')
    lines = failed_start(tmp_path, tmp_path / "store", tmp_path / "ctx.sock", "--config", str(bad))
    assert lines == [
        f"ctxstore daemon: error: config file {bad}: jobs.max_attempts = 0: "
        "must be between 1 and 1000"
    ]
    assert not (tmp_path / "store").exists()


def test_the_daemon_refuses_to_start_with_a_readable_token_file(
    tmp_path: Path, token_file: Path
) -> None:
    token_file.chmod(0o644)
    [line] = failed_start(tmp_path, tmp_path / "store", tmp_path / "s",
                          "--token-file", str(token_file))  # fmt: skip
    assert line.endswith(f"cannot start: token_file {token_file}: mode 0644 lets group or "
                         f"others use it; run: chmod 600 {token_file}")  # fmt: skip


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for proc in started:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait(10)
        leftover = Path("/dev/shm" + segment_name(proc.store))
        if leftover.exists():
            leftover.unlink()


def _start(
    tmp_path: Path, daemons: list[DaemonProcess], sink: NotifySink | None, *extra: str
) -> DaemonProcess:
    proc = start_daemon(tmp_path, tmp_path / "store", tmp_path / "run" / "ctx.sock", sink, *extra)
    daemons.append(proc)
    wait_for_socket(proc.socket, proc.proc)
    return proc


def _reload(proc: DaemonProcess, sink: NotifySink) -> str:
    """SIGHUP, wait until the daemon says READY again; the log written during the reload."""
    before = len(proc.log_text())
    proc.proc.send_signal(signal.SIGHUP)
    sink.wait_for("RELOADING", timeout=30)
    sink.wait_for("READY", timeout=30)
    return proc.log_text()[before:]


def test_sighup_changes_the_log_level_live(
    tmp_path: Path, daemons: list[DaemonProcess], toml: Path
) -> None:
    write(toml, 'log_level = "INFO"\nhttp = "off"\nmax_body_bytes = 2048\n')
    sink = NotifySink()
    try:
        proc = _start(tmp_path, daemons, sink, "--config", str(toml))
        sink.wait_for("READY", timeout=30)
        assert " DEBUG " not in proc.log_text()
        write(toml, 'log_level = "DEBUG"\nhttp = "off"\nmax_body_bytes = 4096\nretention = 2\n')
        during = _reload(proc, sink)
        assert "SIGHUP: configuration reloaded (changed: retention, log_level)" in during
        assert (
            "max_body_bytes changed (2048 -> 4096); it takes effect at the next restart" in during
        )
        assert " DEBUG ctxstore.daemon: SIGHUP: running with DaemonConfig(" in during
        assert publish(1, Context({"w": np.zeros(3)}), socket=proc.socket) == 1
        assert proc.proc.poll() is None
        assert proc.stop() == 0
    finally:
        sink.close()


def test_sighup_logs_a_rotated_token_without_its_value(
    tmp_path: Path, daemons: list[DaemonProcess], toml: Path, token_file: Path
) -> None:
    write(toml, f'http = "off"\ntoken_file = "{token_file}"\n')
    sink = NotifySink()
    try:
        proc = _start(tmp_path, daemons, sink, "--config", str(toml))
        sink.wait_for("READY", timeout=30)
        new_token = "a-rotated-token-9f8e7d6c5b4a"
        token_file.write_text(new_token)
        during = _reload(proc, sink)
        assert "SIGHUP: configuration reloaded (changed: admin token rotated)" in during
        assert "changed: nothing" not in during
        assert proc.stop() == 0
        assert new_token not in proc.log_text() and TOKEN not in proc.log_text()
    finally:
        sink.close()


def test_sighup_with_a_broken_file_keeps_the_running_configuration(
    tmp_path: Path, daemons: list[DaemonProcess], toml: Path
) -> None:
    write(toml, 'log_level = "INFO"\nhttp = "off"\n')
    sink = NotifySink()
    try:
        proc = _start(tmp_path, daemons, sink, "--config", str(toml))
        sink.wait_for("READY", timeout=30)
        write(toml, 'log_level = "DEBUG"\nhttp = "off"\nretention = 0\n')
        during = _reload(proc, sink)
        assert (
            f"SIGHUP: configuration not reloaded, the running one stays: config file {toml}: "
            "retention = 0: must be between 1 and 1000000"
        ) in during
        write(toml, "this is not = = toml\n")
        assert "not valid TOML" in _reload(proc, sink)
        assert publish(1, Context({"w": np.zeros(3)}), socket=proc.socket) == 1
        assert proc.proc.poll() is None
        assert proc.stop() == 0
        assert " DEBUG " not in proc.log_text()  # the level stayed INFO throughout
    finally:
        sink.close()


def test_json_log_format_writes_parseable_lines(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    proc = _start(tmp_path, daemons, None, "--log-format", "json", "--http", "off")
    assert publish(1, Context({"w": np.ones(2)}), socket=proc.socket) == 1
    assert proc.stop() == 0
    entries = [json.loads(line) for line in proc.log_text().splitlines()]
    assert entries, "the daemon logged nothing"
    assert all({"ts", "level", "logger", "message"} <= set(entry) for entry in entries)
    messages = [entry["message"] for entry in entries]
    assert any(message.startswith("ctxstore daemon pid") for message in messages)
    assert any(message.startswith("ctxstore daemon stopped") for message in messages)
