"""The sans-IO connection, under the name it had before :mod:`ctxstore.wire` held it.

Kept for code outside the repository: docs/protocol.md showed ``from ctxstore.protocol
import ...`` to client writers. It gives every name of :mod:`ctxstore.wire`, the same
objects, and repeats none of them. New code imports from :mod:`ctxstore.wire`.
"""

from __future__ import annotations

from .wire import *  # noqa: F403 - the old import path gives the wire package's names
from .wire import __all__  # noqa: F401 - the same list, not a copy
