"""A Reader in a child process, driven line by line on stdin, for tests/test_integrity.py.

``python tests/integrity_reader.py STORE SOCKET [--no-connect] [--follow]``
opens a Reader, counts every call of the hashing function the store's read path
uses (``ctxstore.store.decode.checksum_parts``), prints ``ready``, then answers each
line of stdin with one JSON line:

``get SLOT``  -> ``{"version", "sum", "hashed", "trusted", "damaged", "hash_calls"}``
               or ``{"error": "..."}`` when get() raised
``stats``     -> the same counters without a get()
EOF ends it (the Reader closes first).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

import ctxstore.store.decode
from ctxstore import CtxStoreError
from ctxstore.readers import Reader

hash_calls = 0
_hash = ctxstore.store.decode.checksum_parts


def _counting_hash(parts: Iterable[memoryview | bytes]) -> str:
    global hash_calls  # noqa: PLW0603 - the one counter of this child
    hash_calls += 1
    return _hash(parts)


ctxstore.store.decode.checksum_parts = _counting_hash


def counters(reader: Reader) -> dict[str, Any]:
    stats = reader.stats()
    return {
        "hashed": stats.hashed,
        "trusted": stats.trusted,
        "damaged": stats.damaged,
        "hash_calls": hash_calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("socket")
    parser.add_argument("--no-connect", action="store_true")
    parser.add_argument("--follow", action="store_true")
    args = parser.parse_args()
    with Reader(args.store, args.socket, name="integrity-reader", connect=not args.no_connect,
                follow=args.follow, heartbeat_interval=0.2) as reader:  # fmt: skip
        print("ready", flush=True)
        for line in sys.stdin:
            words = line.split()
            answer = counters(reader)
            if words[:1] == ["get"]:
                try:
                    ctx = reader.get(int(words[1]))
                except CtxStoreError as exc:
                    answer["error"] = str(exc)
                else:
                    answer["version"] = ctx.version
                    arrays = ctx.weights.values()
                    answer["sum"] = float(sum(np.asarray(a, "f8").sum() for a in arrays))
                    answer.update(counters(reader))
            print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
