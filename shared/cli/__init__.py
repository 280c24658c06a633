"""The ``ctxstore`` command line: the application layer over the core, the daemon and the readers.

The one package allowed to import both ``ctxstore.daemon`` and ``ctxstore.readers``
(inside its commands, never at import time). ``app`` builds the parser from the
command groups and runs a command; each group is a module of its own:

- ``inspection`` (slots, versions, show), ``pointers`` (alias, rollback, pin),
  ``verify`` (verify, --repair): the store;
- ``transfer`` (publish, build, export), ``daemon_commands`` (daemon, config show),
  ``monitor`` (status, watch): the daemon;
- ``demo`` (``demo_fleet``, ``demo_embedded``), ``measure`` (soak, bench).

``common`` holds what they share, ``table`` and ``status_text`` the text they print.
"""

from .app import build_parser, main

__all__ = ["build_parser", "main"]
