"""``ctxstore cluster demo``: scale-out over a real S3 origin and NATS feed (``demo_cluster``)."""

from __future__ import annotations

import argparse

from .common import Commands


def cmd_cluster_demo(args: argparse.Namespace) -> int:
    from .demo_cluster import run_cluster_demo

    return run_cluster_demo(versions=args.versions, followers=args.followers)


def register(commands: Commands) -> None:
    """No --store or --socket: the demo makes its own hosts in a temporary directory."""
    actions = commands.group("cluster", "scale-out over an S3 origin and a NATS feed")
    text = "start SeaweedFS, NATS, a writer and followers on loopback; publish; show adoption"
    demo = actions.add("demo", cmd_cluster_demo, text, store_options=False)
    demo.add_argument("--versions", type=int, default=3, help="versions to publish (default 3)")
    demo.add_argument("--followers", type=int, default=3, help="follower daemons (default 3)")
