"""What this process costs in memory, as the kernel counts it: USS and PSS.

RSS counts every mapped page once per process, so N readers of one mmapped
context would each look like they hold a private copy. USS (pages only this
process maps) and PSS (each shared page divided by the number of processes
mapping it) add up across the fleet to the real cost. psutil reads them from
``/proc/<pid>/smaps_rollup``, which takes a millisecond for a small process and
about 0.2 s of CPU for one mapping a 1 GiB model: sample it with
:class:`MemorySampler` (every few heartbeats, less often when it is costly), never
on a hot path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import psutil

log = logging.getLogger("ctxstore.readers")

_warned = False
_warn_lock = threading.Lock()


def process_memory() -> tuple[int, int]:
    """This process's (USS, PSS) in bytes; (0, 0) when the platform or permissions refuse.

    The first refusal logs one warning per process; later ones are silent.
    """
    try:
        info = psutil.Process().memory_full_info()
    except (psutil.Error, OSError, NotImplementedError) as exc:
        _warn_once(exc)
        return 0, 0
    return int(getattr(info, "uss", 0)), int(getattr(info, "pss", 0))


def _warn_once(exc: BaseException) -> None:
    global _warned  # noqa: PLW0603 - one flag per process, by design
    with _warn_lock:
        if _warned:
            return
        _warned = True
    log.warning("cannot read USS/PSS of this process (%s); heartbeats will report 0", exc)


class MemorySampler:
    """Caches :func:`process_memory` for ``interval`` seconds (by ``clock``), or longer
    when a reading is expensive.

    Heartbeats go out every second; memory changes slowly and costs a
    millisecond to read, so it is sampled at most once per interval. The cost
    grows with what the process maps: the kernel walks every mapped page to sum
    PSS, about 0.2 s of CPU for a worker serving a 1 GiB model. So the gap after
    a reading is at least its CPU time (by ``cost_clock``, this thread's) divided
    by ``max_share``: by default readings take at most 0.1% of a core, and a
    worker swapping versions does not pay for one inside every swap.
    """

    def __init__(
        self,
        interval: float = 5.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        probe: Callable[[], tuple[int, int]] = process_memory,
        cost_clock: Callable[[], float] = time.thread_time,
        max_share: float = 0.001,
    ) -> None:
        self._interval = interval
        self._gap = interval
        self._clock = clock
        self._probe = probe
        self._cost_clock = cost_clock
        self._max_share = max_share
        self._value = (0, 0)
        self._taken_at: float | None = None

    def sample(self) -> tuple[int, int]:
        """(USS, PSS): a fresh reading when the last one is older than the gap."""
        now = self._clock()
        if self._taken_at is None or now - self._taken_at >= self._gap:
            spent = self._cost_clock()
            self._value = self._probe()
            spent = self._cost_clock() - spent
            self._gap = max(self._interval, spent / self._max_share)
            self._taken_at = now
        return self._value
