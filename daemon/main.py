"""``ctxstore daemon``: build the configuration (file, environment, flags), set up logging, run."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from ctxstore.errors import CtxStoreError, WriterLockedError

from .config import KEYS, ConfigLoader, DaemonConfig
from .logs import setup_logging
from .server import run_daemon

log = logging.getLogger("ctxstore.daemon")

#: How long a thread may hold the GIL while another waits for it (CPython's default is
#: 5 ms). The daemon's event loop shares the GIL with the commit thread, which goes on
#: (warming, retention) right after it hands the loop an announcement: at 5 ms the loop,
#: between one subscriber's send and the next, waited for the commit thread's turn to end
#: (issue 21: announce() to 16 readers took 1.8-3.1 ms, 0.5 ms with this).
GIL_SWITCH_INTERVAL_S = 0.0005


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
    """Run the daemon until SIGTERM or SIGINT; 0 after an orderly stop, 1 when it cannot start.

    A start that fails logs one ERROR saying why (nothing claims a daemon
    stopped: none ran). This is the process's last act: the interpreter exits next.
    """
    setup_logging(config.log_level, config.log_format)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        config.token()  # first: a bad token file is the one line a failed start logs
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
    finally:
        _spare_the_exit()
    return 0


def _spare_the_exit() -> None:
    """Keep the interpreter's teardown from walking every object with the garbage collector.

    Finalization runs the cyclic collector several times while it clears the
    modules, each run over every object still alive; with the HTTP stack loaded
    that was most of an idle daemon's stop (about 0.2 s of CPU here against
    0.13 s for everything else; seconds on a slow or busy host). Frozen objects
    are skipped. Nothing needs them collected: the orderly stop closed every
    file, socket, segment and the store, and the memory goes with the process.
    """
    gc.freeze()
