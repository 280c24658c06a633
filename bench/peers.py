"""The child processes of the multi-process scenarios (fan-out, memory), and how they report.

``python -m bench.peers ROLE ...`` runs one of them:

* ``daemon``: the real ``ctxstore daemon``, with four probes that only read
  the clock: when the store's SQLite COMMIT returned (the ``committed`` crash
  point, which sits right after it), when the version table was written (from
  then on every reader's ``get()`` returns the version), when
  ``Daemon.announce`` began and ended (its writes to every subscriber), and
  when ``Fleet.ack`` received each reader's ack. Nothing else changes.
* ``reader``: a :class:`ctxstore.readers.Reader` subscribed to one slot with a
  callback, later (on ``follow``) also reading it with ``get()`` so that it
  maps, adopts and acknowledges each new version, as an inference worker
  does; it stamps when an announcement reaches it (the decoded frame handed
  to ``Reader.message_received``, the reader's own entry point) and when its
  ``subscribe()`` callback runs.
* ``poller``: reads ``SELECT current_version`` from the store's SQLite index
  every ``--interval`` seconds and stamps when it sees a new version.
* ``floor-client``: a bare Unix-socket client: blocks in ``recv``, stamps the
  frame, sends 8 bytes back.
* ``idle``: a Reader attached to the daemon that never reads a context (it
  answers heartbeats, nothing else); says ``ready``, exits when stdin closes.
* ``mute``: a raw socket that says hello and subscribes to one slot, then
  never reads its socket again (announcements pile up in its buffer); says
  ``ready``, exits when stdin closes.
* ``slowloris``: N connections that each say hello, begin a frame announcing
  almost ``max_frame_size`` bytes with its first 16 KiB, then send one more
  byte a second; a connection the daemon closes (its frame deadline) is
  opened again. Says ``ready`` once all are open, exits when stdin closes.
* ``flooder``: N connections that each say hello, then send pings as fast as
  the daemon takes them and read (and drop) its pongs; a closed one is opened
  again. Says ``ready`` once all are open, exits when stdin closes.
* ``memory``: opens a Reader (mapping nothing), says ``bare``; on ``load`` it
  loads a context one of four ways (``ctxstore``, ``private``, ``shm``, ``none``)
  and touches every page, then says ``loaded``; it exits when stdin closes.

Stamps travel through :class:`Stamps`, a file of float64 cells mapped shared
by every process (under /dev/shm, so no writeback ever stalls a store to it):
``time.time()`` values, the clock the daemon itself uses for ``committed_at``.
CLOCK_REALTIME is one system-wide clock, read the same way in every process;
it differs from CLOCK_MONOTONIC only by steps (settimeofday, an NTP step), and
the fan-out scenario checks that none happened during the run.

This module imports only the standard library at the top: what each role
needs it imports itself, so a bare reader's memory is that of a reader.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # annotations only: each role imports what it needs itself (see above)
    import socket

    from ctxstore.daemon.fleet import Fleet
    from ctxstore.readers import Reader

# -- stamps ------------------------------------------------------------------------------------

#: planes of a stamps file; daemon-side planes use reader 0
COMMIT, ANNOUNCE_START, ANNOUNCE_END, RECEIVED, CALLBACK, ACKED, CONTROL, VISIBLE = range(8)
PLANES = 8
#: cells of the CONTROL plane: (reader, version) = (i, READY) is reader i's "ready" flag
READY = 0
#: (0, STOP) tells pollers to stop
STOP = 1
#: (i, FOLLOWING): reader i called get() and now maps, adopts and acks each announced version
FOLLOWING = 2
_HEADER = 4  # float64 cells: magic, readers, versions, planes
_MAGIC = 20240601.0
READER_NAME_PREFIX = "fanout-"


class Stamps:
    """A (plane, reader, version) grid of float64 cells in a file every process maps shared."""

    def __init__(self, path: Path, readers: int, versions: int, mm: mmap.mmap) -> None:
        self.path = path
        self.readers = readers
        self.versions = versions
        self._mm = mm
        self._cells = memoryview(mm).cast("d")

    @classmethod
    def create(cls, path: Path, readers: int, versions: int) -> Stamps:
        cells = _HEADER + PLANES * readers * versions
        with open(path, "xb") as f:
            f.truncate(cells * 8)
        stamps = cls._map(path)
        stamps._cells[1], stamps._cells[2], stamps._cells[3] = readers, versions, PLANES
        stamps._cells[0] = _MAGIC  # last: a reader of the file that sees it sees the shape
        stamps.readers, stamps.versions = readers, versions
        return stamps

    @classmethod
    def open(cls, path: Path) -> Stamps:
        stamps = cls._map(path)
        if stamps._cells[0] != _MAGIC:
            stamps.close()
            raise ValueError(f"{path} is not a stamps file")
        stamps.readers, stamps.versions = int(stamps._cells[1]), int(stamps._cells[2])
        return stamps

    @classmethod
    def _map(cls, path: Path) -> Stamps:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            mm = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return cls(path, 0, 0, mm)

    def _index(self, plane: int, reader: int, version: int) -> int:
        return _HEADER + (plane * self.readers + reader) * self.versions + version

    def put(self, plane: int, reader: int, version: int, value: float) -> None:
        """Write one cell; versions beyond the grid are ignored (the run never asks for them)."""
        if 0 <= version < self.versions and 0 <= reader < self.readers:
            self._cells[self._index(plane, reader, version)] = value

    def get(self, plane: int, reader: int, version: int) -> float:
        if 0 <= version < self.versions and 0 <= reader < self.readers:
            return self._cells[self._index(plane, reader, version)]
        return 0.0

    def count(self, plane: int, version: int) -> int:
        """How many readers have a stamp in ``plane`` for ``version``."""
        return sum(1 for r in range(self.readers) if self.get(plane, r, version) != 0.0)

    def plane(self, plane: int) -> list[list[float]]:
        """A copy of one plane as [reader][version]."""
        start = self._index(plane, 0, 0)
        # typeshed types tolist() as list[int] whatever the format; a "d" view gives floats
        flat = cast(
            "list[float]", self._cells[start : start + self.readers * self.versions].tolist()
        )
        return [flat[r * self.versions : (r + 1) * self.versions] for r in range(self.readers)]

    def close(self) -> None:
        self._cells.release()
        self._mm.close()


# -- daemon with probes ------------------------------------------------------------------------


def run_daemon(store: str, sock: str, stamps_dir: Path) -> int:
    """``ctxstore daemon`` with clock probes on commit, announce and ack (see module docstring)."""
    import ctxstore.cli as cli
    import ctxstore.daemon.fleet as fleet
    import ctxstore.daemon.server as server
    import ctxstore.store.commit as store_module
    import ctxstore.versiontable as versiontable
    from ctxstore.faults import crash_point
    from ctxstore.messages import Announce

    files: dict[int, Stamps | None] = {}

    def stamps_for(slot: int) -> Stamps | None:
        if slot not in files:
            path = stamps_dir / f"{slot}.stamps"
            files[slot] = Stamps.open(path) if path.exists() else None
        return files[slot]

    committed = [0.0]

    def probed_crash_point(name: str) -> None:
        if name == "committed":  # right after COMMIT returned, in the commit thread
            committed[0] = time.time()
        crash_point(name)

    original_announce = server.Daemon.announce

    def probed_announce(self: server.Daemon, announce: Announce) -> None:
        start = time.time()
        original_announce(self, announce)
        end = time.time()
        stamps = stamps_for(announce.slot)
        if stamps is not None:
            stamps.put(COMMIT, 0, announce.version, committed[0])
            stamps.put(ANNOUNCE_START, 0, announce.version, start)
            stamps.put(ANNOUNCE_END, 0, announce.version, end)

    table_set = versiontable.VersionTableWriter.set

    def probed_set(
        self: versiontable.VersionTableWriter,
        slot: int,
        version: int,
        *,
        committed_at_ns: int | None = None,
    ) -> None:
        table_set(self, slot, version, committed_at_ns=committed_at_ns)
        written = time.time()
        stamps = stamps_for(slot)
        if stamps is not None:
            stamps.put(VISIBLE, 0, version, written)

    ack = fleet.Fleet.ack
    index_of: dict[int, int | None] = {}

    def probed_ack(self: fleet.Fleet, session: int, slot: int, version: int) -> None:
        received = time.time()
        ack(self, session, slot, version)
        stamps = stamps_for(slot)
        if stamps is None:
            return
        if session not in index_of:
            index_of[session] = _reader_index(self, session)
        index = index_of[session]
        if index is not None and stamps.get(ACKED, index, version) == 0.0:
            stamps.put(ACKED, index, version, received)

    # ctxstore.store.commit imports crash_point without re-exporting it: the probe rebinds it there
    store_module.crash_point = probed_crash_point  # type: ignore[attr-defined]
    server.Daemon.announce = probed_announce  # type: ignore[method-assign]
    versiontable.VersionTableWriter.set = probed_set  # type: ignore[method-assign]
    fleet.Fleet.ack = probed_ack  # type: ignore[method-assign]
    return cli.main(["daemon", "--store", store, "--socket", sock, "--http", "off"])


def _reader_index(fleet: Fleet, session: int) -> int | None:
    """The bench reader number from a peer's name (``fanout-<i>``), None for other peers."""
    name = next((r.name for r in fleet.snapshot() if r.session == session), "")
    if name.startswith(READER_NAME_PREFIX):
        return int(name[len(READER_NAME_PREFIX) :])
    return None


# -- fan-out readers ---------------------------------------------------------------------------


def run_reader(store: str, sock: str, slot: int, index: int, stamps_path: Path) -> int:
    """A Reader that stamps announcements and callbacks; stdin drives it.

    It starts subscribed only (a callback, nothing mapped: announcements cost
    it no adoption); the line ``follow`` makes it ``get()`` the slot, so from
    then on it maps, adopts and acknowledges every announced version before
    calling back. It exits when stdin closes.
    """
    import threading

    from ctxstore.messages import Announce, Message
    from ctxstore.readers import Reader, VersionEvent

    stamps = Stamps.open(stamps_path)
    subscribed = threading.Event()

    class StampingReader(Reader):
        def message_received(self, message: Message) -> None:
            if type(message) is Announce and message.slot == slot:
                stamps.put(RECEIVED, index, message.version, time.time())
            super().message_received(message)

    def on_event(event: VersionEvent) -> None:
        if event.source == "announce":
            stamps.put(CALLBACK, index, event.version, time.time())
        else:
            subscribed.set()

    with StampingReader(store=store, socket=sock, name=f"{READER_NAME_PREFIX}{index}") as reader:
        _wait(lambda: reader.connected, 60.0, "connect to the daemon")
        reader.subscribe(slot, callback=on_event)
        if not subscribed.wait(60.0):
            raise TimeoutError("the daemon never answered the subscription")
        stamps.put(CONTROL, index, READY, 1.0)
        for line in sys.stdin:  # until the bench closes our stdin
            if line.strip() == "follow":
                reader.get(slot)  # maps the current version and follows the slot from now on
                stamps.put(CONTROL, index, FOLLOWING, 1.0)
    stamps.close()
    return 0


def run_poller(db: str, slot: int, index: int, interval: float, stamps_path: Path) -> int:
    """Poll the slot's current version in SQLite; stamp each new one; stop on the STOP cell."""
    import sqlite3

    stamps = Stamps.open(stamps_path)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    query = "SELECT current_version FROM slots WHERE slot = ?"
    row = conn.execute(query, (slot,)).fetchone()
    last = row[0] if row is not None and row[0] is not None else 0  # current at start
    stamps.put(CONTROL, index, READY, 1.0)
    while stamps.get(CONTROL, 0, STOP) == 0.0:
        time.sleep(interval)
        row = conn.execute(query, (slot,)).fetchone()
        if row is not None and row[0] is not None and row[0] > last:
            stamps.put(RECEIVED, index, row[0], time.time())
            last = row[0]
    conn.close()
    stamps.close()
    return 0


def run_floor_client(sock_path: str, index: int, stamps_path: Path) -> int:
    """Receive 8-byte frames (a version number), stamp each, answer with the same 8 bytes."""
    import socket

    stamps = Stamps.open(stamps_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(sock_path)
        sock.sendall(index.to_bytes(8, "little"))  # hello: who we are
        while True:
            frame = sock.recv(8, socket.MSG_WAITALL)
            received = time.time()
            if len(frame) < 8:
                break
            stamps.put(RECEIVED, index, int.from_bytes(frame, "little"), received)
            sock.sendall(frame)
    stamps.close()
    return 0


# -- peers that never read --------------------------------------------------------------------


def run_idle(store: str, sock: str) -> int:
    """An attached Reader that never calls get(): it costs the daemon a session, nothing more."""
    from ctxstore.readers import Reader

    with Reader(store=store, socket=sock, name=f"idle-{os.getpid()}") as reader:
        _wait(lambda: reader.connected, 60.0, "connect to the daemon")
        _say("ready")
        sys.stdin.read()
    return 0


def run_mute(sock_path: str, slot: int) -> int:
    """Hello, the welcome, Subscribe(slot), then never a read: the daemon's frames pile up."""
    import socket

    from ctxstore.messages import Hello, Subscribe, Welcome
    from ctxstore.protocol import NEED_DATA, Connection, Role

    conn = Connection(Role.CLIENT)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
        peer.settimeout(60.0)  # a daemon that never welcomes us must not hang the bench
        peer.connect(sock_path)
        peer.sendall(conn.send(Hello(role="reader", name=f"mute-{os.getpid()}", pid=os.getpid())))
        while (event := conn.next_event()) is NEED_DATA:
            conn.receive_data(peer.recv(1 << 16))
        if not isinstance(event, Welcome):
            raise RuntimeError(f"the daemon answered hello with {event!r}")
        peer.sendall(conn.send(Subscribe(request_id=1, slots=(slot,))))
        _say("ready")
        sys.stdin.read()
    return 0


# -- hostile peers -----------------------------------------------------------------------------

SLOWLORIS_HEAD = 16 << 10
SLOWLORIS_DRIP_S = 1.0
PINGS_PER_SEND = 256


def run_slowloris(sock_path: str, count: int) -> int:
    """``count`` connections that each keep a frame unfinished (see module docstring)."""
    import selectors
    import socket

    from ctxstore.protocol import DEFAULT_MAX_FRAME_SIZE, HEADER

    def begin() -> socket.socket:
        try:
            peer = _hello(sock_path, "slowloris")
        except OSError:
            return socket.socket(socket.AF_UNIX)  # unconnected: its first drip fails, retried
        peer.setblocking(False)
        frame_start = HEADER.pack(DEFAULT_MAX_FRAME_SIZE - 64) + b"\x81" + bytes(SLOWLORIS_HEAD)
        with contextlib.suppress(OSError):  # refused or closed: the next drip reopens it
            peer.send(frame_start)
        return peer

    peers = [begin() for _ in range(count)]
    _say("ready")
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin, selectors.EVENT_READ)
    while not selector.select(timeout=SLOWLORIS_DRIP_S):  # until stdin has EOF (or a line)
        for i, peer in enumerate(peers):
            try:
                peer.send(b"\x00")
            except OSError:  # dropped at its frame deadline (or refused): again
                peer.close()
                peers[i] = begin()
    for peer in peers:
        peer.close()
    return 0


def run_flooder(sock_path: str, count: int) -> int:
    """``count`` connections sending pings as fast as the daemon reads them (see above)."""
    import selectors

    from ctxstore.messages import Ping
    from ctxstore.protocol import encode_frame

    batch = b"".join(encode_frame(Ping(nonce=n)) for n in range(PINGS_PER_SEND))
    selector = selectors.DefaultSelector()
    unsent: dict[socket.socket, memoryview] = {}
    batches: dict[socket.socket, bytes] = {}

    def add() -> None:
        try:
            peer = _hello(sock_path, "flooder")
        except OSError:
            return  # refused at connect: one flooder fewer
        peer.setblocking(False)
        batches[peer], unsent[peer] = batch, memoryview(batch)
        selector.register(peer, selectors.EVENT_READ | selectors.EVENT_WRITE)

    def drop(peer: socket.socket) -> None:
        selector.unregister(peer)
        peer.close()
        del batches[peer], unsent[peer]

    for _ in range(count):
        add()
    selector.register(sys.stdin, selectors.EVENT_READ)
    _say("ready")
    while True:
        for key, events in selector.select():
            if key.fileobj is sys.stdin:
                for peer in list(batches):
                    drop(peer)
                return 0
            peer = cast("socket.socket", key.fileobj)
            try:
                if events & selectors.EVENT_READ and not peer.recv(1 << 16):
                    raise ConnectionResetError("closed by the daemon")
                if events & selectors.EVENT_WRITE:
                    sent = peer.send(unsent[peer])
                    rest = unsent[peer][sent:]
                    unsent[peer] = rest if len(rest) else memoryview(batches[peer])
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                drop(peer)
                add()


def _hello(sock_path: str, name: str) -> socket.socket:
    """A blocking connection that said hello and read the daemon's first answer."""
    import socket

    from ctxstore.messages import Hello
    from ctxstore.protocol import NEED_DATA, Connection, Role

    conn = Connection(Role.CLIENT)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.settimeout(60.0)
    peer.connect(sock_path)
    peer.sendall(conn.send(Hello(role="reader", name=f"{name}-{os.getpid()}", pid=os.getpid())))
    while conn.next_event() is NEED_DATA:
        data = peer.recv(1 << 16)
        conn.receive_data(data)
        if not data:
            break
    return peer


# -- memory readers ----------------------------------------------------------------------------


def run_memory(how: str, store: str, sock: str, slot: int, version_dir: str, shm_name: str) -> int:
    """A reader process that loads one context ``how`` (see module docstring); speaks lines."""
    from ctxstore.readers import Reader

    with Reader(store=store, socket=sock, name=f"memory-{os.getpid()}") as reader:
        _wait(lambda: reader.connected, 60.0, "connect to the daemon")
        _say("bare")
        if sys.stdin.readline().strip() != "load":
            return 0
        held = _load(how, reader, slot, version_dir, shm_name)
        _say(f"loaded {_touch(held)}")
        sys.stdin.read()  # hold everything until the bench closes our stdin
        del held
    return 0


def _load(how: str, reader: Reader, slot: int, version_dir: str, shm_name: str) -> list[Any]:
    import numpy as np

    if how == "ctxstore":
        return [reader.get(slot)]
    if how == "private":
        files = sorted(Path(version_dir).glob("*.npy"), key=lambda p: int(p.stem))
        return [np.load(path) for path in files]  # read() into this process's own memory
    if how == "shm":
        from multiprocessing import resource_tracker, shared_memory

        # An attaching process must not register the segment: its tracker would unlink it
        # (and warn) when this process exits (CPython issue 82300).
        resource_tracker.register = lambda *args, **kwargs: None
        segment = shared_memory.SharedMemory(shm_name)
        return [segment, np.ndarray((segment.size,), dtype=np.uint8, buffer=segment.buf)]
    if how == "none":
        return []
    raise ValueError(f"unknown way to load: {how}")


def _touch(held: list[Any]) -> int:
    """Read one byte of every page of everything held; returns the bytes covered."""
    import numpy as np

    page = mmap.PAGESIZE
    total = 0
    for item in held:
        arrays = item.weights.values() if hasattr(item, "weights") else [item]
        for array in arrays:
            if not isinstance(array, np.ndarray):
                continue
            flat = array.reshape(-1).view(np.uint8)
            if flat.size:
                int(flat[::page].sum())
                total += flat.size
    return total


def _say(line: str) -> None:
    print(line, flush=True)


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"could not {what} within {timeout:g} s")
        time.sleep(0.01)


# -- entry point -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers")
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("daemon")
    p.add_argument("store")
    p.add_argument("socket")
    p.add_argument("stamps_dir", type=Path)
    p = sub.add_parser("reader")
    p.add_argument("store")
    p.add_argument("socket")
    p.add_argument("slot", type=int)
    p.add_argument("index", type=int)
    p.add_argument("stamps", type=Path)
    p = sub.add_parser("poller")
    p.add_argument("db")
    p.add_argument("slot", type=int)
    p.add_argument("index", type=int)
    p.add_argument("interval", type=float)
    p.add_argument("stamps", type=Path)
    p = sub.add_parser("floor-client")
    p.add_argument("socket")
    p.add_argument("index", type=int)
    p.add_argument("stamps", type=Path)
    p = sub.add_parser("idle")
    p.add_argument("store")
    p.add_argument("socket")
    p = sub.add_parser("mute")
    p.add_argument("socket")
    p.add_argument("slot", type=int)
    for role in ("slowloris", "flooder"):
        p = sub.add_parser(role)
        p.add_argument("socket")
        p.add_argument("count", type=int)
    p = sub.add_parser("memory")
    p.add_argument("how", choices=("ctxstore", "private", "shm", "none"))
    p.add_argument("store")
    p.add_argument("socket")
    p.add_argument("slot", type=int)
    p.add_argument("version_dir")
    p.add_argument("shm_name")
    args = parser.parse_args(argv)
    match args.role:
        case "daemon":
            return run_daemon(args.store, args.socket, args.stamps_dir)
        case "reader":
            return run_reader(args.store, args.socket, args.slot, args.index, args.stamps)
        case "poller":
            return run_poller(args.db, args.slot, args.index, args.interval, args.stamps)
        case "floor-client":
            return run_floor_client(args.socket, args.index, args.stamps)
        case "idle":
            return run_idle(args.store, args.socket)
        case "mute":
            return run_mute(args.socket, args.slot)
        case "slowloris":
            return run_slowloris(args.socket, args.count)
        case "flooder":
            return run_flooder(args.socket, args.count)
        case _:
            return run_memory(
                args.how, args.store, args.socket, args.slot, args.version_dir, args.shm_name
            )


if __name__ == "__main__":
    raise SystemExit(main())
