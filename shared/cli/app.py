"""The ``ctxstore`` command line: the parser made from the command groups, and ``main``.

Each command group is a module of this package with a ``register(commands)``
function (``common.Commands``); :data:`GROUPS` lists them, in the order
``ctxstore --help`` shows their commands. A new group is one module and one
line here. Groups import the daemon and the readers only inside their commands,
so that ``ctxstore verify`` never pulls in the server stack.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence

from ctxstore.errors import CtxStoreError

from . import (
    cluster,
    daemon_commands,
    demo,
    inspection,
    measure,
    monitor,
    pointers,
    transfer,
    verify,
)
from .common import Commands, Handler, error_message

#: every command group, in the order --help lists them
GROUPS: tuple[Callable[[Commands], None], ...] = (
    demo.register,
    cluster.register,
    measure.register,
    daemon_commands.register_daemon,
    transfer.register,
    inspection.register,
    verify.register,
    pointers.register,
    monitor.register,
    daemon_commands.register_config,
)


def build_parser() -> argparse.ArgumentParser:
    from ctxstore import __version__

    parser = argparse.ArgumentParser(
        prog="ctxstore",
        description="Publish versioned model contexts from one writer to many zero-copy readers.",
    )
    parser.add_argument("--version", action="version", version=f"ctxstore {__version__}")
    commands = Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    for register in GROUPS:
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every argument, --help included, belongs to the harness
        return run_command("bench", lambda: measure.run_bench(argv[1:]))
    args = build_parser().parse_args(argv)  # usage errors: argparse's own message, exit 2
    handler: Handler = args.handler
    command = " ".join(filter(None, (args.command, getattr(args, "action", None))))
    return run_command(command, lambda: handler(args))


def run_command(command: str, call: Callable[[], int]) -> int:
    """Run a command and return its exit status; the one place its errors are printed.

    Every error reads ``ctxstore COMMAND: error: MESSAGE`` on stderr (argparse's
    form for usage errors too) and exits 1.
    """
    try:
        return call()
    except CtxStoreError as exc:
        failure: BaseException = exc
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `ctxstore watch | head`: the reader left; go quietly, as tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail too
        return 128 + signal.SIGPIPE
    except OSError as exc:  # a file or directory the system refused: no traceback
        failure = exc
    print(f"ctxstore {command}: error: {error_message(failure)}", file=sys.stderr)
    return 1
