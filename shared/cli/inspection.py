"""Commands that read the store directly: ``slots``, ``versions``, ``show``.

They open the index read-only, so they work beside a running daemon.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from .common import Commands, open_store, slot_arg
from .table import print_table


def cmd_slots(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        rows = [
            (s.slot, s.model_type or "-", s.current_version, s.latest_version, s.n_versions)
            for s in store.list_slots(model_type=args.type, group=args.group)
        ]
    print_table(("slot", "type", "current", "latest", "versions"), rows)
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    """The slot's versions, oldest first; the current one marked ``*`` (``"current": true``)."""
    with open_store(args) as store:
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
    from ctxstore.validation import thaw_json

    with open_store(args) as store:
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


def register(commands: Commands) -> None:
    p = commands.add("slots", cmd_slots, "list slots")
    p.add_argument("--type", default=None, help="only this model type")
    p.add_argument("--group", default=None, help="only slots in this group")

    p = commands.add("versions", cmd_versions, "list a slot's versions (* marks the current one)")
    p.add_argument("slot", type=slot_arg)
    p.add_argument("--json", action="store_true", help="print the versions as JSON")

    p = commands.add("show", cmd_show, "print a version's metadata and tensor table as JSON")
    p.add_argument("slot", type=slot_arg)
    p.add_argument("version", nargs="?", default=None, help="version number or alias")
