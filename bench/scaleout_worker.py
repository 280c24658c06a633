"""A host of the scale-out scenario's anchor or floor (``bench/scaleout.py``).

``python -m bench.scaleout_worker download|copy BUCKET OUTDIR``: gets ready
(imports boto3 and makes its client, for ``download``), says ``ready``, reads
one line of sources (object keys, or local files for ``copy``, separated by
tabs), fetches each into OUTDIR and fsyncs it, says ``done <time.time()>`` and
exits when its stdin closes. It imports nothing else, so it starts quickly.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any


def main(argv: Sequence[str]) -> int:
    mode, bucket, out = argv
    client: Any = None
    if mode == "download":
        import boto3  # plain boto3, its default transfer settings: the anchor

        client = boto3.session.Session().client("s3")
    print("ready", flush=True)
    sources = sys.stdin.readline().rstrip("\n").split("\t")
    for i, source in enumerate(sources):
        target = os.path.join(out, str(i))
        if mode == "download":
            client.download_file(bucket, source, target)
        else:
            shutil.copyfile(source, target)
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    print(f"done {time.time()!r}", flush=True)
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
