"""``ctxstore demo``: a daemon and four reader processes (``demo_fleet``), or with
``--embedded`` one process and no daemon (``demo_embedded``), on a temporary store."""

from __future__ import annotations

import argparse

from .common import Commands


def cmd_demo(args: argparse.Namespace) -> int:
    if args.embedded:
        from .demo_embedded import run_demo

        return run_demo(versions=args.versions)
    from .demo_fleet import run_demo as run_fleet_demo

    return run_fleet_demo(versions=args.versions)


def register(commands: Commands) -> None:
    """No --store or --socket: the demo makes its own temporary ones."""
    text = "build, publish and read contexts in a temporary store"
    p = commands.add("demo", cmd_demo, text, store_options=False)
    p.add_argument("--versions", type=int, default=3, help="versions per slot (default 3)")
    p.add_argument(
        "--embedded", action="store_true", help="no daemon: one process commits and reads back"
    )
