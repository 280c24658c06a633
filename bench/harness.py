"""Timing, statistics and the records every scenario fills.

A scenario measures *figures*: one operation under one set of parameters
(open 300 tensors with a warm page cache, commit 1 MiB, ...). Each figure holds
one :class:`Measurement` per implementation, ctxstore beside its alternatives
and its physical floor, all taken in the same run, and optionally a
:class:`Goal` from the issues that the ctxstore measurement is judged against.

Timing rules: ``time.perf_counter_ns``, warm-up calls first, garbage collection
off while timing (as ``timeit`` does), and as many repetitions as fit a time
budget (but never fewer than ``min_reps``). Each repetition times one call, or
``batch`` calls in a row for sub-microsecond operations, where the timer's own
cost (tens of ns) would otherwise dominate. Work that is not part of the
operation (building inputs, dropping caches, releasing results) runs in
``before`` / ``after`` hooks, outside the timed region.

Implementations compared in one figure are measured in interleaved rounds
(:func:`compare`): round 1 times each of them for a share of the budget, then
round 2, and so on, each round in a rotated order. A shared machine drifts
(other processes, CPU frequency, the disk's queue); interleaving spreads that
drift over every implementation instead of charging it to whichever ran last.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

T = TypeVar("T")

Role = Literal["ctxstore", "variant", "alternative", "floor"]
Unit = Literal["ns", "bytes"]
ParamValue = int | float | str


@dataclass(frozen=True, slots=True)
class Stats:
    """Summary of the samples of one measurement (ns per operation, or bytes)."""

    n: int
    median: float
    p99: float
    minimum: float
    mean: float
    batch: int = 1

    @classmethod
    def of(cls, samples: Sequence[float], batch: int = 1) -> Stats:
        if not samples:
            raise ValueError("no samples")
        ordered = sorted(samples)
        return cls(
            n=len(ordered),
            median=statistics.median(ordered),
            p99=nearest_rank(ordered, 0.99),
            minimum=ordered[0],
            mean=statistics.fmean(ordered),
            batch=batch,
        )

    @classmethod
    def single(cls, value: float) -> Stats:
        """A quantity measured once (bytes on disk, a count): every statistic is the value."""
        return cls(n=1, median=value, p99=value, minimum=value, mean=value)


def nearest_rank(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted samples by the nearest-rank method (no interpolation)."""
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class Budget:
    """How long to measure one implementation: repetitions until ``seconds`` have passed."""

    seconds: float
    min_reps: int
    max_reps: int = 100_000
    warmup: int = 3
    #: untimed calls before each later round of an interleaved comparison
    rewarm: int = 1


@dataclass(frozen=True, slots=True)
class Candidate(Generic[T]):
    """One implementation to time: the operation and its untimed hooks.

    ``before`` runs before each repetition and ``after`` receives the last
    result of each repetition; neither is timed, both count against the budget.
    """

    label: str
    op: Callable[[], T]
    before: Callable[[], object] | None = None
    after: Callable[[T], object] | None = None
    batch: int = 1


def measure(
    op: Callable[[], T],
    budget: Budget,
    *,
    before: Callable[[], object] | None = None,
    after: Callable[[T], object] | None = None,
    batch: int = 1,
) -> Stats:
    """Time ``op`` repeatedly; returns the statistics of ns per call."""
    candidate = Candidate("op", op, before, after, batch)
    return compare([candidate], budget, rounds=1)["op"]


def compare(
    candidates: Sequence[Candidate[Any]], budget: Budget, *, rounds: int
) -> dict[str, Stats]:
    """Time every candidate with ``budget`` each, in ``rounds`` interleaved rounds.

    Each round gives each candidate ``1/rounds`` of the budget's seconds and
    repetitions; ``budget.warmup`` untimed calls come before its first round and
    ``budget.rewarm`` before each later one (so no candidate starts a round on
    the caches another one left).
    """
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    for c in candidates:
        if c.batch < 1:
            raise ValueError("batch must be at least 1")
    share = Budget(
        budget.seconds / rounds,
        math.ceil(budget.min_reps / rounds),
        max(1, budget.max_reps // rounds),
        0,
        0,
    )
    samples: dict[str, list[float]] = {c.label: [] for c in candidates}
    for r in range(rounds):
        order = list(candidates[r % len(candidates) :]) + list(candidates[: r % len(candidates)])
        for c in order:
            for _ in range(budget.warmup if r == 0 else budget.rewarm):
                _repeat_once(c.op, c.before, c.after, c.batch)
            samples[c.label] += _sample(c, share)
    return {c.label: Stats.of(samples[c.label], c.batch) for c in candidates}


def _sample(c: Candidate[Any], budget: Budget) -> list[float]:
    samples: list[float] = []
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    deadline = time.perf_counter_ns() + int(budget.seconds * 1e9)
    try:
        while len(samples) < budget.max_reps:
            samples.append(_repeat_once(c.op, c.before, c.after, c.batch) / c.batch)
            if len(samples) >= budget.min_reps and time.perf_counter_ns() >= deadline:
                break
    finally:
        if was_enabled:
            gc.enable()
    return samples


def _repeat_once(
    op: Callable[[], T],
    before: Callable[[], object] | None,
    after: Callable[[T], object] | None,
    batch: int,
) -> int:
    if before is not None:
        before()
    if batch == 1:
        t0 = time.perf_counter_ns()
        result = op()
        elapsed = time.perf_counter_ns() - t0
    else:
        t0 = time.perf_counter_ns()
        for _ in range(batch - 1):
            op()
        result = op()
        elapsed = time.perf_counter_ns() - t0
    if after is not None:
        after(result)
    del result
    return elapsed


def timer_overhead_ns(samples: int = 10_000) -> float:
    """Median cost of one ``perf_counter_ns`` pair: what a single-call sample includes."""
    clock = time.perf_counter_ns
    costs = []
    for _ in range(samples):
        t0 = clock()
        costs.append(clock() - t0)
    return float(statistics.median(costs))


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Measurement:
    """One implementation's result for a figure."""

    label: str
    role: Role
    stats: Stats
    unit: Unit = "ns"
    note: str = ""
    #: where this measurement sits on a scaling figure's axis (versions, slots), if it does
    x: float | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """A goal judged: the value compared, shown for humans, and whether it holds."""

    shown: str
    met: bool
    ratio: float | None = None


class Goal(Protocol):
    """A target from the issues (or the harness) that a figure's ctxstore result must meet."""

    @property
    def text(self) -> str: ...

    @property
    def source(self) -> str: ...

    def judge(self, figure: Figure) -> Verdict | None: ...


@dataclass
class Figure:
    """One operation under one set of parameters, measured for every implementation.

    ``reference`` names the measurement the summary compares ctxstore with (its
    floor, or the alternative the issue quotes); ``params`` feed the plots.
    """

    key: str
    title: str
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    measurements: list[Measurement] = field(default_factory=list)
    goal: Goal | None = None
    reference: str | None = None
    notes: list[str] = field(default_factory=list)

    def add(
        self,
        label: str,
        role: Role,
        stats: Stats,
        *,
        unit: Unit = "ns",
        note: str = "",
        x: float | None = None,
    ) -> None:
        self.measurements.append(Measurement(label, role, stats, unit, note, x))

    def get(self, label: str) -> Measurement | None:
        return next((m for m in self.measurements if m.label == label), None)

    @property
    def ctxstore(self) -> Measurement | None:
        """The measurement goals are judged on: the first one with role ``ctxstore``."""
        return next((m for m in self.measurements if m.role == "ctxstore"), None)

    @property
    def reference_measurement(self) -> Measurement | None:
        return None if self.reference is None else self.get(self.reference)

    def verdict(self) -> Verdict | None:
        return None if self.goal is None else self.goal.judge(self)


@dataclass
class ScenarioResult:
    """What one scenario produced: its figures, notes on method, and extra plot inputs."""

    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    plots: list[str] = field(default_factory=list)

    def figure(self, key: str) -> Figure | None:
        return next((f for f in self.figures if f.key == key), None)


# -- goals -------------------------------------------------------------------------------


def _stat(m: Measurement, stat: str) -> float:
    return m.stats.p99 if stat == "p99" else m.stats.median


@dataclass(frozen=True, slots=True)
class AtMost:
    """ctxstore's median (or p99) at most ``limit_ns``."""

    limit_ns: float
    source: str
    stat: Literal["median", "p99"] = "median"

    @property
    def text(self) -> str:
        return f"{'p50' if self.stat == 'median' else 'p99'} <= {format_ns(self.limit_ns)}"

    def judge(self, figure: Figure) -> Verdict | None:
        m = figure.ctxstore
        if m is None:
            return None
        value = _stat(m, self.stat)
        return Verdict(format_ns(value), value <= self.limit_ns, value / self.limit_ns)


@dataclass(frozen=True, slots=True)
class RatioAtMost:
    """ctxstore's median (or p99) at most ``factor`` times the ``reference`` measurement's."""

    reference: str
    factor: float
    source: str
    stat: Literal["median", "p99"] = "median"

    @property
    def text(self) -> str:
        which = "" if self.stat == "median" else "p99 "
        return f"{which}<= {self.factor:g}x {self.reference}"

    def judge(self, figure: Figure) -> Verdict | None:
        m, ref = figure.ctxstore, figure.get(self.reference)
        if m is None or ref is None:
            return None
        ratio = _stat(m, self.stat) / _stat(ref, self.stat)
        which = "" if self.stat == "median" else "p99 "
        return Verdict(f"{which}{ratio:.2f}x", ratio <= self.factor, ratio)


@dataclass(frozen=True, slots=True)
class AllOf:
    """Every one of ``goals`` (an issue may set a p99 limit and a ratio on one figure)."""

    goals: tuple[Goal, ...]
    source: str

    @property
    def text(self) -> str:
        return " and ".join(g.text for g in self.goals)

    def judge(self, figure: Figure) -> Verdict | None:
        verdicts = [g.judge(figure) for g in self.goals]
        if any(v is None for v in verdicts):
            return None
        shown = "; ".join(v.shown for v in verdicts if v is not None)
        return Verdict(shown, all(v.met for v in verdicts if v is not None))


@dataclass(frozen=True, slots=True)
class ThroughputAtLeast:
    """ctxstore moves ``nbytes`` at least ``factor`` times as fast as ``reference`` (medians)."""

    reference: str
    factor: float
    source: str

    @property
    def text(self) -> str:
        return f"bandwidth >= {self.factor:g}x {self.reference}"

    def judge(self, figure: Figure) -> Verdict | None:
        m, ref = figure.ctxstore, figure.get(self.reference)
        if m is None or ref is None:
            return None
        ratio = ref.stats.median / m.stats.median
        return Verdict(f"{ratio:.2f}x", ratio >= self.factor, ratio)


@dataclass(frozen=True, slots=True)
class Flat:
    """The ctxstore measurements of a scaling figure: largest-N median / smallest-N median."""

    factor: float
    source: str

    @property
    def text(self) -> str:
        return f"largest/smallest <= {self.factor:g}x"

    def judge(self, figure: Figure) -> Verdict | None:
        series = [m for m in figure.measurements if m.role == "ctxstore"]
        if len(series) < 2:
            return None
        ratio = series[-1].stats.median / series[0].stats.median
        return Verdict(f"{ratio:.2f}x", ratio <= self.factor, ratio)


@dataclass(frozen=True, slots=True)
class FractionAtMost:
    """ctxstore's quantity (e.g. bytes added) at most ``factor`` times the reference's."""

    reference: str
    factor: float
    source: str

    @property
    def text(self) -> str:
        return f"<= {self.factor:g}x {self.reference}"

    def judge(self, figure: Figure) -> Verdict | None:
        m, ref = figure.ctxstore, figure.get(self.reference)
        if m is None or ref is None or ref.stats.median == 0:
            return None
        ratio = m.stats.median / ref.stats.median
        return Verdict(f"{ratio:.3f}x", ratio <= self.factor, ratio)


# -- formatting ----------------------------------------------------------------------------


def format_ns(ns: float) -> str:
    """A duration with a unit that keeps three significant digits."""
    if ns < 1_000:
        return f"{ns:.0f} ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:.3g} us"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.3g} ms"
    return f"{ns / 1e9:.3g} s"


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def format_value(m: Measurement, stat: float) -> str:
    return format_bytes(stat) if m.unit == "bytes" else format_ns(stat)
