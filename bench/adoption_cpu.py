"""Reader CPU per adoption of a ~256 MiB version, with and without the daemon's verified record.

``python -m bench.adoption_cpu [--mib 256] [--rounds 3]``: a one-off measurement
(not part of ``python -m bench``). For each mode a private daemon runs on a
temporary store (HTTP off): ``hash`` with ``verify_after_commit = false``, so
every reader hashes each version it adopts (the behaviour before the record
existed), and ``record``, the default, where the daemon hashes each version
once and readers adopting it do not. Each round publishes a new version
through the daemon, then one reader process ``get()``s it; the figures are the
reader's CPU time for that get (process time, all threads) and the daemon's
CPU time for the publish, medians over the rounds. Pages are warm (the daemon
wrote them), as they are for workers on the publishing host.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ctxstore import Context
from ctxstore.client import publish

from .fanout import cpu_seconds

_READER = """
import sys, time
from ctxstore.readers import Reader
with Reader(sys.argv[1], sys.argv[2], follow=False) as reader:
    print("ready", flush=True)
    for line in sys.stdin:
        start = time.process_time()
        ctx = reader.get(1)
        spent = time.process_time() - start
        stats = reader.stats()
        print(ctx.version, spent, stats.hashed, stats.trusted, flush=True)
"""


def _context(mib: int, seed: int) -> Context:
    rng = np.random.default_rng(seed)
    per = (mib << 20) // 8 // 4
    return Context({f"layer{i}": rng.standard_normal(per, dtype=np.float32) for i in range(8)})


def run(mode: str, mib: int, rounds: int) -> tuple[float, float]:
    """(median reader CPU per adoption, median daemon CPU per publish), seconds."""
    with tempfile.TemporaryDirectory(prefix="ctxstore-adopt-") as tmp:
        store, sock, config = Path(tmp, "store"), Path(tmp, "ctx.sock"), Path(tmp, "d.toml")
        config.write_text(f"verify_after_commit = {'true' if mode == 'record' else 'false'}\n")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "ctxstore.cli", "daemon", "--config", str(config),
             "--store", str(store), "--socket", str(sock), "--http", "off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            while not sock.exists():
                time.sleep(0.05)
            publish(1, _context(1, 0), socket=sock)
            reader = subprocess.Popen(
                [sys.executable, "-c", _READER, str(store), str(sock)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert reader.stdin is not None and reader.stdout is not None
            assert reader.stdout.readline().strip() == "ready"
            readers, daemons = [], []
            for round_ in range(rounds):
                context = _context(mib, round_ + 1)
                before = cpu_seconds(daemon.pid)
                version = publish(1, context, socket=sock)
                daemons.append(cpu_seconds(daemon.pid) - before)
                del context
                reader.stdin.write("get\n")
                reader.stdin.flush()
                got, spent, hashed, trusted = reader.stdout.readline().split()
                assert int(got) == version
                readers.append(float(spent))
                print(f"  {mode}: version {version}: reader {float(spent) * 1e3:.1f} ms CPU "
                      f"(hashed {hashed}, trusted {trusted}), daemon "
                      f"{daemons[-1] * 1e3:.0f} ms CPU for the publish")  # fmt: skip
            reader.stdin.close()
            reader.wait(30)
        finally:
            daemon.terminate()
            daemon.wait(30)
    return statistics.median(readers), statistics.median(daemons)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = {mode: run(mode, args.mib, args.rounds) for mode in ("hash", "record")}
    print(f"\n{args.mib} MiB version, median of {args.rounds}:")
    for mode, (reader, daemon) in results.items():
        print(f"  {mode:6}  reader CPU per adoption {reader * 1e3:7.1f} ms   "
              f"daemon CPU per publish {daemon * 1e3:7.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
