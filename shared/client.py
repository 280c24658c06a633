"""A small blocking client of the daemon's socket, for publishing from training code.

``publish(slot, context_or_path)`` returns the committed version. A file path
travels as a path (the daemon imports it); a Context's tensors never travel as
socket frames: they are staged in a POSIX shared-memory segment, named after
this process's pid, that the daemon copies from (with reads that cannot fault)
and the client removes afterwards; the daemon reclaims the segment of a
publisher that died before it could.

Every publish carries an idempotency key (random unless given): a retry with
the same key commits at most once and answers with the version the first try
committed. While a publish runs, the daemon sends Progress frames, which a
``progress`` callback sees.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import posix_ipc

from .context import Context
from .dtypes import spec_text
from .errors import (
    CtxStoreError,
    DaemonUnavailableError,
    InvalidInputError,
    RemoteError,
    StorageError,
    WaitTimeoutError,
)
from .kept import KeptConnections
from .locations import default_socket_path
from .store.npyfile import contiguous_bytes
from .validation import check_alias, check_label, check_slot, freeze_mapping
from .wire import (
    NEED_DATA,
    Connection,
    Error,
    Goodbye,
    Hello,
    Message,
    Ping,
    Progress,
    PublishBuild,
    Published,
    PublishFile,
    PublishShm,
    Repaired,
    RepairRequest,
    Role,
    Signal,
    Status,
    StatusRequest,
    TensorSpec,
    Welcome,
)

SHM_PREFIX = "/ctxstore-pub-"
_ALIGN = 64
_SEGMENT = re.compile(re.escape(SHM_PREFIX) + r"([1-9][0-9]{0,9})-[0-9a-f]{12}")
_MAX_PID = 2**22  # the kernel's pid_max ceiling

ProgressCallback = Callable[[Progress], None]


def publish_segment_name(pid: int) -> str:
    """A fresh name for a publish segment of process ``pid``: ``/ctxstore-pub-<pid>-<hex>``."""
    return f"{SHM_PREFIX}{pid}-{secrets.token_hex(6)}"


def publish_segment_owner(name: str) -> int | None:
    """The pid a :func:`publish_segment_name` names, or None for any other name."""
    match = _SEGMENT.fullmatch(name)
    if match is None:
        return None
    pid = int(match.group(1))
    return pid if pid <= _MAX_PID else None


def new_publish_key() -> str:
    """A random idempotency key (24 characters of [A-Za-z0-9_-])."""
    return secrets.token_urlsafe(18)


#: the protocol this client's hello asks for: the oldest with everything it uses
CLIENT_PROTOCOL: Final = 1


class DaemonClient:
    """One connection to the daemon that sends requests and waits for their answers."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        name: str = "ctxstore-client",
        role: str = "publisher",
        timeout: float = 60.0,
    ) -> None:
        self.path = Path(socket_path) if socket_path else default_socket_path()
        self._conn = Connection(Role.CLIENT)
        self._ids = itertools.count(1)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.path))
        except OSError as exc:
            self._sock.close()
            raise DaemonUnavailableError(
                f"cannot reach the ctxstore daemon at {self.path}: {exc.strerror or exc}"
            ) from exc
        try:
            welcome = self._handshake(role, name)
        except BaseException:
            self._sock.close()
            raise
        self.daemon_pid = welcome.daemon_pid

    def _handshake(self, role: str, name: str) -> Welcome:
        # Protocol 1 has all a publisher, a watcher or an admin tool uses (2 added the
        # record readers map from), so an upgraded client still reaches an older daemon.
        self._send(Hello(role=role, name=name, pid=os.getpid(), protocol=CLIENT_PROTOCOL))
        welcome = self._receive()
        if isinstance(welcome, Error):  # e.g. a uid the daemon does not allow
            raise DaemonUnavailableError(
                f"the ctxstore daemon at {self.path} refused the connection: {welcome.message}"
            )
        if not isinstance(welcome, Welcome):
            raise DaemonUnavailableError(f"daemon answered hello with {type(welcome).__name__}")
        return welcome

    def _send(self, message: Message) -> None:
        try:
            self._sock.sendall(self._conn.send(message))
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise DaemonUnavailableError(f"the daemon closed the connection: {exc}") from exc

    def _receive(self) -> Message:
        while True:
            event = self._conn.next_event()
            if event is NEED_DATA:
                try:
                    data = self._sock.recv(1 << 16)
                except TimeoutError:
                    raise WaitTimeoutError("the daemon did not answer in time") from None
                except ConnectionResetError as exc:
                    raise DaemonUnavailableError(
                        f"the daemon closed the connection: {exc}"
                    ) from exc
                self._conn.receive_data(data)
                continue
            if isinstance(event, Signal):
                raise DaemonUnavailableError("the daemon closed the connection")
            if isinstance(event, Goodbye):
                raise DaemonUnavailableError(f"the daemon is going away: {event.reason}")
            return event

    def next_request_id(self) -> int:
        return next(self._ids)

    def settimeout(self, timeout: float) -> None:
        """How long a request may wait for the daemon's next frame from now on."""
        self._sock.settimeout(timeout)

    def idle_and_open(self) -> bool:
        """Whether the connection can take a request: nothing unread (a goodbye, an
        error, EOF) is waiting on it. Checked before a kept connection is reused."""
        if self._conn.buffered:
            return False
        saved = self._sock.gettimeout()
        try:
            self._sock.setblocking(False)
            try:
                self._sock.recv(1, socket.MSG_PEEK)
            finally:
                self._sock.settimeout(saved)
        except (BlockingIOError, InterruptedError):
            return True  # nothing to read: open and quiet
        except OSError:
            return False
        return False  # a frame or EOF is waiting: the daemon spoke first (goodbye, error)

    def request(
        self, message: Message, request_id: int, progress: ProgressCallback | None = None
    ) -> Message:
        """Send ``message`` and return the answer carrying ``request_id``; errors raise.

        Progress frames for the request go to ``progress`` (if given), not to the caller.
        """
        self._send(message)
        while True:
            reply = self._receive()
            if isinstance(reply, Error) and (reply.request_id in (None, request_id)):
                raise RemoteError(reply.kind, reply.message)
            if isinstance(reply, Progress):
                if progress is not None and reply.request_id == request_id:
                    progress(reply)
                continue
            if getattr(reply, "request_id", None) == request_id:
                return reply

    def status(self) -> Status:
        """The daemon's Status: itself, its connected peers and its slots (one round trip)."""
        request_id = self.next_request_id()
        try:
            reply = self.request(StatusRequest(request_id=request_id), request_id)
        except CtxStoreError:
            raise  # ours are OSErrors too (timeouts, unavailable): they already say what happened
        except OSError as exc:
            raise DaemonUnavailableError(f"lost the ctxstore daemon at {self.path}: {exc}") from exc
        if not isinstance(reply, Status):
            raise DaemonUnavailableError(f"the daemon answered status with {reply.TYPE!r}")
        return reply

    def repair(self, slot: int | None = None, *, keepalive: float = 2.0) -> Repaired:
        """Ask the daemon to verify ``slot`` (None: every slot) and move damaged current
        versions back to intact ones (RepairRequest); its answer.

        Re-hashing takes about 60 ms a GiB from the page cache (more from disk): the
        client's ``timeout`` bounds the whole wait, and a ping every ``keepalive``
        seconds tells the daemon this peer is still there while it works.
        """
        request_id = self.next_request_id()
        saved = self._sock.gettimeout()
        deadline = time.monotonic() + (float("inf") if saved is None else saved)
        try:
            self._send(RepairRequest(request_id=request_id, slot=slot))
            self._sock.settimeout(keepalive)
            pings = 0
            while True:
                try:
                    reply = self._receive()
                except WaitTimeoutError:
                    if time.monotonic() >= deadline:
                        raise WaitTimeoutError(
                            "the daemon did not finish the repair in time"
                        ) from None
                    pings += 1
                    self._send(Ping(nonce=pings))
                    continue
                if isinstance(reply, Error) and reply.request_id in (None, request_id):
                    raise reply.exception()
                if isinstance(reply, Repaired) and reply.request_id == request_id:
                    return reply
        except CtxStoreError:
            raise
        except OSError as exc:
            raise DaemonUnavailableError(f"lost the ctxstore daemon at {self.path}: {exc}") from exc
        finally:
            self._sock.settimeout(saved)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._send(Goodbye(reason="client done"))
        self._sock.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: how long a publisher's connection stays open after a request, for the next one to reuse
KEEP_IDLE_S = 1.0
_kept: KeptConnections[DaemonClient] = KeptConnections(KEEP_IDLE_S)


def _on_kept_connection(
    path: str | os.PathLike[str] | None, timeout: float, send: Callable[[DaemonClient], int]
) -> int:
    """``send(client)`` on this process's kept connection to the daemon at ``path`` (or a
    new one), then keep the connection a moment for the next request (:mod:`.kept`).

    A kept connection the daemon closed meanwhile (it went away, or dropped us) is
    noticed when it answers nothing: the request is sent once more on a new one.
    Every publish carries an idempotency key, so that retry commits at most once.
    """
    key = os.fspath(path if path else default_socket_path())
    client = _kept.take(key)
    reused = client is not None and client.idle_and_open()
    if client is not None and not reused:
        client.close()
    if client is None or not reused:
        client = DaemonClient(key, timeout=timeout)
    try:
        client.settimeout(timeout)
        try:
            result = send(client)
        except DaemonUnavailableError:
            if not reused:
                raise
            client.close()
            client = DaemonClient(key, timeout=timeout)
            result = send(client)
    except RemoteError:  # the daemon refused this request: the connection is fine
        _kept.give_back(key, client)
        raise
    except BaseException:
        client.close()
        raise
    _kept.give_back(key, client)
    return result


def wait_until_listening(
    path: str | os.PathLike[str],
    timeout: float,
    alive: Callable[[], bool] = lambda: True,
) -> None:
    """Block until something accepts connections on ``path`` (a daemon starting up)."""
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            raise DaemonUnavailableError(f"the daemon for {path} exited while starting")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            if time.monotonic() >= deadline:
                raise DaemonUnavailableError(
                    f"nothing listens on {path} after {timeout:g}s"
                ) from None
            time.sleep(0.02)
        else:
            return
        finally:
            probe.close()


def _check_names(*, model_type: str | None = None, alias: str | None = None) -> None:
    """Refuse bad names before a request is built, in words that name what was passed
    (a request's own checks would name its wire field: ``publish_file.alias: ...``)."""
    if model_type is not None:
        check_label(model_type, "model type")
    if alias is not None:
        check_alias(alias)


def _file_path(source: str | os.PathLike[str]) -> str:
    """``source`` as the absolute path a PublishFile carries, or why it cannot carry it."""
    path = str(Path(source).absolute())
    try:
        checked: str = PublishFile.CHECKS["path"](path)
    except InvalidInputError as exc:  # too long, control characters: "is 5015 bytes long..."
        shown = path if len(path) <= 80 else f"{path[:60]}...{path[-17:]}"
        raise InvalidInputError(f"weights file path {shown!r} {exc}") from None
    return checked


def _expect_published(reply: Message) -> int:
    if not isinstance(reply, Published):
        raise DaemonUnavailableError(f"unexpected answer {type(reply).__name__}")
    return reply.version


def _publish_request(
    client: DaemonClient,
    request: PublishFile | PublishBuild | PublishShm,
    progress: ProgressCallback | None,
) -> int:
    """Send a publish and wait for its answer; a lost answer names the key to retry with."""
    try:
        return _expect_published(client.request(request, request.request_id, progress))
    except (DaemonUnavailableError, WaitTimeoutError) as exc:
        raise type(exc)(
            f"{exc}; the publish to slot {request.slot} may have been committed: "
            f"retry with key {request.key!r} (ctxstore publish --key {request.key}) to "
            "commit it at most once"
        ) from exc


def publish(
    slot: int,
    source: Context | str | os.PathLike[str],
    *,
    socket: str | os.PathLike[str] | None = None,
    model_type: str | None = None,
    alias: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    timeout: float = 600.0,
    key: str | None = None,
    progress: ProgressCallback | None = None,
) -> int:
    """Ask the daemon to commit ``source`` as the next version of ``slot``; returns it.

    ``key``: the idempotency key (default: a random one). A publish sent again
    with the key of one the daemon committed (or is committing) is not
    committed again: it answers with that version. ``timeout``: the longest
    the daemon may stay silent; it sends a Progress frame every few seconds
    while the publish runs, each passed to ``progress``. Bad arguments are
    refused before connecting, in words that name the argument.
    """
    slot = check_slot(slot)
    _check_names(model_type=model_type, alias=alias)
    key = _checked_key(key)
    if isinstance(source, Context):
        if metadata:
            source = source.set_metadata({**source.get_metadata(), **metadata})
        context = source
        return _on_kept_connection(
            socket,
            timeout,
            lambda client: _publish_context(
                client, client.next_request_id(), slot, context, model_type=model_type,
                alias=alias, key=key, progress=progress,
            ),
        )  # fmt: skip
    path = _file_path(source)
    freeze_mapping(metadata, "metadata")

    def send(client: DaemonClient) -> int:
        request = PublishFile(
            request_id=client.next_request_id(),
            slot=slot,
            path=path,
            model_type=model_type,
            alias=alias,
            metadata=dict(metadata or {}),
            key=key,
            progress=True,
        )
        return _publish_request(client, request, progress)

    return _on_kept_connection(socket, timeout, send)


def _checked_key(key: str | None) -> str:
    """``key``, checked as the wire checks it, or a new random one."""
    if key is None:
        return new_publish_key()
    try:
        checked: str = PublishFile.CHECKS["key"](key)
    except InvalidInputError as exc:
        raise InvalidInputError(f"publish key {exc}") from None
    return checked


def build(
    slot: int,
    node_type: str,
    config: Mapping[str, Any] | None = None,
    *,
    socket: str | os.PathLike[str] | None = None,
    alias: str | None = None,
    timeout: float = 600.0,
    key: str | None = None,
    progress: ProgressCallback | None = None,
) -> int:
    """Ask the daemon to build a context with a registered node type and commit it.

    ``key``, ``timeout`` and ``progress`` are as for :func:`publish`.
    """
    slot = check_slot(slot)
    check_label(node_type, "node type")
    _check_names(alias=alias)
    freeze_mapping(config, "config")
    key = _checked_key(key)

    def send(client: DaemonClient) -> int:
        request = PublishBuild(
            request_id=client.next_request_id(), slot=slot, node_type=node_type,
            config=dict(config or {}), alias=alias, key=key, progress=True,
        )  # fmt: skip
        return _publish_request(client, request, progress)

    return _on_kept_connection(socket, timeout, send)


def _publish_context(
    client: DaemonClient,
    rid: int,
    slot: int,
    context: Context,
    *,
    model_type: str | None,
    alias: str | None,
    key: str,
    progress: ProgressCallback | None,
) -> int:
    specs: list[TensorSpec] = []
    offset = 0
    for name, array in context.weights.items():
        if array.dtype.fields is not None or array.dtype.subdtype is not None:
            raise InvalidInputError(
                f"tensor {name!r}: structured dtype {array.dtype} cannot be published through "
                "the daemon; save it with PersistentStore or publish a .npy file"
            )
        offset = -(-offset // _ALIGN) * _ALIGN
        specs.append(
            TensorSpec(name, spec_text(array.dtype), tuple(array.shape), offset, array.nbytes)
        )
        offset += array.nbytes
    name = publish_segment_name(os.getpid())
    try:
        segment = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=max(offset, 1))
    except (posix_ipc.Error, OSError) as exc:
        raise StorageError(f"cannot create shared-memory segment {name}: {exc}") from exc
    try:
        with mmap.mmap(segment.fd, max(offset, 1)) as mm:
            segment.close_fd()
            for spec, array in zip(specs, context.weights.values(), strict=True):
                mm[spec.offset : spec.offset + spec.nbytes] = contiguous_bytes(array)
        request = PublishShm(
            request_id=rid,
            slot=slot,
            shm_name=name,
            manifest=tuple(specs),
            config=context.get_config(),
            metadata=context.get_metadata(),
            model_type=model_type,
            alias=alias,
            key=key,
            progress=True,
        )
        return _publish_request(client, request, progress)
    finally:
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(name)
