"""Commands that follow a running daemon: ``status [--watch]`` and ``watch``.

``status`` asks the daemon for its readers and slots and prints them
(``status_text``); ``watch`` is a Reader that prints each announcement.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ctxstore.errors import CtxStoreError, WaitTimeoutError

from .common import Commands, error_message, positive, slot_arg, socket_path, store_dir

if TYPE_CHECKING:
    from ctxstore.client import DaemonClient
    from ctxstore.readers import Reader, VersionEvent
    from ctxstore.wire import Status


def _status_text(args: argparse.Namespace, status: Status) -> str:
    """What one refresh prints (the daemon leaves this command's own connection out)."""
    from ctxstore.validation import thaw_json

    from .status_text import format_status

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

    from .status_text import CLEAR_SCREEN

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

    from ctxstore.client import DaemonClient

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

    from .status_text import event_json, format_event

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


def register(commands: Commands) -> None:
    p = commands.add("status", cmd_status, "the daemon, its readers (versions, lag, memory), slots")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument(
        "--interval", type=positive(float), default=2.0, help="seconds between refreshes"
    )
    p.add_argument(
        "--count", type=positive(int), default=2**62, help="stop after N refreshes (--watch)"
    )
    p.add_argument("--json", action="store_true", help="print the status as JSON")

    p = commands.add("watch", cmd_watch, "print announcements as they arrive")
    p.add_argument("slots", type=slot_arg, nargs="*", help="slots to watch (default: all)")
    p.add_argument("--group", action="append", default=[], help="watch a group (repeat)")
    p.add_argument("--count", type=positive(int), default=None, help="exit 0 after N announcements")
    p.add_argument(
        "--timeout",
        type=positive(float),
        default=None,
        help="stop after S seconds: exit 0, or 1 if --count was not reached",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
