"""The ``ctxstore`` command line.

Store commands work on the store directly (read-only ones always; writing ones
only when no daemon holds the writer lock). Daemon commands import the daemon
package lazily so that ``ctxstore verify`` never pulls in the server stack.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import (
    CtxStoreError,
    DaemonUnavailableError,
    InvalidInputError,
    NotFoundError,
    RemoteError,
    WaitTimeoutError,
    WriterLockedError,
)
from .paths import default_socket_path, default_store_dir
from .records import Problem
from .store import PersistentStore, Repair
from .table import print_table

if TYPE_CHECKING:
    from ctxstore.readers import Reader, VersionEvent

    from .client import DaemonClient
    from .messages import Status

Handler = Callable[[argparse.Namespace], int]


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


def _open_to_change(args: argparse.Namespace, api_call: str) -> PersistentStore:
    """The store opened for a change the daemon could make instead; while it runs, say how."""
    try:
        return _open(args, write=True)
    except WriterLockedError as exc:
        raise WriterLockedError(
            f"{exc}. While the daemon runs, ask it on its admin API, so that its readers "
            f"are told: {api_call} (docs/api.md); or stop it and run this again",
            exc.holder_pid,
        ) from None


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
    """The slot's versions, oldest first; the current one marked ``*`` (``"current": true``)."""
    with _open(args) as store:
        # current first: it is never retired, so the listing read after it still holds it
        current = store.current_version(args.slot)
        versions = store.list_versions(args.slot)
    if args.json:
        body = {
            "slot": args.slot,
            "current_version": current,
            "versions": [
                {**dataclasses.asdict(v), "current": v.version == current} for v in versions
            ],
        }
        print(json.dumps(body, indent=2))
        return 0
    rows = [
        (
            v.version,
            "*" if v.version == current else "-",
            "yes" if v.pinned else "-",
            ",".join(v.aliases) or "-",
            v.n_tensors,
            v.nbytes,
        )
        for v in versions
    ]
    print_table(("version", "current", "pinned", "aliases", "tensors", "bytes"), rows)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .validation import thaw_json

    with _open(args) as store:
        meta = store.get_metadata(args.slot, args.version)
        files = store.list_files(args.slot, meta.version)
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
        "files": [{"name": f.name, "size": f.size} for f in files],
    }
    print(json.dumps(out, indent=2))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.repair:
        return _repair(args)
    with _open(args) as store:
        problems = store.verify(args.slot, rehash=not args.quick)
    return report_problems(problems)


#: how long ``verify --repair`` waits for a running daemon's answer (it re-hashes every file)
REPAIR_TIMEOUT_S = 3600.0


def _repair(args: argparse.Namespace) -> int:
    """Roll damaged current versions back to intact ones: directly when no writer holds the
    store, else by asking the daemon that holds it (which announces the moves)."""
    try:
        store = _open(args, write=True)
    except WriterLockedError as locked:
        return _repair_through_daemon(args, locked)
    with store:
        problems = store.verify(args.slot)
        repairs = store.repair(args.slot, problems=problems)
    return report_repair(problems, len(problems), repairs)


def _repair_through_daemon(args: argparse.Namespace, locked: WriterLockedError) -> int:
    """``verify --repair`` beside a running daemon: it verifies and moves the pointers."""
    from .client import DaemonClient

    try:
        client = DaemonClient(
            socket_path(args), name="ctxstore-verify", role="admin", timeout=REPAIR_TIMEOUT_S
        )
    except DaemonUnavailableError as exc:
        raise WriterLockedError(
            f"{locked}; the daemon holding it would repair it, but {exc}: pass its --socket, "
            "or stop it and run this again",
            locked.holder_pid,
        ) from None
    with client:
        answer = client.repair(args.slot)
    problems = [
        Problem(
            str(row.get("kind")),
            str(row.get("detail")),
            row.get("slot"),
            row.get("version"),
            row.get("tensor"),
        )
        for row in answer.problems
    ]
    repairs = [
        Repair(row["slot"], row["from_version"], row["to_version"], list(row["damaged"]))
        for row in answer.repairs
    ]
    return report_repair(problems, answer.problems_total, repairs)


def report_repair(problems: Sequence[Problem], total: int, repairs: Sequence[Repair]) -> int:
    """Print what verify found and each pointer moved. 0 when the repair leaves every
    slot serving an intact version (the damaged ones stay, named, and are not served);
    1 when a slot had no intact version or the damage is not in a version (the index,
    stray entries): those need a human."""
    if not problems and not total:
        print("ok: no problems found")
        return 0
    for problem in problems:
        print(problem)
    if total > len(problems):
        print(f"... {total - len(problems)} more problem(s): `ctxstore verify` lists them all")
    for repair in repairs:
        if repair.to_version is None:
            print(f"slot {repair.slot}: no intact version to fall back to; left at "
                  f"{repair.from_version}")  # fmt: skip
        else:
            print(f"slot {repair.slot}: current version {repair.from_version} -> "
                  f"{repair.to_version} (damaged: {repair.damaged})")  # fmt: skip
    stuck = [r for r in repairs if r.to_version is None]
    beyond = [p for p in problems if p.version is None] or total > len(problems)
    if stuck or beyond:
        print(f"{total} problem(s); not all can be repaired by moving current versions back",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"{total} problem(s) in {_versions_named(problems)} version(s); every slot now "
          "serves an intact version (the damaged ones stay, and are not served)",
          file=sys.stderr)  # fmt: skip
    return 0


def _versions_named(problems: Sequence[Problem]) -> int:
    return len({(p.slot, p.version) for p in problems if p.version is not None})


def report_problems(problems: Sequence[Problem]) -> int:
    """Print what verify found; the exit status is 1 when anything is damaged."""
    if not problems:
        print("ok: no problems found")
        return 0
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s) in {_versions_named(problems)} version(s)",
          file=sys.stderr)  # fmt: skip
    return 1


def cmd_alias(args: argparse.Namespace) -> int:
    method = "DELETE" if args.delete else "PUT"
    with _open_to_change(args, f"{method} /slots/{args.slot}/aliases/{args.name}") as store:
        if args.delete:
            store.delete_alias(args.slot, args.name)
            print(f"slot {args.slot}: alias {args.name} deleted")
        else:
            version = store.set_alias(args.slot, args.name, args.version)
            print(f"slot {args.slot}: {args.name} -> {version}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    with _open_to_change(args, f"POST /slots/{args.slot}/rollback") as store:
        version = store.rollback(args.slot, args.version)
    print(f"slot {args.slot}: current version is now {version}")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    method = "DELETE" if args.unpin else "POST"
    path = f"/slots/{args.slot}/versions/{args.version or 'current'}/pin"
    with _open_to_change(args, f"{method} {path}") as store:
        version = (store.unpin if args.unpin else store.pin)(args.slot, args.version)
    print(f"slot {args.slot}: version {version} {'unpinned' if args.unpin else 'pinned'}")
    return 0


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


def cmd_publish(args: argparse.Namespace) -> int:
    from .client import publish
    from .progress import ProgressLine

    line = ProgressLine(sys.stderr, f"slot {args.slot}")
    try:
        version = publish(
            args.slot, args.file, socket=socket_path(args), model_type=args.type,
            alias=args.alias, key=args.key, progress=line,
        )  # fmt: skip
    finally:
        line.finish()
    print(f"slot {args.slot}: published version {version}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a version as a Hugging Face checkpoint directory (docs/huggingface.md)."""
    from .export import export_version

    version, directory = (None, args.first) if args.second is None else (args.first, args.second)
    with _open(args) as store:
        written = export_version(
            store, args.slot, version, directory, max_shard_bytes=args.max_shard_size
        )
    print(f"slot {args.slot}: wrote {len(written)} files to {directory}")
    return 0


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def byte_size(text: str) -> int:
    """A size in bytes from ``5GB``, ``500MiB`` or a plain number (what save_pretrained takes)."""
    number = text.strip().upper().rstrip("BIKMGT")
    unit = text.strip().upper()[len(number) :]
    try:
        value = int(float(number) * _SIZE_UNITS[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (a number of bytes, or with a unit: 500MB, 2GiB)"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be at least 1 byte")
    return value


def parse_setting(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as JSON when it parses (numbers, bools), else text.

    ``NaN`` and ``Infinity`` are not JSON (Python's reader takes them): they stay text,
    so the node type says what it expected instead of a non-finite number reaching it.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw, parse_constant=_not_json)
    except ValueError:
        return key, raw


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not JSON")


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


def cmd_soak(args: argparse.Namespace) -> int:
    from ctxstore.daemon.soak import run_soak

    return run_soak(
        args.minutes, readers=args.readers, interval=args.interval, json_path=args.json,
        store=args.store,
    )  # fmt: skip


def find_bench_checkout(starts: Sequence[Path] | None = None) -> Path:
    """The source checkout whose ``bench/`` harness ``ctxstore bench`` runs.

    The harness is not part of the installed package: it lives in the
    repository. Looked for in the working directory and its parents, then
    beside the package itself (an editable install).
    """
    from . import __file__ as package_file

    if starts is None:
        here = Path.cwd()
        starts = [here, *here.parents, Path(package_file).resolve().parent.parent]
    for root in starts:
        if (root / "bench" / "__main__.py").is_file() and (root / "pyproject.toml").is_file():
            return root
    raise NotFoundError(
        "ctxstore bench runs the harness in bench/ of a ctxstore source checkout, which "
        "`pip install .` does not install: run it inside the clone (or pip install -e it)"
    )


#: what ``pip install '.[bench]'`` adds, and the harness imports
BENCH_EXTRA_MODULES = ("matplotlib", "lmdb", "rich")


def run_bench(argv: Sequence[str]) -> int:
    """``ctxstore bench ARGS``: ``python -m bench ARGS`` in the checkout; its exit code."""
    import subprocess

    root = find_bench_checkout()
    missing = [name for name in BENCH_EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise NotFoundError(f"the harness needs {', '.join(missing)}: pip install '{root}[bench]'")
    return subprocess.call([sys.executable, "-m", "bench", *argv], cwd=root)


# -- monitoring commands: status and watch ----------------------------------------------------


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
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


def _status_text(args: argparse.Namespace, status: Status) -> str:
    """What one refresh prints (the daemon leaves this command's own connection out)."""
    from .status import format_status
    from .validation import thaw_json

    if not args.json:
        return format_status(status)
    body = {
        "daemon": thaw_json(status.daemon),
        "readers": [thaw_json(row) for row in status.readers],
        "slots": [thaw_json(row) for row in status.slots],
    }
    return json.dumps(body, indent=None if args.watch else 2, sort_keys=True)


def _show_status(args: argparse.Namespace, text: str, *, first: bool) -> None:
    """Print one refresh: with --watch, a header and a cleared screen (on a terminal)."""
    import time

    from .status import CLEAR_SCREEN

    if args.watch and not args.json:
        header = f"ctxstore status at {time.strftime('%H:%M:%S')}, every {args.interval:g}s"
        if sys.stdout.isatty():
            text = f"{CLEAR_SCREEN}{header} (Ctrl-C stops)\n{text}"
        else:
            text = f"{header}\n{text}" if first else f"\n{header}\n{text}"
    print(text, flush=True)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the daemon, its readers and the slots; ``--watch`` refreshes until Ctrl-C."""
    import time

    from .client import DaemonClient

    client: DaemonClient | None = None
    try:
        for n in range(args.count if args.watch else 1):
            if n:
                time.sleep(args.interval)
            try:
                client = client or DaemonClient(
                    socket_path(args), name="ctxstore-status", role="admin", timeout=10.0
                )
                text = _status_text(args, client.status())
            except CtxStoreError as exc:
                if not args.watch:
                    raise
                if client is not None:
                    client.close()
                client = None
                text = f"ctxstore status: {error_message(exc)} (retrying every {args.interval:g}s)"
            _show_status(args, text, first=n == 0)
    finally:
        if client is not None:
            client.close()
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """Print each announcement of the watched slots as it arrives (a Reader that follows)."""
    import queue
    import time

    from ctxstore.readers import Reader

    from .status import event_json, format_event

    events: queue.SimpleQueue[tuple[VersionEvent, float]] = queue.SimpleQueue()
    everything = not (args.slots or args.group)
    what = "every slot" if everything else _watched(args.slots, args.group)
    started = time.monotonic()
    deadline = started + args.timeout if args.timeout is not None else float("inf")
    announced = 0
    with Reader(store=store_dir(args), socket=socket_path(args), name="ctxstore-watch") as reader:
        reader.subscribe(
            slots=args.slots or None,
            groups=args.group or None,
            all=everything,
            callback=lambda event: events.put((event, time.time())),
        )
        print(f"ctxstore watch: {what} at {reader.socket_path}", file=sys.stderr, flush=True)
        online: bool | None = None
        while args.count is None or announced < args.count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _watch_timed_out(args, announced)
            if reader.connected != online and (reader.connected or time.monotonic() > started + 1):
                online = reader.connected
                state = "connected" if online else "daemon unreachable, retrying"
                print(f"ctxstore watch: {state}", file=sys.stderr, flush=True)
            try:
                event, received = events.get(timeout=min(remaining, 0.25))
            except queue.Empty:
                continue
            if event.source != "announce":
                event = _described(reader, event)
            line = json.dumps(event_json(event, received)) if args.json else None
            print(line or format_event(event, received), flush=True)
            announced += event.source == "announce"
    return 0


def _described(reader: Reader, event: VersionEvent) -> VersionEvent:
    """A snapshot event (no announcement behind it) with its model type and aliases filled in."""
    import dataclasses
    from types import MappingProxyType

    try:
        meta = reader.store.get_metadata(event.slot, event.version, tensors=False)
    except CtxStoreError:
        return event
    aliases = MappingProxyType(dict.fromkeys(meta.aliases, event.version))
    return dataclasses.replace(event, model_type=meta.model_type, aliases=aliases)


def _watched(slots: Sequence[int], groups: Sequence[str]) -> str:
    parts = [f"slot {', '.join(map(str, slots))}"] if slots else []
    parts += [f"group {', '.join(groups)}"] if groups else []
    return " and ".join(parts)


def _watch_timed_out(args: argparse.Namespace, announced: int) -> int:
    """--timeout ran out: fine without --count, an error when the count was not reached."""
    if args.count is None:
        return 0
    raise WaitTimeoutError(
        f"{announced} of {args.count} announcements in {args.timeout:g}s (--timeout ran out "
        "before --count was reached)"
    )


def _monitor_commands(command: Callable[[str, Handler, str], argparse.ArgumentParser]) -> None:
    p = command("status", cmd_status, "the daemon, its readers (versions, lag, memory), slots")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument(
        "--interval", type=_positive(float), default=2.0, help="seconds between refreshes"
    )
    p.add_argument(
        "--count", type=_positive(int), default=2**62, help="stop after N refreshes (--watch)"
    )
    p.add_argument("--json", action="store_true", help="print the status as JSON")

    p = command("watch", cmd_watch, "print announcements as they arrive")
    p.add_argument("slots", type=slot_arg, nargs="*", help="slots to watch (default: all)")
    p.add_argument("--group", action="append", default=[], help="watch a group (repeat)")
    p.add_argument(
        "--count", type=_positive(int), default=None, help="exit 0 after N announcements"
    )
    p.add_argument(
        "--timeout",
        type=_positive(float),
        default=None,
        help="stop after S seconds: exit 0, or 1 if --count was not reached",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")


# -- parser -----------------------------------------------------------------------------------


def _measuring_commands(
    sub: Any, command: Callable[[str, Handler, str], argparse.ArgumentParser]
) -> None:
    """``soak``, and ``bench`` (listed for --help: main() hands it to the harness unparsed)."""
    sub.add_parser("bench", help="run the benchmark harness: python -m bench (--help: its flags)")
    p = command("soak", cmd_soak, "commit continuously under N readers; report resources over time")
    p.add_argument("--minutes", type=_positive(float), default=1.0, help="how long (default 1)")
    p.add_argument("--readers", type=_positive(int), default=16, help="reader processes (16)")
    p.add_argument("--interval", type=_positive(float), default=5.0, help="seconds per sample")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the run as JSON")


def _daemon_flags(p: argparse.ArgumentParser) -> None:
    """The daemon's flags; each overrides the config file and CTXSTORE_* (docs/configuration.md)."""
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="TOML file (default: $CTXSTORE_CONFIG, else $CONFIGURATION_DIRECTORY/ctxstore.toml)",
    )
    p.add_argument("--socket-group", default=None, help="group that may use the socket")
    p.add_argument("--allow-uid", type=int, action="append", default=None, help="peer uid allowed")
    p.add_argument("--allow-gid", type=int, action="append", default=None, help="peer gid allowed")
    p.add_argument("--publish-uid", type=int, action="append", default=None,
                   help="uid that may publish (repeat; default: every peer)")  # fmt: skip
    p.add_argument("--publish-gid", type=int, action="append", default=None,
                   help="gid that may publish (repeat; default: every peer)")  # fmt: skip
    p.add_argument("--import-root", action="append", default=None, metavar="DIR",
                   help="directory file imports may read from (repeat; default: any)")  # fmt: skip
    p.add_argument("--retention", type=int, default=None, help="versions kept per slot")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR")
    p.add_argument("--log-format", default=None, help="text (default) or json: one object a line")
    p.add_argument(
        "--silent-timeout", type=float, default=None, help="drop readers silent this long (s)"
    )
    p.add_argument(
        "--stuck-timeout", type=float, default=None, help="drop readers whose backlog is stuck (s)"
    )
    p.add_argument(
        "--http",
        default=None,
        metavar="HOST:PORT|off",
        help="admin HTTP API address (default 127.0.0.1:8470), or off",
    )
    p.add_argument(
        "--token-file",
        default=None,
        metavar="FILE",
        help="bearer token that mutating HTTP calls must send (file mode 0600)",
    )


def _config_commands(sub: Any) -> None:
    """``ctxstore config show``: takes the daemon's flags, so it previews a daemon command line."""
    p = sub.add_parser("config", help="the daemon's configuration", description="see ACTION")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    help_text = "print the effective configuration and where each value comes from"
    show = actions.add_parser("show", help=help_text, description=help_text)
    _store_options(show)
    _daemon_flags(show)
    show.add_argument("--json", action="store_true", help="print it as JSON")
    show.set_defaults(handler=cmd_config_show)


def _demo_command(sub: Any) -> None:
    """``ctxstore demo``: no --store or --socket, it makes its own temporary ones."""
    text = "build, publish and read contexts in a temporary store"
    p = sub.add_parser("demo", help=text, description=text)
    p.set_defaults(handler=cmd_demo)
    p.add_argument("--versions", type=int, default=3, help="versions per slot (default 3)")
    p.add_argument(
        "--embedded", action="store_true", help="no daemon: one process commits and reads back"
    )


def _transfer_commands(command: Callable[[str, Handler, str], argparse.ArgumentParser]) -> None:
    """publish (into the store, through the daemon) and export (out of it, to a directory)."""
    p = command(
        "publish", cmd_publish,
        "commit a .npy/.npz/.safetensors file or a Hugging Face checkpoint directory "
        "through the daemon",
    )  # fmt: skip
    p.add_argument("slot", type=slot_arg)
    p.add_argument("file", type=Path, help="weights file or checkpoint directory")
    p.add_argument("--type", default=None, help="model type of the slot")
    p.add_argument("--alias", default=None, help="point this alias at the new version")
    p.add_argument(
        "--key",
        default=None,
        help="idempotency key (8-128 of A-Z a-z 0-9 _ -; default: random): a publish "
        "retried with the key of one that was committed is not committed again",
    )

    p = command("export", cmd_export, "write a version as a Hugging Face checkpoint directory")
    p.add_argument("slot", type=slot_arg)
    p.add_argument("first", metavar="[VERSION] DIR", help="version or alias (default current)")
    p.add_argument("second", nargs="?", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--max-shard-size", type=byte_size, default="5GB",
        help="cut model.safetensors into shards above this size (default 5GB)",
    )  # fmt: skip


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

    _demo_command(sub)

    _measuring_commands(sub, command)
    p = command("daemon", cmd_daemon, "run the writer daemon in the foreground")
    _daemon_flags(p)

    _transfer_commands(command)

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

    p = command("versions", cmd_versions, "list a slot's versions (* marks the current one)")
    p.add_argument("slot", type=slot_arg)
    p.add_argument("--json", action="store_true", help="print the versions as JSON")

    p = command("show", cmd_show, "print a version's metadata and tensor table as JSON")
    p.add_argument("slot", type=slot_arg)
    p.add_argument("version", nargs="?", default=None, help="version number or alias")

    p = command("verify", cmd_verify, "check files against the index; exit 1 on damage")
    p.add_argument("slot", type=slot_arg, nargs="?", default=None)
    p.add_argument("--quick", action="store_true", help="sizes only, no re-hashing")
    p.add_argument(
        "--repair", action="store_true",
        help="move damaged current versions back to the newest intact ones (asks the daemon "
        "when one holds the store)",
    )  # fmt: skip

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

    _monitor_commands(command)
    _config_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every argument, --help included, belongs to the harness
        return run_command("bench", lambda: run_bench(argv[1:]))
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


if __name__ == "__main__":
    sys.exit(main())
