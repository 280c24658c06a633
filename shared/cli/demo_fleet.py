"""``ctxstore demo``: one daemon, four reader processes, several versions, real figures.

Everything runs in a temporary directory: the daemon (a child process on a
private store and socket), four readers built on ``ctxstore.readers.Reader``
that report each version they adopt, and this process, which builds LLM and
CNN contexts through the daemon. At the end the readers report their memory
as the kernel counts it (PSS), next to what private copies would cost; then
everything is stopped and removed.
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from ctxstore.client import build, wait_until_listening
from ctxstore.errors import DaemonUnavailableError

from .table import print_table

N_READERS = 4
LLM_SLOT, CNN_SLOT = 1, 2
LLM_CONFIG = {"vocab_size": 8000, "d_model": 512, "n_layers": 4, "n_heads": 8}
CNN_CONFIG = {"channels": [64, 128, 256], "kernel_size": 3}
TIMEOUT_S = 60.0

READER_PROGRAM = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from ctxstore.readers import Reader, process_memory

    store, sock, name = sys.argv[1:4]
    def say(**fields):
        print(json.dumps(fields), flush=True)

    with Reader(store=store, socket=sock, name=name) as reader:
        def adopted(event):
            ctx = reader.get(event.slot)
            say(kind="adopted", slot=event.slot, version=ctx.version,
                latency_ms=(time.time() - event.committed_at) * 1e3)
        reader.subscribe(slots=[1, 2], callback=adopted)
        say(kind="ready")
        for line in sys.stdin:
            if line.strip() == "memory":
                held = [reader.get(slot) for slot in (1, 2)]
                arrays = [a for c in held for a in c.weights.values()]
                touched = sum(float(a.sum(dtype=np.float64)) for a in arrays)
                uss, pss = process_memory()
                say(kind="memory", uss=uss, pss=pss, nbytes=sum(c.nbytes for c in held),
                    touched=touched)
            else:
                break
    """
)


class ReaderProcess:
    """One demo reader: a child process speaking JSON lines."""

    def __init__(self, store: Path, sock: Path, name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-c", READER_PROGRAM, str(store), str(sock), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def next_message(self, timeout: float = TIMEOUT_S) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"{self.name} stopped answering")
        message: dict[str, Any] = json.loads(line)
        return message

    def wait_for(self, kind: str, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            message = self.next_message(deadline - time.monotonic())
            if message["kind"] == kind and all(message.get(k) == v for k, v in fields.items()):
                return message
        raise RuntimeError(f"{self.name}: no {kind} {fields} within {TIMEOUT_S:g}s")

    def ask(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.communicate("quit\n", timeout=30)


def _start_daemon(store: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "ctxstore.cli", "daemon", "--store", str(store),
             "--socket", str(sock), "--http", "off"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until_listening(sock, TIMEOUT_S, alive=lambda: daemon.poll() is None)
    except DaemonUnavailableError:
        daemon.kill()
        daemon.wait(10)
        raise RuntimeError(f"the daemon did not start: {log.read_text()[-2000:]}") from None
    return daemon


def run_demo(versions: int = 3) -> int:
    with tempfile.TemporaryDirectory(prefix="ctxstore-demo-") as tmp:
        root = Path(tmp)
        store, sock = root / "store", root / "ctxstore.sock"
        print(f"demo: daemon on {sock}, store {store}, {N_READERS} reader processes")
        daemon = _start_daemon(store, sock, root / "daemon.log")
        readers: list[ReaderProcess] = []
        try:
            readers = [ReaderProcess(store, sock, f"reader-{i}") for i in range(N_READERS)]
            for reader in readers:
                reader.wait_for("ready")
            rows = _publish_versions(sock, readers, versions)
            print_table(
                (
                    "slot",
                    "type",
                    "version",
                    "build+commit ms",
                    "readers adopted",
                    "latency ms p50/max",
                ),
                rows,
            )
            ok = _report_memory(readers)
        finally:
            for reader in readers:
                reader.stop()
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(30)
        print(f"daemon stopped (exit {code}); demo store removed")
        return 0 if ok and code == 0 else 1


def _publish_versions(
    sock: Path, readers: list[ReaderProcess], versions: int
) -> list[tuple[Any, ...]]:
    rows = []
    for seed in range(versions):
        for slot, node_type, config in (
            (LLM_SLOT, "llm", LLM_CONFIG),
            (CNN_SLOT, "cnn", CNN_CONFIG),
        ):
            start = time.perf_counter()
            version = build(slot, node_type, {**config, "seed": seed}, socket=sock)
            elapsed_ms = (time.perf_counter() - start) * 1e3
            latencies = sorted(
                r.wait_for("adopted", slot=slot, version=version)["latency_ms"] for r in readers
            )
            rows.append(
                (slot, node_type, version, f"{elapsed_ms:.0f}", f"{len(latencies)}/{len(readers)}",
                 f"{latencies[len(latencies) // 2]:.2f} / {latencies[-1]:.2f}")
            )  # fmt: skip
    return rows


def _report_memory(readers: list[ReaderProcess]) -> bool:
    for reader in readers:
        reader.ask("memory")
    reports = [reader.wait_for("memory") for reader in readers]
    nbytes = int(reports[0]["nbytes"])
    total_pss = sum(int(r["pss"]) for r in reports)
    private = total_pss + (len(readers) - 1) * nbytes
    mib = 1 << 20
    print(
        f"memory: {len(readers)} readers each map {nbytes / mib:.1f} MiB of weights; "
        f"total PSS {total_pss / mib:.1f} MiB, "
        f"private copies would need about {private / mib:.1f} MiB "
        f"({private / max(total_pss, 1):.1f}x: the same PSS plus "
        f"{len(readers) - 1} more copies of the weights)"
    )
    return total_pss < private
