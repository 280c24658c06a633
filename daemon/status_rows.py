"""The daemon's answer to a status request: its peers and slots as rows, trimmed to one frame.

Pure, so that tests need no daemon: the fleet snapshot and the store's slot
listing become the rows of a :class:`~ctxstore.wire.Status` frame
(:func:`reader_rows`, :func:`slot_rows`), trimmed to fit one frame
(:func:`build_status`). ``/metrics`` and ``/readers`` use the same reader rows.
The command line prints them (``ctxstore.cli.status_text``).

Rows are plain JSON-like maps, so ``status --json`` prints what travelled. The
daemon leaves the asking connection out of them and out of the counts.
Wire maps only have string keys: per-slot maps in a reader row are keyed by
the slot number as a string.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol

import msgpack

from ctxstore.errors import NotFoundError
from ctxstore.store import PersistentStore
from ctxstore.wire import DEFAULT_MAX_FRAME_SIZE, MAX_STATUS_ROWS, Status, encode_body

#: bytes a msgpack array header may take (0xdd + 4-byte length)
_ARRAY_HEADER: Final = 5


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


__all__ = ["PeerState", "build_status", "reader_rows", "slot_rows"]
