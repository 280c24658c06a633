"""The daemon's flags are made from its settings table (``ctxstore.daemon.config.KEYS``)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from ctxstore.cli import build_parser
from ctxstore.cli.daemon_commands import add_setting_flags
from ctxstore.daemon.config import KEYS


def subcommand(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def flags_of(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


@pytest.mark.parametrize("path", [("daemon",), ("config", "show")])
def test_the_daemon_and_config_show_take_exactly_the_flags_of_the_settings_table(
    path: tuple[str, ...],
) -> None:
    parser = subcommand(build_parser(), *path)
    extra = {"-h", "--help", "--config"} | ({"--json"} if path[0] == "config" else set())
    assert flags_of(parser) - extra == {key.flag for key in KEYS if key.flag is not None}


def test_a_setting_added_to_the_table_is_a_flag_parsed_as_its_key_says() -> None:
    template = next(key for key in KEYS if key.field == "retention")
    keys = [
        dataclasses.replace(template, field="lanes", flag="--lane", flag_type=int,
                            flag_repeats=True, flag_help="a lane (repeat)"),
        dataclasses.replace(template, field="origin", flag="--origin", flag_type=str,
                            flag_help=None),
        dataclasses.replace(template, field="quiet", flag=None),
    ]  # fmt: skip
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_setting_flags(parser, keys)
    args = parser.parse_args(["--lane", "1", "--lane", "2", "--origin", "a:1"])
    assert (args.lane, args.origin) == ([1, 2], "a:1")
    assert parser.parse_args([]).lane is None  # absent: the file and the environment decide
    assert "--quiet" not in flags_of(parser)
    assert "docs/configuration.md" in parser.format_help()  # a flag without help still has one
    with pytest.raises(argparse.ArgumentError, match="invalid int value: 'x'"):
        parser.parse_args(["--lane", "x"])


def test_daemon_flags_keep_their_names_types_and_repeats(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["daemon", "--allow-uid", "1", "--allow-uid", "2", "--import-root", str(tmp_path),
         "--retention", "7", "--silent-timeout", "2.5", "--http", "off", "--config", "x.toml"]
    )  # fmt: skip
    assert args.allow_uid == [1, 2]
    assert args.import_root == [str(tmp_path)]
    assert (args.retention, args.silent_timeout, args.http) == (7, 2.5, "off")
    assert args.config == Path("x.toml")
    assert args.publish_uid is None and args.token_file is None
