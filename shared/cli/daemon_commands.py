"""``ctxstore daemon`` (the writer, in the foreground) and ``ctxstore config show`` (what it
would run with): both take the daemon's flags, made from its settings table.

The daemon package is imported only to read that table (``ctxstore.daemon.config``,
no server stack) until ``daemon`` or ``config show`` runs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .common import STORE_FLAGS, Commands
from .table import print_table

if TYPE_CHECKING:
    from ctxstore.daemon.config import Key


def cmd_daemon(args: argparse.Namespace) -> int:
    from ctxstore.daemon.main import config_from_args
    from ctxstore.daemon.main import main as daemon_main

    return daemon_main(config_from_args(args))


def cmd_config_show(args: argparse.Namespace) -> int:
    """The daemon's effective configuration (same sources, same flags), with each value's source."""
    from ctxstore.daemon.main import loader_from_args

    loaded = loader_from_args(args).load()
    if args.json:
        print(json.dumps(loaded.as_json(), indent=2))
        return 0
    print(f"configuration file: {loaded.file or 'none'}")
    rows = [
        (row["key"], json.dumps(row["value"]), " ".join(filter(None, (row["source"], row["from"]))),
         row["reload"])
        for row in loaded.settings()
    ]  # fmt: skip
    print_table(("key", "value", "source", "on SIGHUP"), rows)
    return 0


def add_setting_flags(parser: argparse.ArgumentParser, keys: Iterable[Key] | None = None) -> None:
    """One flag per setting that has one (``Key.flag``), parsed as its key says.

    An absent flag is None, so the file and the environment decide
    (``ctxstore.daemon.main.loader_from_args``). ``--store`` and ``--socket`` are
    the common store options, declared once (``add_store_options``).
    """
    if keys is None:
        from ctxstore.daemon.config import KEYS

        keys = KEYS
    for key in keys:
        if key.flag is None or key.flag in STORE_FLAGS:
            continue
        parser.add_argument(
            key.flag,
            type=key.flag_type,
            action="append" if key.flag_repeats else "store",
            default=None,
            metavar=key.flag_metavar,
            help=key.flag_help or f"the {key.path} setting (docs/configuration.md)",
        )


def add_daemon_flags(parser: argparse.ArgumentParser) -> None:
    """--config and the settings' flags; each overrides the file and CTXSTORE_*."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML file (default: $CTXSTORE_CONFIG, else $CONFIGURATION_DIRECTORY/ctxstore.toml)",
    )
    add_setting_flags(parser)


def register_daemon(commands: Commands) -> None:
    p = commands.add("daemon", cmd_daemon, "run the writer daemon in the foreground")
    add_daemon_flags(p)


def register_config(commands: Commands) -> None:
    """``ctxstore config show``: takes the daemon's flags, so it previews a daemon command line."""
    actions = commands.group("config", "the daemon's configuration")
    help_text = "print the effective configuration and where each value comes from"
    show = actions.add("show", cmd_config_show, help_text)
    add_daemon_flags(show)
    show.add_argument("--json", action="store_true", help="print it as JSON")
