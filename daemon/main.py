"""``ctxstore daemon``: build the configuration (file, environment, flags), set up logging, run."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

from ctxstore.errors import CtxStoreError, WriterLockedError

from .config import KEYS, ConfigLoader, DaemonConfig
from .logs import setup_logging
from .server import run_daemon

log = logging.getLogger("ctxstore.daemon")


def loader_from_args(args: argparse.Namespace) -> ConfigLoader:
    """The loader for ``--config`` and the flags given in ``args`` (absent flags are None)."""
    flags: dict[str, tuple[str, Any]] = {}
    for key in KEYS:
        if key.flag is None:
            continue
        value = getattr(args, key.flag[2:].replace("-", "_"), None)
        if value is not None:
            flags[key.field] = (key.flag, value)
    return ConfigLoader(file=getattr(args, "config", None), flags=flags)


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> DaemonConfig:
    """The effective configuration: defaults < file < CTXSTORE_* variables < flags.

    Raises InvalidInputError naming the source, the key and the value of the
    first bad setting; the configuration keeps its loader for SIGHUP.
    """
    return loader_from_args(args).load(environ).config


def main(config: DaemonConfig) -> int:
    setup_logging(config.log_level, config.log_format)
    try:
        config.token()  # an unreadable or weak token file stops the start, not the first request
        if config.loader is not None:
            source = config.loader.config_file(os.environ)
            log.info("configuration: %s", source or "no file (defaults, environment, flags)")
        asyncio.run(run_daemon(config))
    except WriterLockedError as exc:
        log.error("another writer holds this store: %s", exc)
        return 1
    except CtxStoreError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
