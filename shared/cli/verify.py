"""``ctxstore verify [--repair]``: check the files against the index, and move damaged
current versions back to intact ones.

Without a daemon the command works on the store; beside a running daemon
``--repair`` asks the daemon, which announces the moves to its readers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ctxstore.errors import DaemonUnavailableError, WriterLockedError
from ctxstore.records import Problem
from ctxstore.store import Repair

from .common import Commands, open_store, open_writer, slot_arg, socket_path


def cmd_verify(args: argparse.Namespace) -> int:
    if args.repair:
        return _repair(args)
    with open_store(args) as store:
        problems = store.verify(args.slot, rehash=not args.quick)
    return report_problems(problems)


#: how long ``verify --repair`` waits for a running daemon's answer (it re-hashes every file)
REPAIR_TIMEOUT_S = 3600.0


def _repair(args: argparse.Namespace) -> int:
    """Roll damaged current versions back to intact ones: directly when no writer holds the
    store, else by asking the daemon that holds it (which announces the moves)."""
    try:
        store = open_writer(args)
    except WriterLockedError as locked:
        return _repair_through_daemon(args, locked)
    with store:
        problems = store.verify(args.slot)
        repairs = store.repair(args.slot, problems=problems)
    return report_repair(problems, len(problems), repairs)


def _repair_through_daemon(args: argparse.Namespace, locked: WriterLockedError) -> int:
    """``verify --repair`` beside a running daemon: it verifies and moves the pointers."""
    from ctxstore.client import DaemonClient

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


def register(commands: Commands) -> None:
    p = commands.add("verify", cmd_verify, "check files against the index; exit 1 on damage")
    p.add_argument("slot", type=slot_arg, nargs="?", default=None)
    p.add_argument("--quick", action="store_true", help="sizes only, no re-hashing")
    p.add_argument(
        "--repair", action="store_true",
        help="move damaged current versions back to the newest intact ones (asks the daemon "
        "when one holds the store)",
    )  # fmt: skip
