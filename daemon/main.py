"""``ctxstore daemon``: build the configuration from flags, set up logging, run."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from ctxstore.errors import CtxStoreError, WriterLockedError

from .config import DaemonConfig
from .server import run_daemon

log = logging.getLogger("ctxstore.daemon")


def config_from_args(args: argparse.Namespace, store: Path, socket: Path) -> DaemonConfig:
    config = DaemonConfig(
        store=store,
        socket=socket,
        socket_group=args.socket_group,
        allow_uids=frozenset(args.allow_uid),
        allow_gids=frozenset(args.allow_gid),
        log_level=args.log_level.upper(),
    )
    overrides = {
        key: getattr(args, key)
        for key in ("retention", "silent_timeout", "stuck_timeout")
        if getattr(args, key, None) is not None
    }
    return config.replace(**overrides) if overrides else config


def main(config: DaemonConfig) -> int:
    logging.basicConfig(
        level=getattr(logging, config.log_level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(run_daemon(config))
    except WriterLockedError as exc:
        log.error("another writer holds this store: %s", exc)
        return 1
    except CtxStoreError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
