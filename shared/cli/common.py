"""What every command group shares: the --store/--socket options, argument types, the store
opened for a command, and the one rendering of an error.

A command group is a module with a ``register(commands)`` function that adds its
subcommands through :class:`Commands`; ``ctxstore.cli.app`` lists the groups.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctxstore.errors import CtxStoreError, InvalidInputError, RemoteError, WriterLockedError
from ctxstore.locations import default_socket_path, default_store_dir
from ctxstore.store import PersistentStore, StoreView

Handler = Callable[[argparse.Namespace], int]

#: the options every store command takes (``store_options``); the daemon's settings table
#: declares them too, and the daemon's command does not take them twice
STORE_FLAGS = ("--store", "--socket")


class Commands:
    """The ``ctxstore`` subcommands being declared: each group adds its own through this."""

    def __init__(self, subparsers: Any) -> None:
        self.subparsers = subparsers

    def add(
        self, name: str, handler: Handler, help_text: str, *, store_options: bool = True
    ) -> argparse.ArgumentParser:
        """A subcommand run by ``handler``, with --store and --socket unless told otherwise."""
        parser: argparse.ArgumentParser = self.subparsers.add_parser(
            name, help=help_text, description=help_text
        )
        if store_options:
            add_store_options(parser)
        parser.set_defaults(handler=handler)
        return parser

    def group(self, name: str, help_text: str) -> Commands:
        """A command with actions of its own (``ctxstore config show``): add them to the result.

        ``main`` names a failing action by both words (``ctxstore config show: error: ...``).
        """
        parser = self.subparsers.add_parser(name, help=help_text, description="see ACTION")
        return Commands(parser.add_subparsers(dest="action", required=True, metavar="ACTION"))


def add_store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        type=Path,
        default=None,
        help="store directory (default: $CTXSTORE_HOME, $STATE_DIRECTORY, ~/.local/state/ctxstore)",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        default=None,
        help="daemon socket (default: $CTXSTORE_SOCKET, $RUNTIME_DIRECTORY or $XDG_RUNTIME_DIR)",
    )


def store_dir(args: argparse.Namespace) -> Path:
    return Path(args.store) if args.store else default_store_dir()


def socket_path(args: argparse.Namespace) -> Path:
    return Path(args.socket) if args.socket else default_socket_path()


def slot_arg(text: str) -> int:
    """argparse type for slot ids: refuses negatives, huge numbers and non-integers."""
    from ctxstore.validation import check_slot

    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"slot must be an integer, got {text!r}") from None
    try:
        return check_slot(value)
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """argparse type for counts and durations that must be > 0."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def open_store(args: argparse.Namespace) -> StoreView:
    """The store opened read-only: the view, which has no write method."""
    return StoreView(store_dir(args))


def open_writer(args: argparse.Namespace) -> PersistentStore:
    """The store's writer (takes the writer lock: WriterLockedError while a daemon runs)."""
    return PersistentStore(store_dir(args))


def open_to_change(args: argparse.Namespace, api_call: str) -> PersistentStore:
    """The store opened for a change the daemon could make instead; while it runs, say how."""
    try:
        return open_writer(args)
    except WriterLockedError as exc:
        raise WriterLockedError(
            f"{exc}. While the daemon runs, ask it on its admin API, so that its readers "
            f"are told: {api_call} (docs/api.md); or stop it and run this again",
            exc.holder_pid,
        ) from None


def error_message(exc: BaseException) -> str:
    """What went wrong, in plain words: no error kinds, class or wire field names.

    The one rendering of an error for ``ctxstore COMMAND: error: MESSAGE`` (and for
    the retry line of ``status --watch``). The daemon's answers lose their kind
    (``not_found: ...``); an operating-system error says its file and reason.
    """
    if isinstance(exc, RemoteError):
        text = exc.message
        if exc.kind == "internal":  # the daemon's own failure, not the request's
            text = f"the daemon failed: {text}"
    elif isinstance(exc, OSError) and not isinstance(exc, CtxStoreError):
        reason = exc.strerror or str(exc)
        text = reason if exc.filename is None else f"{exc.filename}: {reason}"
    else:
        text = str(exc)
    return text or f"{type(exc).__name__} (no details)"
