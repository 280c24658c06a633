"""The daemon's settings: built-in defaults, one TOML file, CTXSTORE_* variables, flags.

Precedence, lowest first: defaults < the configuration file < ``CTXSTORE_*``
environment variables < command-line flags. The file is ``--config FILE``, else
``$CTXSTORE_CONFIG``, else ``$CONFIGURATION_DIRECTORY/ctxstore.toml`` when it
exists (systemd's ``ConfigurationDirectory=``). docs/configuration.md shows the
file layout, every key, its variable and flag, and what SIGHUP reloads.

``KEYS`` is the one table of settings: field, key in the file, variable, flag (and how
the command line parses it: ``ctxstore daemon`` makes its flags from this table),
check and whether a reload applies it live. Every value, wherever it comes
from, goes through its key's check; a refused value is reported with where it
came from, the key and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

from ctxstore.checks import SETTING, boolean, integer
from ctxstore.checks import kind as _kind
from ctxstore.checks import optional as _optional
from ctxstore.errors import InvalidInputError
from ctxstore.nodes.files import DEFAULT_MAX_IMPORT_BYTES, ImportLimits
from ctxstore.paths import default_socket_path, default_store_dir
from ctxstore.store import DEFAULT_RETENTION
from ctxstore.validation import freeze_mapping, thaw_json
from ctxstore.versionfiles import MAX_FILE_BYTES, MAX_FILES
from ctxstore.versiontable import DEFAULT_CAPACITY, MAX_CAPACITY, MIN_CAPACITY
from ctxstore.wire import DEFAULT_MAX_FRAME_SIZE, MAX_FRAME_SIZE, MIN_FRAME_SIZE

from .logs import LOG_FORMATS, LOG_LEVELS

__all__ = [
    "CONFIG_FILE_NAME",
    "KEYS",
    "ConfigLoader",
    "DaemonConfig",
    "HookSpec",
    "Key",
    "LoadedConfig",
    "Origin",
    "ReloadPlan",
    "plan_reload",
    "read_token",
    "token_change",
]

CONFIG_FILE_NAME = "ctxstore.toml"
#: a bearer token shorter than this is refused: it could be guessed
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_BYTES = 4096
_MAX_ID = 2**32 - 2  # uid/gid: (uid_t)-1 means "no change" to the kernel
_MAX_SECONDS = 86400.0
_BACKOFF_INITIAL = 1.0
_BACKOFF_MAX = 60.0

Check = Callable[[Any], Any]


# -- value checks: return the canonical value or raise InvalidInputError(reason) -----------------
# (integers, booleans and optional values are ctxstore.checks' checks, in the settings' words)

def _int_in(low: int, high: int) -> Check:
    return integer(low, high, SETTING)


def _power_of_two(low: int, high: int) -> Check:
    def check(value: object) -> int:
        number: int = _int_in(low, high)(value)
        if number & (number - 1):
            raise InvalidInputError("must be a power of two")
        return number

    return check


def _seconds(high: float) -> Check:
    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInputError(f"must be a number of seconds, not {_kind(value)}")
        if not 0 < value <= high:
            raise InvalidInputError(f"must be more than 0 and at most {high:g} seconds")
        return float(value)

    return check


def _choice(options: tuple[str, ...], fold: Callable[[str], str]) -> Check:
    def check(value: object) -> str:
        if not isinstance(value, str) or fold(value) not in options:
            raise InvalidInputError(f"must be one of {', '.join(options)}")
        return fold(value)

    return check


_bool: Final = boolean(SETTING)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"must be a string, not {_kind(value)}")
    if not value or len(value) > 256 or not value.isprintable():
        raise InvalidInputError("must be 1 to 256 printable characters")
    return value


def _path(value: object) -> Path:
    if not isinstance(value, str | os.PathLike):
        raise InvalidInputError(f"must be a path, not {_kind(value)}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text or "\0" in text:
        raise InvalidInputError("must be a non-empty path")
    return Path(os.path.expanduser(text))


def _roots(value: object) -> tuple[Path, ...]:
    if not isinstance(value, list | tuple):
        raise InvalidInputError(f"must be an array of directories, not {_kind(value)}")
    roots = tuple(_path(item) for item in value)
    relative = [os.fspath(root) for root in roots if not root.is_absolute()]
    if relative:
        raise InvalidInputError(f"import roots must be absolute paths, not {relative[0]!r}")
    return tuple(dict.fromkeys(roots))


def _env_paths(text: str) -> list[str]:
    return [part for part in text.split(os.pathsep) if part]


def _ids(value: object) -> frozenset[int]:
    if not isinstance(value, list | tuple | set | frozenset):
        raise InvalidInputError(f"must be an array of ids, not {_kind(value)}")
    check = _int_in(0, _MAX_ID)
    return frozenset(check(item) for item in value)


_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*\.?")


def _split_http(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise InvalidInputError('must be HOST:PORT (e.g. "127.0.0.1:8470") or "off"')
    if host.startswith("[") and host.endswith("]"):
        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise InvalidInputError(f"{host} is not an IPv6 address") from None
    elif ":" in host:
        raise InvalidInputError("an IPv6 address goes in brackets: [::1]:8470")
    elif not _HOSTNAME.fullmatch(host):
        raise InvalidInputError(f"{host!r} is not a host name or an IPv4 address")
    if not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise InvalidInputError(f"port {port!r} is not a number from 0 to 65535")
    return host, int(port)


def _http(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f'must be "HOST:PORT" or "off", not {_kind(value)}')
    value = value.strip()
    if value.lower() == "off":
        return "off"
    _split_http(value)
    return value


_TARGET = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_ENTRY_POINT = re.compile(r"entrypoint:([A-Za-z0-9][A-Za-z0-9_.-]*)")
_HOOK_FIELDS = ("target", "priority", "options")


@dataclass(frozen=True)
class HookSpec:
    """One configured hook: where its callable lives, its priority, its options.

    ``target`` is ``"package.module:attribute"`` (imported) or
    ``"entrypoint:NAME"`` (an entry point in the ``ctxstore.hooks`` group).
    ``options`` is read-only JSON-like data handed to the hook.
    """

    target: str
    priority: int = 0
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not (
            _ENTRY_POINT.fullmatch(self.target) or _TARGET.fullmatch(self.target)
        ):
            raise InvalidInputError(
                f"hook target {self.target!r} must be 'package.module:attribute' "
                "or 'entrypoint:NAME'"
            )
        try:
            _int_in(-(2**31), 2**31 - 1)(self.priority)
        except InvalidInputError as exc:
            raise InvalidInputError(f"hook priority {self.priority!r} {exc}") from None
        object.__setattr__(self, "options", freeze_mapping(self.options, "hook options"))

    @property
    def entry_point(self) -> str | None:
        """The entry point name for ``entrypoint:NAME`` targets, else None."""
        match = _ENTRY_POINT.fullmatch(self.target)
        return match.group(1) if match else None

    def as_json(self) -> dict[str, Any]:
        options = thaw_json(self.options)
        return {"target": self.target, "priority": self.priority, "options": options}


def _hook(value: object) -> HookSpec:
    if isinstance(value, HookSpec):
        return value
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"must be a table with a target, not {_kind(value)}")
    unknown = sorted(set(value) - set(_HOOK_FIELDS))
    if unknown:
        known = ", ".join(_HOOK_FIELDS)
        raise InvalidInputError(f"unknown key {unknown[0]!r} (a hook has {known})")
    if "target" not in value:
        raise InvalidInputError("has no target")
    priority = value.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidInputError(f"priority must be an integer, not {_kind(priority)}")
    return HookSpec(value["target"], priority, value.get("options", {}))


def _hooks(value: object) -> tuple[HookSpec, ...]:
    if not isinstance(value, list | tuple):
        raise InvalidInputError(f"must be an array of tables, not {_kind(value)}")
    hooks = []
    for index, item in enumerate(value):
        try:
            hooks.append(_hook(item))
        except InvalidInputError as exc:
            raise InvalidInputError(f"hook #{index + 1}: {exc}") from None
    return tuple(hooks)


def _s3_url(value: object) -> str:
    """An origin: s3://BUCKET/PREFIX (checked by the origin package's parser)."""
    text = _text(value)
    from ctxstore.origin.layout import Origin  # sans-IO: no boto3 behind it

    return str(Origin.parse(text))


def _nats_url(value: object) -> str:
    text = _text(value)
    if not re.fullmatch(r"(nats|tls)://[^\s/]+(:\d+)?/?", text):
        raise InvalidInputError("a feed is nats://HOST:PORT (or tls://HOST:PORT)")
    return text


def _kv_bucket(value: object) -> str:
    text = _text(value)
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text):
        raise InvalidInputError("a feed bucket name is 1-64 of A-Z a-z 0-9 _ -")
    return text


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
    #: objects from this size up are uploaded and downloaded in parts of this size
    origin_part_size: int = 16 << 20
    #: parts in flight at once per transfer
    origin_concurrency: int = 8
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


# -- where each setting lives: file key, variable, flag -------------------------------------------


def _env_int(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise InvalidInputError("must be an integer") from None


def _env_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidInputError("must be a number") from None


def _env_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise InvalidInputError("must be true or false (also 1/0, yes/no, on/off)")


def _env_ids(text: str) -> list[int]:
    return [_env_int(part) for part in re.split(r"[,\s]+", text.strip()) if part]


@dataclass(frozen=True)
class Key:
    """One setting: its field, its key in the file, its variable and flag, its check."""

    field: str
    path: str
    check: Check
    env: str | None = None
    from_env: Callable[[str], Any] = str
    flag: str | None = None
    #: how ``ctxstore daemon`` and ``config show`` parse the flag: the value's type (its
    #: name is in argparse's error), whether it repeats, the placeholder and help in --help
    flag_type: Callable[[str], Any] = str
    flag_repeats: bool = False
    flag_metavar: str | None = None
    flag_help: str | None = None
    #: whether SIGHUP applies a new value (False: it waits for a restart)
    live: bool = True
    #: an empty variable means "none" (the key is optional)
    optional: bool = False
    #: a relative path in the file is taken from the file's directory
    is_path: bool = False


def _key(field: str, path: str, check: Check, parse: Callable[[str], Any] = str, **kw: Any) -> Key:
    env = kw.pop("env", "CTXSTORE_" + field.upper())
    optional = kw.get("optional", False)
    return Key(field, path, _optional(check) if optional else check, env, parse, **kw)


_FRAME_SIZE = _int_in(MIN_FRAME_SIZE, MAX_FRAME_SIZE)
_CAPACITY = _power_of_two(MIN_CAPACITY, MAX_CAPACITY)
_SECONDS_HOUR = _seconds(3600)
_PART_SIZE = _int_in(5 << 20, 5 << 30)  # S3's bounds on a multipart upload's part

KEYS: tuple[Key, ...] = (
    _key("store", "store", _path, env="CTXSTORE_HOME", flag="--store", live=False, is_path=True),
    _key("socket", "socket", _path, flag="--socket", live=False, is_path=True),
    _key("socket_group", "socket_group", _text, flag="--socket-group", live=False, optional=True,
         flag_help="group that may use the socket"),
    _key("allow_uids", "allow_uids", _ids, _env_ids, flag="--allow-uid", flag_type=int,
         flag_repeats=True, flag_help="peer uid allowed"),
    _key("allow_gids", "allow_gids", _ids, _env_ids, flag="--allow-gid", flag_type=int,
         flag_repeats=True, flag_help="peer gid allowed"),
    _key("publish_uids", "publish_uids", _ids, _env_ids, flag="--publish-uid", flag_type=int,
         flag_repeats=True, flag_help="uid that may publish (repeat; default: every peer)"),
    _key("publish_gids", "publish_gids", _ids, _env_ids, flag="--publish-gid", flag_type=int,
         flag_repeats=True, flag_help="gid that may publish (repeat; default: every peer)"),
    _key("import_roots", "import_roots", _roots, _env_paths, flag="--import-root",
         flag_repeats=True, flag_metavar="DIR",
         flag_help="directory file imports may read from (repeat; default: any)"),
    _key("import_max_bytes", "imports.max_bytes", _int_in(0, 2**62), _env_int),
    _key("import_max_files", "imports.max_files", _int_in(0, 100_000), _env_int),
    _key("import_max_file_bytes", "imports.max_file_bytes", _int_in(0, 2**40), _env_int),
    _key("retention", "retention", _int_in(1, 1_000_000), _env_int, flag="--retention",
         flag_type=int, flag_help="versions kept per slot"),
    _key("max_frame_size", "max_frame_size", _FRAME_SIZE, _env_int, live=False),
    _key("stuck_timeout", "stuck_timeout", _seconds(3600), _env_float, flag="--stuck-timeout",
         flag_type=float, flag_help="drop readers whose backlog is stuck (s)"),
    _key("silent_timeout", "silent_timeout", _seconds(3600), _env_float, flag="--silent-timeout",
         flag_type=float, flag_help="drop readers silent this long (s)"),
    _key("max_publish_bytes", "max_publish_bytes", _int_in(1, 2**63 - 1), _env_int),
    _key("publish_progress_interval", "publish_progress_interval", _seconds(3600), _env_float),
    _key("publish_keys", "publish_keys", _int_in(0, 10_000_000), _env_int, live=False),
    _key("shm_reclaim_interval", "shm_reclaim_interval", _seconds(86400), _env_float, live=False),
    _key("table_capacity", "table_capacity", _CAPACITY, _env_int, live=False),
    _key("max_connections", "limits.connections", _int_in(0, 1 << 20), _env_int),
    _key("max_connections_per_uid", "limits.connections_per_uid", _int_in(0, 1 << 20), _env_int),
    _key("max_http_connections", "limits.http_connections", _int_in(0, 1 << 20), _env_int),
    _key("max_event_streams", "limits.event_streams", _int_in(0, 1 << 20), _env_int),
    _key("frame_timeout", "limits.frame_timeout", _seconds(3600), _env_float),
    _key("max_partial_bytes", "limits.partial_bytes", _int_in(0, 1 << 40), _env_int),
    _key("peer_rate", "limits.peer_rate", _int_in(10, 1 << 30), _env_int),
    _key("uid_rate", "limits.uid_rate", _int_in(0, 1 << 30), _env_int),
    _key("peer_frames_per_turn", "limits.frames_per_turn", _int_in(1, 1 << 20), _env_int),
    _key("peer_read_buffer", "limits.read_buffer", _int_in(1024, 1 << 24), _env_int, live=False),
    _key("verify_after_commit", "verify_after_commit", _bool, _env_bool),
    _key("reread_after_commit", "reread_after_commit", _bool, _env_bool),
    _key("damage_recheck_interval", "damage_recheck_interval", _seconds(86400), _env_float),
    _key("log_level", "log_level", _choice(LOG_LEVELS, str.upper), flag="--log-level",
         flag_help="DEBUG, INFO (default), WARNING, ERROR"),
    _key("log_format", "log_format", _choice(LOG_FORMATS, str.lower), flag="--log-format",
         flag_help="text (default) or json: one object a line"),
    _key("http", "http", _http, flag="--http", live=False, flag_metavar="HOST:PORT|off",
         flag_help="admin HTTP API address (default 127.0.0.1:8470), or off"),
    _key("token_file", "token_file", _path, flag="--token-file", optional=True, is_path=True,
         flag_metavar="FILE",
         flag_help="bearer token that mutating HTTP calls must send (file mode 0600)"),
    _key("max_body_bytes", "max_body_bytes", _int_in(1024, 1 << 30), _env_int, live=False),
    _key("ready_min_free_bytes", "ready_min_free_bytes", _int_in(0, 2**63 - 1), _env_int),
    _key("jobs_concurrency", "jobs.concurrency", _int_in(1, 256), _env_int, live=False),
    _key("jobs_max_attempts", "jobs.max_attempts", _int_in(1, 1000), _env_int),
    _key("jobs_backoff_initial", "jobs.backoff_initial", _seconds(_MAX_SECONDS), _env_float),
    _key("jobs_backoff_max", "jobs.backoff_max", _seconds(_MAX_SECONDS), _env_float),
    _key("pre_commit_hooks", "hooks.pre_commit", _hooks, env=None),
    _key("post_commit_hooks", "hooks.post_commit", _hooks, env=None),
    _key("post_commit_timeout", "hooks.post_commit_timeout", _seconds(3600), _env_float),
    _key("check_finite", "hooks.check_finite", _bool, _env_bool),
    _key("best_metric", "hooks.best_metric", _text, optional=True),
    _key("best_mode", "hooks.best_mode", _choice(("min", "max"), str.lower)),
    _key("origin", "cluster.origin", _s3_url, flag="--origin", live=False, optional=True,
         flag_metavar="s3://BUCKET/PREFIX",
         flag_help="upload every change to this origin (a writer; docs/scale-out.md)"),
    _key("follow", "cluster.follow", _s3_url, flag="--follow", live=False, optional=True,
         flag_metavar="s3://BUCKET/PREFIX",
         flag_help="follow this origin: pull its versions, refuse local writes"),
    _key("feed", "cluster.feed", _nats_url, flag="--feed", live=False, optional=True,
         flag_metavar="nats://HOST:PORT",
         flag_help="NATS JetStream change feed beside the origin (a hint; heads are polled)"),
    _key("feed_creds", "cluster.feed_creds", _path, live=False, optional=True, is_path=True),
    _key("feed_bucket", "cluster.feed_bucket", _kv_bucket, live=False),
    _key("follow_poll_interval", "cluster.poll_interval", _SECONDS_HOUR, _env_float, live=False),
    _key("origin_part_size", "cluster.part_size", _PART_SIZE, _env_int, live=False),
    _key("origin_concurrency", "cluster.concurrency", _int_in(1, 256), _env_int, live=False),
)
_BY_PATH = {key.path: key for key in KEYS}
_TABLES = frozenset(path.split(".")[0] for path in _BY_PATH if "." in path)


@dataclass(frozen=True)
class Origin:
    """Where a setting's value came from."""

    kind: Literal["default", "file", "env", "flag"]
    name: str = ""  # the file, the variable or the flag

    def __str__(self) -> str:
        what = {"file": "config file", "env": "environment variable", "flag": "flag"}
        return "default" if self.kind == "default" else f"{what[self.kind]} {self.name}"


_DEFAULT = Origin("default")


def _shown(value: object) -> str:
    text = repr(os.fspath(value) if isinstance(value, Path) else value)
    return text if len(text) <= 120 else text[:117] + "..."


def _checked(key: Key, value: object, origin: Origin, base: Path | None = None) -> Any:
    """``value`` through ``key``'s check; a refusal names the origin, the key and the value."""
    try:
        checked = key.check(value)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{origin}: {key.path} = {_shown(value)}: {exc}") from None
    if key.is_path and base is not None and checked is not None and not checked.is_absolute():
        checked = base / checked
    return checked


def _unknown(path: str, origin: Origin) -> InvalidInputError:
    close = difflib.get_close_matches(path, list(_BY_PATH), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return InvalidInputError(f"{origin}: unknown key {path!r}{hint} (see docs/configuration.md)")


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's settings by field name, checked; unknown keys and bad TOML are refused."""
    origin = Origin("file", str(path))
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise InvalidInputError(f"{origin}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(f"{origin}: not valid TOML: {exc}") from None
    values = {}
    for name, value in _flatten(data, origin):
        key = _BY_PATH.get(name)
        if key is None:
            raise _unknown(name, origin)
        values[key.field] = _checked(key, value, origin, base=path.parent)
    return values


def _flatten(data: Mapping[str, Any], origin: Origin) -> Iterator[tuple[str, Any]]:
    for name, value in data.items():
        if name not in _TABLES:
            yield name, value
        elif not isinstance(value, Mapping):
            raise InvalidInputError(f"{origin}: {name} = {_shown(value)}: must be a table [{name}]")
        else:
            for sub, item in value.items():
                yield f"{name}.{sub}", item


# -- loading: the layers in order -----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LoadedConfig:
    """A configuration with the file it read and each setting's origin (``config show``)."""

    config: DaemonConfig
    file: Path | None
    origins: Mapping[str, Origin]

    def settings(self) -> list[dict[str, Any]]:
        """One row per key: key, value (JSON-ready), source, from, reload ("live"/"restart")."""
        return [
            {
                "key": key.path,
                "value": _json_value(getattr(self.config, key.field)),
                "source": self.origins.get(key.field, _DEFAULT).kind,
                "from": self.origins.get(key.field, _DEFAULT).name or None,
                "reload": "live" if key.live else "restart",
            }
            for key in KEYS
        ]

    def as_json(self) -> dict[str, Any]:
        rows = self.settings()
        return {
            "config_file": None if self.file is None else str(self.file),
            "settings": {row.pop("key"): row for row in rows},
        }


def _json_value(value: object) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return [
            item.as_json() if isinstance(item, HookSpec) else _json_value(item) for item in value
        ]
    return value


@dataclass(frozen=True, eq=False)
class ConfigLoader:
    """Reads the layers in order; kept by the config it made, to read them again on SIGHUP.

    ``file`` is ``--config`` (None: look in the environment); ``flags`` maps a
    field name to the flag and value given on the command line.
    """

    file: Path | None = None
    flags: Mapping[str, tuple[str, Any]] = field(default_factory=dict)

    def config_file(self, environ: Mapping[str, str]) -> Path | None:
        """--config, else $CTXSTORE_CONFIG, else $CONFIGURATION_DIRECTORY/ctxstore.toml if any."""
        if self.file is not None:
            return self.file.absolute()
        if environ.get("CTXSTORE_CONFIG"):
            return Path(environ["CTXSTORE_CONFIG"]).absolute()
        directory = environ.get("CONFIGURATION_DIRECTORY", "").split(":")[0]
        candidate = Path(directory) / CONFIG_FILE_NAME
        return candidate if directory and candidate.is_file() else None

    def load(self, environ: Mapping[str, str] | None = None) -> LoadedConfig:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        origins: dict[str, Origin] = {}
        path = self.config_file(environ)
        if path is not None:
            file_values = read_config_file(path)
            values |= file_values
            origins |= dict.fromkeys(file_values, Origin("file", str(path)))
        for key in KEYS:
            if key.env is not None and key.env in environ:
                origins[key.field] = Origin("env", key.env)
                values[key.field] = _from_env(key, environ[key.env], origins[key.field])
        by_field = {key.field: key for key in KEYS}
        for name, (flag, value) in self.flags.items():
            origins[name] = Origin("flag", flag)
            values[name] = _checked(by_field[name], value, origins[name])
        _check_backoff(values, origins)
        config = DaemonConfig(**values, loader=self)
        return LoadedConfig(config, path, MappingProxyType(origins))


def _from_env(key: Key, text: str, origin: Origin) -> Any:
    if not text.strip() and key.optional:
        return None
    try:
        value = key.from_env(text.strip())
    except InvalidInputError as exc:
        raise InvalidInputError(f"{origin}: {key.path} = {text!r}: {exc}") from None
    return _checked(key, value, origin)


def _check_backoff(values: Mapping[str, Any], origins: Mapping[str, Origin]) -> None:
    initial = values.get("jobs_backoff_initial", _BACKOFF_INITIAL)
    maximum = values.get("jobs_backoff_max", _BACKOFF_MAX)
    problem = _backoff_problem(initial, maximum)
    if problem:
        first = origins.get("jobs_backoff_initial", _DEFAULT)
        second = origins.get("jobs_backoff_max", _DEFAULT)
        raise InvalidInputError(f"{problem} (from {first} and {second})")


# -- SIGHUP ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload does: the config to run with now and what waits for a restart."""

    config: DaemonConfig
    #: keys whose new value takes effect now
    changed: tuple[str, ...]
    #: (key, running value, configured value) for settings bound at start
    pending: tuple[tuple[str, Any, Any], ...]
    #: how the admin token changed ("admin token rotated", ...), or None; never the token
    token_change: str | None = None

    def describe(self) -> str:
        """What takes effect now, for the log: the live keys and the token, or "nothing"."""
        parts = [*self.changed, *([self.token_change] if self.token_change else [])]
        return ", ".join(parts) or "nothing"


def token_change(running: DaemonConfig, fresh: DaemonConfig) -> str | None:
    """How the admin token differs from ``running``'s to ``fresh``'s, in words, or None.

    The token lives in the file ``token_file`` names, so a rotation changes no
    setting: it is told by comparing the tokens themselves. ``fresh``'s file is
    read (the reload needs it anyway); ``running``'s token is the one it read at
    start, never read again (the file now holds the new one). The words never
    include either token.
    """
    new = fresh.token()
    old = running._token  # the token read at start, not what the file holds now
    if old is None and running.token_file is not None:
        return None  # never read by the running daemon: nothing to compare with
    if old == new:
        return None
    if old is None:
        return "admin token required"
    if new is None:
        return "admin token removed"
    return "admin token rotated"


def plan_reload(running: DaemonConfig) -> ReloadPlan:
    """Read the configuration again and split it into live changes and restart-only ones.

    Raises InvalidInputError (naming source, key and value) when the new
    configuration or its token file is bad; the caller then keeps ``running``.
    """
    fresh = running.reload()
    token = token_change(running, fresh)
    keep: dict[str, Any] = {}
    changed: list[str] = []
    pending: list[tuple[str, Any, Any]] = []
    for key in KEYS:
        old, new = getattr(running, key.field), getattr(fresh, key.field)
        if old == new:
            continue
        if key.live:
            changed.append(key.path)
        else:
            pending.append((key.path, old, new))
            keep[key.field] = old
    config = fresh
    if keep:  # token_file is live, never kept: the copy runs with the token just read
        config = fresh.replace(**keep)
        object.__setattr__(config, "_token", fresh._token)
    return ReloadPlan(config, tuple(changed), tuple(pending), token)
