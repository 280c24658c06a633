"""The daemon's settings: built-in defaults, one TOML file, CTXSTORE_* variables, flags.

Precedence, lowest first: defaults < the configuration file < ``CTXSTORE_*``
environment variables < command-line flags. The file is ``--config FILE``, else
``$CTXSTORE_CONFIG``, else ``$CONFIGURATION_DIRECTORY/ctxstore.toml`` when it
exists (systemd's ``ConfigurationDirectory=``). docs/configuration.md shows the
file layout, every key, its variable and flag, and what SIGHUP reloads.

``KEYS`` is the one table of settings: field, key in the file, variable, flag (and how
the command line parses it: ``ctxstore daemon`` makes its flags from this table),
check and whether a reload applies it live. Every value, wherever it comes
from, goes through its key's check; a refused value is reported with where it
came from, the key and the value.

This package: :mod:`.checks` (value checks), :mod:`.keys` (the table),
:mod:`.settings` (``DaemonConfig``, the token), :mod:`.loading` (the layers)
and :mod:`.reload` (SIGHUP).
"""

from __future__ import annotations

from .checks import HookSpec
from .keys import KEYS, Key
from .loading import CONFIG_FILE_NAME, ConfigLoader, LoadedConfig, Origin, read_config_file
from .reload import ReloadPlan, plan_reload, token_change
from .settings import DaemonConfig, default_max_publish_bytes, read_token

__all__ = [
    "CONFIG_FILE_NAME",
    "KEYS",
    "ConfigLoader",
    "DaemonConfig",
    "HookSpec",
    "Key",
    "LoadedConfig",
    "Origin",
    "ReloadPlan",
    "default_max_publish_bytes",
    "plan_reload",
    "read_config_file",
    "read_token",
    "token_change",
]
