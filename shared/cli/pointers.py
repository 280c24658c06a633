"""Commands that move a slot's pointers in the store: ``alias``, ``rollback``, ``pin``.

They need the writer lock, so they work only while no daemon holds the store;
while one does, the error names the admin API call that does the same.
"""

from __future__ import annotations

import argparse

from .common import Commands, open_to_change, slot_arg


def cmd_alias(args: argparse.Namespace) -> int:
    method = "DELETE" if args.delete else "PUT"
    with open_to_change(args, f"{method} /slots/{args.slot}/aliases/{args.name}") as store:
        if args.delete:
            store.delete_alias(args.slot, args.name)
            print(f"slot {args.slot}: alias {args.name} deleted")
        else:
            version = store.set_alias(args.slot, args.name, args.version)
            print(f"slot {args.slot}: {args.name} -> {version}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    with open_to_change(args, f"POST /slots/{args.slot}/rollback") as store:
        version = store.rollback(args.slot, args.version)
    print(f"slot {args.slot}: current version is now {version}")
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    method = "DELETE" if args.unpin else "POST"
    path = f"/slots/{args.slot}/versions/{args.version or 'current'}/pin"
    with open_to_change(args, f"{method} {path}") as store:
        version = (store.unpin if args.unpin else store.pin)(args.slot, args.version)
    print(f"slot {args.slot}: version {version} {'unpinned' if args.unpin else 'pinned'}")
    return 0


def register(commands: Commands) -> None:
    p = commands.add("alias", cmd_alias, "set (or --delete) an alias")
    p.add_argument("slot", type=slot_arg)
    p.add_argument("name")
    p.add_argument("version", nargs="?", default=None, help="version or alias (default current)")
    p.add_argument("--delete", action="store_true")

    p = commands.add("rollback", cmd_rollback, "move a slot's current pointer back")
    p.add_argument("slot", type=slot_arg)
    p.add_argument("version", nargs="?", default=None, help="default: the one before current")

    p = commands.add("pin", cmd_pin, "keep a version through retention (--unpin to release)")
    p.add_argument("slot", type=slot_arg)
    p.add_argument("version", nargs="?", default=None)
    p.add_argument("--unpin", action="store_true")
