"""What ``ctxstore status`` and ``ctxstore watch`` show, built and printed without I/O.

Two halves, both pure so that tests need no daemon:

- the daemon's side turns its fleet snapshot and the store's slot listing into
  the rows of a :class:`~ctxstore.messages.Status` frame (:func:`reader_rows`,
  :func:`slot_rows`) and trims them to fit one frame (:func:`build_status`);
- the command line's side turns a Status into text tables
  (:func:`format_status`) and a version event into one line
  (:func:`format_event`).

Rows are plain JSON-like maps, so ``status --json`` prints what travelled. The
daemon leaves the asking connection out of them and out of the counts.
Wire maps only have string keys: per-slot maps in a reader row are keyed by
the slot number as a string.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol

import msgpack

from .errors import NotFoundError
from .messages import MAX_STATUS_ROWS, Status, encode_body
from .protocol import DEFAULT_MAX_FRAME_SIZE
from .store import PersistentStore
from .table import format_table

MIB: Final = float(1 << 20)
#: bytes a msgpack array header may take (0xdd + 4-byte length)
_ARRAY_HEADER: Final = 5
CLEAR_SCREEN: Final = "\x1b[H\x1b[2J"
_HELD_SHOWN: Final = 4


# -- the daemon's side ----------------------------------------------------------------------------


class PeerState(Protocol):
    """What status needs of one connected peer (the daemon's ``ReaderState`` has it)."""

    @property
    def session(self) -> int: ...
    @property
    def pid(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def uid(self) -> int: ...
    @property
    def connected_at(self) -> float: ...
    @property
    def last_seen(self) -> float: ...
    @property
    def held(self) -> Collection[tuple[int, int]]: ...
    @property
    def uss(self) -> int: ...
    @property
    def pss(self) -> int: ...
    @property
    def acks(self) -> int: ...


def reader_rows(
    peers: Iterable[PeerState], current: Mapping[int, int], now: float
) -> list[dict[str, Any]]:
    """One row per peer, by session: what it holds and how far behind ``current`` it is.

    ``held`` maps each slot to the newest version the peer holds, ``lag`` to
    ``current - held`` (0: up to date; negative after a rollback it has not
    followed yet), ``older`` to the older versions it still maps (which
    retention keeps for it).
    """
    rows = []
    for peer in sorted(peers, key=lambda p: p.session):
        versions: dict[int, list[int]] = {}
        for slot, version in sorted(peer.held):
            versions.setdefault(slot, []).append(version)
        rows.append(
            {
                "session": peer.session,
                "pid": peer.pid,
                "name": peer.name,
                "role": peer.role,
                "uid": peer.uid,
                "connected_s": round(max(0.0, now - peer.connected_at), 3),
                "last_seen_s": round(max(0.0, now - peer.last_seen), 3),
                "held": {str(slot): held[-1] for slot, held in versions.items()},
                "lag": {
                    str(slot): current[slot] - held[-1]
                    for slot, held in versions.items()
                    if slot in current
                },
                "older": {str(slot): held[:-1] for slot, held in versions.items() if len(held) > 1},
                "uss": peer.uss,
                "pss": peer.pss,
                "acks": peer.acks,
            }
        )
    return rows


def slot_rows(
    store: PersistentStore, limit: int = MAX_STATUS_ROWS
) -> tuple[list[dict[str, Any]], int]:
    """The first ``limit`` slots (by number) with their versions and aliases, and the total.

    ``aliases`` are the named ones; ``latest`` is the row's ``latest_version``.
    Blocking SQL: the daemon calls this off its event loop.
    """
    slots = store.list_slots()
    rows = []
    for info in slots[:limit]:
        try:
            aliases = store.get_aliases(info.slot)
        except NotFoundError:  # gone between the listing and now
            aliases = {}
        aliases.pop("latest", None)
        rows.append(
            {
                "slot": info.slot,
                "model_type": info.model_type,
                "current_version": info.current_version,
                "latest_version": info.latest_version,
                "n_versions": info.n_versions,
                "aliases": aliases,
            }
        )
    return rows, len(slots)


def build_status(
    request_id: int,
    daemon: Mapping[str, Any],
    readers: Sequence[Mapping[str, Any]],
    slots: Sequence[Mapping[str, Any]],
    *,
    slots_total: int | None = None,
    max_frame_size: int,
) -> Status:
    """The Status frame, trimmed to at most MAX_STATUS_ROWS rows per table and one frame.

    Readers are kept before slots. ``daemon`` gains ``readers_total``,
    ``readers_shown``, ``slots_total``, ``slots_shown`` and ``truncated``.
    The frame also fits the default bound, which clients read with, when the
    daemon's own bound is larger.
    """
    totals = {
        "readers_total": len(readers),
        "slots_total": len(slots) if slots_total is None else slots_total,
    }
    # Counts as large as they can get, so the real header is never longer than this one.
    header = {
        **daemon,
        **totals,
        "readers_shown": totals["readers_total"],
        "slots_shown": totals["slots_total"],
        "truncated": False,
    }
    base = len(encode_body(Status(request_id=request_id, daemon=header)))
    budget = min(max_frame_size, DEFAULT_MAX_FRAME_SIZE) - base - 2 * _ARRAY_HEADER
    n_readers, used = _rows_that_fit(readers[:MAX_STATUS_ROWS], budget)
    n_slots, _ = _rows_that_fit(slots[:MAX_STATUS_ROWS], budget - used)
    shown = {
        "readers_shown": n_readers,
        "slots_shown": n_slots,
        "truncated": n_readers < totals["readers_total"] or n_slots < totals["slots_total"],
    }
    return Status(
        request_id=request_id,
        daemon={**daemon, **totals, **shown},
        readers=tuple(readers[:n_readers]),
        slots=tuple(slots[:n_slots]),
    )


def _rows_that_fit(rows: Sequence[Mapping[str, Any]], budget: int) -> tuple[int, int]:
    """How many leading rows fit in ``budget`` bytes of msgpack, and the bytes they take."""
    used = 0
    for index, row in enumerate(rows):
        size = len(msgpack.packb(row, use_bin_type=True))
        if used + size > budget:
            return index, used
        used += size
    return len(rows), used


# -- the command line's side ----------------------------------------------------------------------


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
    if peers:
        lines.append(f"  also connected: {peers}")
    return "\n".join(lines)


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
    "PeerState",
    "VersionEventLike",
    "aliases_text",
    "build_status",
    "duration",
    "event_json",
    "format_event",
    "format_status",
    "held_text",
    "lag_text",
    "latency_ms",
    "mib",
    "reader_rows",
    "slot_rows",
]
