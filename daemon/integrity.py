"""Damage reports from readers: each one checked by hashing, confirmed damage marked and healed.

A reader that finds a version's files do not match their checksums reports it
(a ``damage_report`` frame) and goes on serving the newest intact version it
holds. A report moves nothing by itself: the daemon hashes the version again
(one check at a time, off the event loop), and only when its own hash confirms
the damage does it record the version damaged (``ctxstore verify`` and
``/metrics`` show it) and, if it is still current, move the slot's pointer back
to the newest intact version and announce that (:meth:`Committer.heal`).

Hostile or mistaken reports cost bounded work: a report names a version that
exists (a primary-key lookup on the loop; anything else is counted and
dropped), a version being checked or already marked is not checked again, and
a version found intact is checked again at most once per
``damage_recheck_interval``. So the set of pending checks is bounded by the
store's versions, and each version is hashed at most once per interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

from ctxstore.errors import CtxStoreError
from ctxstore.integrity import DAMAGED
from ctxstore.store import PersistentStore
from ctxstore.wire import DamageReport

from .committer import Committer

log = logging.getLogger("ctxstore.daemon")

#: what became of each report (the label of ctxstore_damage_reports)
OUTCOMES: Final = ("confirmed", "refuted", "known", "pending", "recent", "unknown_version")


def verify_current_versions(store: PersistentStore) -> list[tuple[int, int, int | None]]:
    """At start: hash each slot's current version not verified during this boot (after a
    reboot, or committed by a daemon killed before it recorded it), so the readers that
    adopt it next do not each hash it. A damaged one loses the pointer to the newest intact
    version. Returns (slot, damaged version, version now current or None) for each such.
    """
    moved: list[tuple[int, int, int | None]] = []
    for slot, version in store.unverified_current():
        try:
            problems = store.record_check(slot, version)
            if not problems:
                continue
            log.error("slot %d version %d (current) is damaged: %s",
                      slot, version, "; ".join(map(str, problems)))  # fmt: skip
            target = store.newest_intact(slot, version)
            if target is not None:
                store.rollback(slot, target)
                log.warning("slot %d: current pointer moved back from damaged version %d to %d",
                            slot, version, target)  # fmt: skip
            moved.append((slot, version, target))
        except CtxStoreError as exc:  # not recorded: readers hash it themselves
            log.warning("slot %d version %d not verified at start: %s", slot, version, exc)
    return moved


class DamageDesk:
    """Receives damage reports on the event loop and checks them in a worker thread."""

    def __init__(
        self,
        store: PersistentStore,
        committer: Committer,
        recheck_interval: Callable[[], float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._committer = committer
        self._recheck_interval = recheck_interval
        self._clock = clock
        #: reports by outcome, since start
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self._pending: set[tuple[int, int]] = set()
        #: version -> when the daemon's own hash found it intact after a report
        self._refuted: dict[tuple[int, int], float] = {}
        self._one_at_a_time = asyncio.Lock()

    def triage(self, report: DamageReport, who: str) -> tuple[int, int] | None:
        """Count ``report``; the version to check, or None when there is nothing to do.

        Runs on the event loop: one primary-key lookup, no hashing.
        """
        key = (report.slot, report.version)
        rows = self._store.read_query(
            "SELECT c.state FROM versions v LEFT JOIN version_checks c ON c.slot = v.slot "
            "AND c.version = v.version WHERE v.slot = ? AND v.version = ?",
            key,
        )
        outcome = None
        if not rows:
            outcome = "unknown_version"
        elif rows[0][0] == DAMAGED:
            outcome = "known"
        elif key in self._pending:
            outcome = "pending"
        else:
            now = self._clock()
            interval = self._recheck_interval()
            self._refuted = {k: t for k, t in self._refuted.items() if now - t < interval}
            if key in self._refuted:
                outcome = "recent"
        if outcome is not None:
            self.counts[outcome] += 1
            log.debug("damage report from %s on slot %d version %d: %s", who, *key, outcome)
            return None
        log.warning("%s reports slot %d version %d damaged: %s; checking it",
                    who, *key, report.detail or "no detail")  # fmt: skip
        self._pending.add(key)
        return key

    async def check(self, key: tuple[int, int]) -> None:
        """Hash the reported version; mark and heal it if the damage is real."""
        slot, version = key
        try:
            async with self._one_at_a_time:
                problems, _ = await asyncio.to_thread(self._store.check_version, slot, version)
                if not problems:
                    self.counts["refuted"] += 1
                    self._refuted[key] = self._clock()
                    log.warning("slot %d version %d: the daemon's hash finds it intact; the "
                                "report is not confirmed", slot, version)  # fmt: skip
                    return
                detail = "; ".join(map(str, problems))
                await asyncio.to_thread(self._store.mark_damaged, slot, version, detail)
                self.counts["confirmed"] += 1
                log.error("slot %d version %d is damaged (confirmed): %s", slot, version, detail)
            served = await self._committer.heal(slot, version)
            if served is not None:
                log.warning("slot %d now serves version %d", slot, served)
        except CtxStoreError as exc:
            log.error("slot %d version %d: checking a damage report failed: %s",
                      slot, version, exc)  # fmt: skip
        finally:
            self._pending.discard(key)
