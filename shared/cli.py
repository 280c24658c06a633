"""The ``ctxstore`` command line.

Store commands work on the store directly (read-only ones always; writing ones
only when no daemon holds the writer lock). Daemon commands import the daemon
package lazily so that ``ctxstore verify`` never pulls in the server stack.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import CtxStoreError, InvalidInputError
from .paths import default_socket_path, default_store_dir
from .records import Problem
from .store import PersistentStore
from .table import print_table

Handler = Callable[[argparse.Namespace], int]


def _store_options(parser: argparse.ArgumentParser) -> None:
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
    from .validation import check_slot

    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"slot must be an integer, got {text!r}") from None
    try:
        return check_slot(value)
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _open(args: argparse.Namespace, *, write: bool = False) -> PersistentStore:
    return PersistentStore(store_dir(args), readonly=not write)


# -- store commands ---------------------------------------------------------------------------


def cmd_slots(args: argparse.Namespace) -> int:
    with _open(args) as store:
        rows = [
            (s.slot, s.model_type or "-", s.current_version, s.latest_version, s.n_versions)
            for s in store.list_slots(model_type=args.type, group=args.group)
        ]
    print_table(("slot", "type", "current", "latest", "versions"), rows)
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    with _open(args) as store:
        rows = [
            (v.version, v.n_tensors, v.nbytes, "yes" if v.pinned else "", ",".join(v.aliases))
            for v in store.list_versions(args.slot)
        ]
    print_table(("version", "tensors", "bytes", "pinned", "aliases"), rows)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .validation import thaw_json

    with _open(args) as store:
        meta = store.get_metadata(args.slot, args.version)
    out: dict[str, Any] = {
        "slot": meta.slot,
        "version": meta.version,
        "current_version": meta.current_version,
        "model_type": meta.model_type,
        "created_at": meta.created_at,
        "pinned": meta.pinned,
        "aliases": list(meta.aliases),
        "config": thaw_json(meta.config),
        "metadata": thaw_json(meta.metadata),
        "tensors": [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes}
            for t in meta.tensors or ()
        ],
    }
    print(json.dumps(out, indent=2))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with _open(args) as store:
        problems = store.verify(args.slot, rehash=not args.quick)
    return report_problems(problems)


def report_problems(problems: Sequence[Problem]) -> int:
    """Print what verify found; the exit status is 1 when anything is damaged."""
    if not problems:
        print("ok: no problems found")
        return 0
    for problem in problems:
        print(problem)
    damaged = sorted({(p.slot, p.version) for p in problems if p.slot is not None}, key=str)
    print(f"{len(problems)} problem(s) in {len(damaged)} version(s)", file=sys.stderr)
    return 1


def cmd_alias(args: argparse.Namespace) -> int:
    with _open(args, write=True) as store:
        if args.delete:
            store.delete_alias(args.slot, args.name)
            print(f"slot {args.slot}: alias {args.name} deleted")
        else:
            version = store.set_alias(args.slot, args.name, args.version)
            print(f"slot {args.slot}: {args.name} -> {version}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    with _open(args, write=True) as store:
        version = store.rollback(args.slot, args.version)
    print(f"slot {args.slot}: current version is now {version}")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    with _open(args, write=True) as store:
        version = (store.unpin if args.unpin else store.pin)(args.slot, args.version)
    print(f"slot {args.slot}: version {version} {'unpinned' if args.unpin else 'pinned'}")
    return 0


def cmd_daemon(args: argparse.Namespace) -> int:
    from ctxstore.daemon.main import config_from_args
    from ctxstore.daemon.main import main as daemon_main

    return daemon_main(config_from_args(args, store_dir(args), socket_path(args)))


def cmd_publish(args: argparse.Namespace) -> int:
    from .client import publish

    version = publish(
        args.slot, args.file, socket=socket_path(args), model_type=args.type, alias=args.alias
    )
    print(f"slot {args.slot}: published version {version}")
    return 0


def parse_setting(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as JSON when it parses (numbers, bools), else text."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def cmd_build(args: argparse.Namespace) -> int:
    from .client import build

    version = build(
        args.slot, args.type, dict(args.set), socket=socket_path(args), alias=args.alias
    )
    print(f"slot {args.slot}: built and published version {version}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.embedded:
        from .demo import run_demo

        return run_demo(versions=args.versions)
    from ctxstore.daemon.demo import run_demo as run_fleet_demo

    return run_fleet_demo(versions=args.versions)


# -- parser -----------------------------------------------------------------------------------


def _daemon_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket-group", default=None, help="group that may use the socket")
    p.add_argument("--allow-uid", type=int, action="append", default=[], help="peer uid allowed")
    p.add_argument("--allow-gid", type=int, action="append", default=[], help="peer gid allowed")
    p.add_argument("--retention", type=int, default=None, help="versions kept per slot")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument(
        "--silent-timeout", type=float, default=None, help="drop readers silent this long (s)"
    )
    p.add_argument(
        "--stuck-timeout", type=float, default=None, help="drop readers whose backlog is stuck (s)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctxstore",
        description="Publish versioned model contexts from one writer to many zero-copy readers.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ctxstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _store_options(p)
        p.set_defaults(handler=handler)
        return p

    p = command("demo", cmd_demo, "build, publish and read contexts in a temporary store")
    p.add_argument("--versions", type=int, default=3, help="versions per slot (default 3)")
    p.add_argument(
        "--embedded", action="store_true", help="no daemon: one process commits and reads back"
    )

    p = command("daemon", cmd_daemon, "run the writer daemon in the foreground")
    _daemon_flags(p)

    p = command("publish", cmd_publish, "commit a .npy/.npz/.safetensors file through the daemon")
    p.add_argument("slot", type=slot_arg)
    p.add_argument("file", type=Path)
    p.add_argument("--type", default=None, help="model type of the slot")
    p.add_argument("--alias", default=None, help="point this alias at the new version")

    p = command("build", cmd_build, "build a context with a node type and commit it")
    p.add_argument("slot", type=slot_arg)
    p.add_argument("--type", required=True, help="node type: llm, cnn, file or a plugin's")
    p.add_argument(
        "--set",
        type=parse_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config value (repeat)",
    )
    p.add_argument("--alias", default=None)

    p = command("slots", cmd_slots, "list slots")
    p.add_argument("--type", default=None, help="only this model type")
    p.add_argument("--group", default=None, help="only slots in this group")

    p = command("versions", cmd_versions, "list a slot's versions")
    p.add_argument("slot", type=slot_arg)

    p = command("show", cmd_show, "print a version's metadata and tensor table as JSON")
    p.add_argument("slot", type=slot_arg)
    p.add_argument("version", nargs="?", default=None, help="version number or alias")

    p = command("verify", cmd_verify, "check files against the index; exit 1 on damage")
    p.add_argument("slot", type=slot_arg, nargs="?", default=None)
    p.add_argument("--quick", action="store_true", help="sizes only, no re-hashing")

    p = command("alias", cmd_alias, "set (or --delete) an alias")
    p.add_argument("slot", type=slot_arg)
    p.add_argument("name")
    p.add_argument("version", nargs="?", default=None, help="version or alias (default current)")
    p.add_argument("--delete", action="store_true")

    p = command("rollback", cmd_rollback, "move a slot's current pointer back")
    p.add_argument("slot", type=slot_arg)
    p.add_argument("version", nargs="?", default=None, help="default: the one before current")

    p = command("pin", cmd_pin, "keep a version through retention (--unpin to release)")
    p.add_argument("slot", type=slot_arg)
    p.add_argument("version", nargs="?", default=None)
    p.add_argument("--unpin", action="store_true")

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except CtxStoreError as exc:
        print(f"ctxstore {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
