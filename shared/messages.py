"""The wire records, under the name they had before :mod:`ctxstore.wire` held them.

Kept for code outside the package (docs/protocol.md named this module): it gives
every name of :mod:`ctxstore.wire`, the same objects, and repeats none of them.
New code imports from :mod:`ctxstore.wire`.
"""

from __future__ import annotations

from .wire import *  # noqa: F403 - the old import path gives the wire package's names
from .wire import __all__  # noqa: F401 - the same list, not a copy
