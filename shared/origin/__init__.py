"""Scale-out over an S3-compatible origin and a NATS JetStream change feed (docs/scale-out.md).

A writer daemon started with ``--origin`` uploads each version's tensors (content
addressed, by checksum), a create-only manifest, then moves the slot's head by
compare-and-swap and puts a hint on the feed (:mod:`.uploader`). A daemon started
with ``--follow`` pulls the versions its heads name, only the tensors its store
lacks, verifies them and commits them through the store's ordinary commit path
(:mod:`.follower`). The object keys and records are :mod:`.layout` (sans-IO); the
S3 client is :mod:`.s3` (boto3), the feed :mod:`.feed` (nats-py). Nothing here is
imported by the core at import time: only the daemon, when configured, imports it.
"""
