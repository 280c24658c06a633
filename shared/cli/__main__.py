"""``python -m ctxstore.cli``: the ``ctxstore`` command."""

import sys

from .app import main

sys.exit(main())
