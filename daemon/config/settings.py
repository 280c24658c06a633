"""The daemon's configuration: :class:`DaemonConfig`, every value checked when it is built.

Also the admin token, read from ``token_file`` (:func:`read_token`).
"""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctxstore.errors import InvalidInputError
from ctxstore.locations import default_socket_path, default_store_dir
from ctxstore.nodes.files import DEFAULT_MAX_IMPORT_BYTES, ImportLimits
from ctxstore.store import DEFAULT_RETENTION
from ctxstore.versionfiles import MAX_FILE_BYTES, MAX_FILES
from ctxstore.versiontable import DEFAULT_CAPACITY
from ctxstore.wire import DEFAULT_MAX_FRAME_SIZE

from .checks import HookSpec, _shown, _split_http
from .keys import KEYS

if TYPE_CHECKING:
    from .loading import ConfigLoader

#: a bearer token shorter than this is refused: it could be guessed
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_BYTES = 4096
_BACKOFF_INITIAL = 1.0
_BACKOFF_MAX = 60.0


def default_max_publish_bytes() -> int:
    """Half the machine's memory: the daemon holds a private copy of a publish while it commits."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 4 << 30
    return max(total // 2, 64 << 20)


# -- the settings ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything the daemon runs with; each value checked (see ``KEYS``) when it is built."""

    store: Path = field(default_factory=default_store_dir)
    socket: Path = field(default_factory=default_socket_path)
    socket_group: str | None = None
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()
    #: who may publish over the socket, among those who may connect (empty: all of them)
    publish_uids: frozenset[int] = frozenset()
    publish_gids: frozenset[int] = frozenset()
    #: directories file imports may read from, symlinks resolved (empty: anywhere)
    import_roots: tuple[Path, ...] = ()
    #: tensor bytes one file import may bring (default: the machine's memory)
    import_max_bytes: int = DEFAULT_MAX_IMPORT_BYTES
    #: extra files (config, tokenizer ...) one checkpoint import may bring, and bytes of each
    import_max_files: int = MAX_FILES
    import_max_file_bytes: int = MAX_FILE_BYTES
    retention: int = DEFAULT_RETENTION
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    #: a reader whose outbox does not drain for this long is disconnected
    stuck_timeout: float = 5.0
    #: a reader that sends nothing (not even a heartbeat) for this long is disconnected,
    #: unless the daemon owes it an answer (a publish in flight)
    silent_timeout: float = 10.0
    #: the most tensor bytes one publish_shm may hand over (the daemon copies them)
    max_publish_bytes: int = field(default_factory=default_max_publish_bytes)
    #: seconds between the Progress frames of a publish in flight
    publish_progress_interval: float = 2.0
    #: publish keys remembered in memory (the index keeps them too, while retention does)
    publish_keys: int = 10_000
    #: seconds between sweeps for segments of publishers that died
    shm_reclaim_interval: float = 60.0
    table_capacity: int = DEFAULT_CAPACITY
    #: socket peers at once, in all and per uid; 0: derived from RLIMIT_NOFILE (daemon/limits.py)
    max_connections: int = 0
    max_connections_per_uid: int = 0
    #: open HTTP connections, and GET /events streams among them; 0: derived from RLIMIT_NOFILE
    max_http_connections: int = 0
    max_event_streams: int = 0
    #: a peer that has started a frame must finish it within this many seconds
    frame_timeout: float = 10.0
    #: bytes of unfinished frames held for all peers together; 0: 4 x max_frame_size
    max_partial_bytes: int = 0
    #: budget units a peer may spend per second (a frame costs 1, one the daemon answers 20)
    peer_rate: int = 1000
    #: budget units all peers of one uid together may spend a second on the frames the
    #: daemon answers (ping, status_request, ...); 0: 2 x peer_rate
    uid_rate: int = 0
    #: frames the daemon handles from one peer before it lets the others go
    peer_frames_per_turn: int = 32
    #: bytes of one peer's input read at a time; with what its stream holds, the daemon
    #: keeps at most twice this of a peer's input besides an unfinished frame (the rest
    #: waits in the kernel): a flooder or a slow peer costs kilobytes, not its backlog
    peer_read_buffer: int = 16 << 10
    #: hash each new version once after its commit, before announcing it, and record it
    #: verified, so readers adopting it need not hash it (ctxstore.integrity)
    verify_after_commit: bool = True
    #: read each new version back and hash it before announcing it, instead of recording
    #: the checksums its commit took of the bytes it wrote (costs ~0.1 s of CPU per GiB)
    reread_after_commit: bool = False
    #: the most bytes of a new version's record (its config and metadata JSON texts plus
    #: 64 a tensor) its announcement carries, so readers map it without reading the
    #: index; 0: announcements carry none (docs/protocol.md, announce)
    announce_record_bytes: int = 64 << 10
    #: a reader's damage report on a version the daemon found intact is checked again
    #: (hashed) at most this often per version: reports alone cannot keep it hashing
    damage_recheck_interval: float = 60.0
    log_level: str = "INFO"
    log_format: str = "text"
    #: "HOST:PORT" for the HTTP admin API, or "off"
    http: str = "127.0.0.1:8470"
    #: a file holding the bearer token that mutating HTTP calls must present
    token_file: Path | None = None
    max_body_bytes: int = 1 << 20
    #: /ready fails when the store's file system has less free space than this
    ready_min_free_bytes: int = 256 << 20
    jobs_concurrency: int = 2
    jobs_max_attempts: int = 3
    jobs_backoff_initial: float = _BACKOFF_INITIAL
    jobs_backoff_max: float = _BACKOFF_MAX
    pre_commit_hooks: tuple[HookSpec, ...] = ()
    post_commit_hooks: tuple[HookSpec, ...] = ()
    post_commit_timeout: float = 10.0
    #: reject commits whose float tensors hold NaN or infinity
    check_finite: bool = False
    #: the metadata metric the built-in tracker follows to move alias "best"
    best_metric: str | None = None
    best_mode: str = "min"
    #: s3://BUCKET/PREFIX this writer uploads every change to (docs/scale-out.md)
    origin: str | None = None
    #: s3://BUCKET/PREFIX this daemon follows: it then refuses local writes
    follow: str | None = None
    #: nats://HOST:PORT of the change feed (a hint: followers also poll the heads)
    feed: str | None = None
    feed_creds: Path | None = None
    feed_bucket: str = "ctxstore"
    #: seconds between a follower's polls of the origin's heads
    follow_poll_interval: float = 2.0
    #: each wait between polls is drawn from poll_interval x [1 - j, 1 + j], so a fleet's
    #: followers do not poll in lockstep
    follow_poll_jitter: float = 0.2
    #: after failed polls the wait doubles from poll_interval up to this many seconds
    follow_poll_backoff_max: float = 60.0
    #: a follower waits a random 0 .. this many seconds before acting on a feed hint
    #: (spreads a fleet's downloads of a new version; 0: at once)
    follow_pull_jitter: float = 0.0
    #: objects from this size up are uploaded and downloaded in parts of this size
    origin_part_size: int = 16 << 20
    #: parts in flight at once per transfer
    origin_concurrency: int = 8
    #: objects of one version a writer uploads at once (each large one also in parts)
    origin_upload_concurrency: int = 4
    #: how to read this configuration again on SIGHUP (None: it was built in code)
    loader: ConfigLoader | None = field(default=None, compare=False, repr=False)
    _token: str | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        for key in KEYS:
            value = getattr(self, key.field)
            try:
                canonical = key.check(value)
            except InvalidInputError as exc:
                raise InvalidInputError(f"{key.path} = {_shown(value)}: {exc}") from None
            object.__setattr__(self, key.field, canonical)
        problem = _backoff_problem(self.jobs_backoff_initial, self.jobs_backoff_max)
        if problem:
            raise InvalidInputError(problem)
        if self.origin and self.follow:
            raise InvalidInputError(
                f"origin = {self.origin!r} and follow = {self.follow!r}: a daemon either "
                "writes to an origin or follows one, not both"
            )

    def replace(self, **changes: object) -> DaemonConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def import_limits(self) -> ImportLimits:
        """What one file import may bring (the ``imports.*`` settings)."""
        return ImportLimits(self.import_max_bytes, self.import_max_files,
                            self.import_max_file_bytes)  # fmt: skip

    def http_address(self) -> tuple[str, int] | None:
        """(host, port) to bind the HTTP API to, or None when ``http`` is "off"."""
        return None if self.http == "off" else _split_http(self.http)

    def token(self) -> str | None:
        """The bearer token from ``token_file``, or None when no file is set.

        The file is read on the first call and the token kept by this object:
        the daemon reads it at start, and a SIGHUP builds a new configuration
        that reads it again. Raises InvalidInputError when the file is bad.
        """
        if self.token_file is None:
            return None
        if self._token is None:
            object.__setattr__(self, "_token", read_token(self.token_file))
        return self._token

    def reload(self) -> DaemonConfig:
        """This configuration read again from the same file and environment, flags kept."""
        return self if self.loader is None else self.loader.load().config

    def values(self) -> dict[str, Any]:
        """Every setting by field name (not the loader)."""
        return {key.field: getattr(self, key.field) for key in KEYS}


def _backoff_problem(initial: float, maximum: float) -> str | None:
    if initial <= maximum:
        return None
    return f"jobs.backoff_initial = {initial:g} must not exceed jobs.backoff_max = {maximum:g}"


def read_token(path: Path) -> str:
    """The stripped bearer token in ``path``; refuses files others may read, empty or weak ones."""
    where = f"token_file {path}"
    try:  # O_NONBLOCK: a FIFO must not hang the daemon; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise InvalidInputError(f"{where}: cannot open: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInputError(f"{where}: is not a regular file")
        if info.st_mode & 0o077:
            raise InvalidInputError(
                f"{where}: mode {stat.S_IMODE(info.st_mode):04o} lets group or others use it; "
                f"run: chmod 600 {path}"
            )
        data = b""
        while len(data) <= MAX_TOKEN_BYTES and (chunk := os.read(fd, MAX_TOKEN_BYTES + 1)):
            data += chunk
    finally:
        os.close(fd)
    token = data.strip()
    if not token:
        raise InvalidInputError(f"{where}: is empty")
    if len(data) > MAX_TOKEN_BYTES or not all(0x21 <= byte < 0x7F for byte in token):
        raise InvalidInputError(
            f"{where}: the token must be one line of printable ASCII without spaces, "
            f"at most {MAX_TOKEN_BYTES} bytes"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        raise InvalidInputError(
            f"{where}: the token has {len(token)} characters, at least {MIN_TOKEN_LENGTH} "
            "are required (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token.decode("ascii")
