"""What ``ctxstore status`` and ``ctxstore watch`` print, built without I/O.

A :class:`~ctxstore.wire.Status` frame (its rows built by the daemon,
``ctxstore.daemon.status_rows``) becomes text tables (:func:`format_status`);
a version event becomes one line (:func:`format_event`) or one JSON object
(:func:`event_json`). Pure, so that tests need no daemon.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol

from ctxstore.wire import Status

from .table import format_table

MIB: Final = float(1 << 20)
CLEAR_SCREEN: Final = "\x1b[H\x1b[2J"
_HELD_SHOWN: Final = 4


def format_status(status: Status) -> str:
    """The daemon line, the readers table and the slots table, as ``ctxstore status`` prints.

    Peers whose role is not ``reader`` (publishers, admin tools) get one line,
    not a row.
    """
    daemon = status.daemon
    readers = [row for row in status.readers if row.get("role") == "reader"]
    others = [row for row in status.readers if row.get("role") != "reader"]
    parts = [_daemon_lines(daemon, others), _readers_block(daemon, readers)]
    parts.append(_slots_block(daemon, status.slots))
    return "\n\n".join(parts)


def _daemon_lines(daemon: Mapping[str, Any], others: Sequence[Mapping[str, Any]]) -> str:
    peers = ", ".join(f"{row.get('name', '?')} ({row.get('role', '?')})" for row in others)
    lines = [
        f"daemon pid {daemon.get('pid', '?')}, up {duration(daemon.get('uptime_s'))}, "
        f"{_counted(daemon.get('commits', '?'), 'commit')} this run, "
        f"{_counted(daemon.get('subscribers', '?'), 'connection')}",
        f"  store   {daemon.get('store', '?')}",
        f"  socket  {daemon.get('socket', '?')}",
        f"  table   {daemon.get('version_table', '?')}",
    ]
    cluster = daemon.get("cluster")
    if isinstance(cluster, Mapping):
        lines += _cluster_lines(cluster)
    if peers:
        lines.append(f"  also connected: {peers}")
    return "\n".join(lines)


def _cluster_lines(cluster: Mapping[str, Any]) -> list[str]:
    """The scale-out role (docs/scale-out.md): origin, feed, what moved, what is pending."""
    connected = cluster.get("feed_connected")
    feed = cluster.get("feed") or "none (polling only)"
    if connected is not None:
        feed = f"{feed} ({'connected' if connected else 'DISCONNECTED: polling meanwhile'})"
    role = cluster.get("role", "?")
    lines = [
        f"  {role:7} {'of' if role == 'writer' else 'from'} {cluster.get('origin', '?')}",
        f"  feed    {feed}",
    ]
    if role == "writer":
        heads = _pairs(cluster.get("heads"))
        lines.append(
            f"  origin  heads {heads}; outbox {cluster.get('outbox', '?')} pending; uploaded "
            f"{mib(cluster.get('bytes_uploaded'))} MiB in {cluster.get('objects_uploaded', '?')}"
            " objects"
        )
    else:
        lines.append(
            f"  applied {_pairs(cluster.get('applied'))}; downloaded "
            f"{mib(cluster.get('bytes_downloaded'))} MiB, {cluster.get('refused', '?')} refused"
        )
    if cluster.get("last_error"):
        lines.append(f"  last origin error: {cluster['last_error']}")
    return lines


def _pairs(value: object) -> str:
    """``{"7": 12}`` as ``7:v12`` (slot: version), or ``none``."""
    if not isinstance(value, Mapping) or not value:
        return "none"
    return ", ".join(f"{slot}:v{version}" for slot, version in value.items())


def _counted(value: object, noun: str) -> str:
    """``1 commit``, ``3 commits``, ``? commits``."""
    return f"{value} {noun}" if value == 1 and not isinstance(value, bool) else f"{value} {noun}s"


def _readers_block(daemon: Mapping[str, Any], readers: Sequence[Mapping[str, Any]]) -> str:
    pss = sum(_number(row.get("pss")) for row in readers)
    uss = sum(_number(row.get("uss")) for row in readers)
    title = (
        f"readers: {len(readers)}, total PSS {mib(pss)} MiB, total USS {mib(uss)} MiB"
        f"{_shown_note(daemon, 'readers')}"
    )
    if not readers:
        return title
    rows = [
        (
            row.get("pid"),
            row.get("name"),
            held_text(row.get("held"), row.get("older")),
            lag_text(row.get("lag")),
            mib(row.get("uss")),
            mib(row.get("pss")),
            f"{duration(row.get('last_seen_s'))} ago",
        )
        for row in readers
    ]
    table = format_table(("pid", "name", "held", "lag", "USS MiB", "PSS MiB", "seen"), rows)
    return f"{title}\n{table}"


def _slots_block(daemon: Mapping[str, Any], slots: Sequence[Mapping[str, Any]]) -> str:
    title = f"slots: {daemon.get('slots_total', len(slots))}{_shown_note(daemon, 'slots')}"
    if not slots:
        return title
    rows = [
        (
            row.get("slot"),
            row.get("model_type"),
            row.get("current_version"),
            row.get("latest_version"),
            row.get("n_versions"),
            aliases_text(row.get("aliases")),
        )
        for row in slots
    ]
    table = format_table(("slot", "type", "current", "latest", "versions", "aliases"), rows)
    return f"{title}\n{table}"


def _shown_note(daemon: Mapping[str, Any], table: str) -> str:
    total, shown = daemon.get(f"{table}_total"), daemon.get(f"{table}_shown")
    if isinstance(total, int) and isinstance(shown, int) and shown < total:
        return f" (showing the first {shown}: truncated to fit one status frame)"
    return ""


def held_text(held: object, older: object = None) -> str:
    """``3:v2 5:v1(+1)``: newest version held per slot, and how many older ones it keeps."""
    if not isinstance(held, Mapping) or not held:
        return "-"
    extra = older if isinstance(older, Mapping) else {}
    items = [
        f"{slot}:v{version}" + (f"(+{len(extra[slot])})" if extra.get(slot) else "")
        for slot, version in sorted(held.items(), key=_slot_key)
    ]
    more = len(items) - _HELD_SHOWN
    return " ".join(items[:_HELD_SHOWN]) + (f" +{more} more" if more > 0 else "")


def lag_text(lag: object) -> str:
    """The reader's largest lag over the slots it holds (0: every slot current)."""
    if not isinstance(lag, Mapping) or not lag:
        return "-"
    values = [value for value in lag.values() if isinstance(value, int)]
    if not values:
        return "-"
    return str(max(values, key=abs))


def aliases_text(aliases: object) -> str:
    if not isinstance(aliases, Mapping) or not aliases:
        return "-"
    return " ".join(f"{name}={version}" for name, version in sorted(aliases.items()))


def mib(value: object) -> str:
    return f"{_number(value) / MIB:.1f}"


def duration(seconds: object) -> str:
    """``45s``, ``12m03s``, ``3h04m``, ``2d03h``; ``?`` for anything but a number."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return "?"
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    total = int(seconds)
    minutes, secs = divmod(total, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value)


def _slot_key(item: tuple[Any, Any]) -> tuple[int, str]:
    key = str(item[0])
    return (int(key), key) if key.isdigit() else (-1, key)


class VersionEventLike(Protocol):
    """What one line of ``ctxstore watch`` shows (``ctxstore.readers.VersionEvent`` has it)."""

    @property
    def slot(self) -> int: ...
    @property
    def version(self) -> int: ...
    @property
    def source(self) -> str: ...
    @property
    def committed_at(self) -> float | None: ...
    @property
    def model_type(self) -> str | None: ...
    @property
    def aliases(self) -> Mapping[str, int]: ...


def latency_ms(event: VersionEventLike, received_at: float) -> float | None:
    """Commit to receipt, in milliseconds (daemon and reader share the host's clock)."""
    if event.committed_at is None:
        return None
    return (received_at - event.committed_at) * 1000.0


def format_event(event: VersionEventLike, received_at: float) -> str:
    """``12:00:00.123  announce  slot 3  version 2  type llm  aliases best=2  latency 0.84 ms``.

    ``source`` is ``announce`` for a commit (or rollback) as it happens and
    ``current`` for the state reported when the watch starts or reconnects.
    """
    clock = time.strftime("%H:%M:%S", time.localtime(received_at))
    millis = int((received_at % 1) * 1000)
    latency = latency_ms(event, received_at)
    kind = "announce" if event.source == "announce" else "current"
    return (
        f"{clock}.{millis:03d}  {kind:<8}  slot {event.slot}  version {event.version}  "
        f"type {event.model_type or '-'}  aliases {aliases_text(event.aliases)}  "
        f"latency {'-' if latency is None else f'{latency:.2f} ms'}"
    )


def event_json(event: VersionEventLike, received_at: float) -> dict[str, Any]:
    """The same line as a JSON-ready map (``ctxstore watch --json``)."""
    return {
        "received_at": received_at,
        "source": "announce" if event.source == "announce" else "current",
        "slot": event.slot,
        "version": event.version,
        "model_type": event.model_type,
        "aliases": dict(event.aliases),
        "committed_at": event.committed_at,
        "latency_ms": latency_ms(event, received_at),
    }


__all__ = [
    "CLEAR_SCREEN",
    "VersionEventLike",
    "aliases_text",
    "duration",
    "event_json",
    "format_event",
    "format_status",
    "held_text",
    "lag_text",
    "latency_ms",
    "mib",
]
