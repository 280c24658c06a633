"""The one table of the daemon's settings: ``KEYS``, a :class:`Key` per setting.

Each key gives its field in :class:`~.settings.DaemonConfig`, its key in the
file, its ``CTXSTORE_*`` variable, its flag (and how the command line parses
it: ``ctxstore daemon`` makes its flags from this table), its check
(:mod:`.checks`) and whether a reload applies it live. docs/configuration.md
lists them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ctxstore.checks import optional as _optional
from ctxstore.versiontable import MAX_CAPACITY, MIN_CAPACITY
from ctxstore.wire import MAX_FRAME_SIZE, MIN_FRAME_SIZE

from ..logs import LOG_FORMATS, LOG_LEVELS
from .checks import (
    Check,
    _bool,
    _choice,
    _env_bool,
    _env_float,
    _env_ids,
    _env_int,
    _env_paths,
    _fraction,
    _hooks,
    _http,
    _ids,
    _int_in,
    _kv_bucket,
    _nats_url,
    _path,
    _power_of_two,
    _roots,
    _s3_url,
    _seconds,
    _seconds_or_zero,
    _text,
)

_MAX_SECONDS = 86400.0


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


# one setting a line or two, as docs/configuration.md lists them
# fmt: off
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
    _key("announce_record_bytes", "announce_record_bytes", _int_in(0, 1 << 30), _env_int),
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
    _key("follow_poll_jitter", "cluster.poll_jitter", _fraction(1.0), _env_float, live=False),
    _key("follow_poll_backoff_max", "cluster.poll_backoff_max", _SECONDS_HOUR, _env_float,
         live=False),
    _key("follow_pull_jitter", "cluster.pull_jitter", _seconds_or_zero(600), _env_float,
         live=False),
    _key("origin_part_size", "cluster.part_size", _PART_SIZE, _env_int, live=False),
    _key("origin_concurrency", "cluster.concurrency", _int_in(1, 256), _env_int, live=False),
    _key("origin_upload_concurrency", "cluster.upload_concurrency", _int_in(1, 64), _env_int,
         live=False),
)
# fmt: on
_BY_PATH = {key.path: key for key in KEYS}
_TABLES = frozenset(path.split(".")[0] for path in _BY_PATH if "." in path)
