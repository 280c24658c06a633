"""What a scenario is, and what the runner hands it.

A scenario module defines one :class:`Scenario`: a name (for ``--only``), a
title and a method paragraph for RESULTS.md, a ``run`` function that returns a
:class:`~bench.harness.ScenarioResult`, and the plots drawn from that result.
``bench.scenarios`` lists the registered ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import Budget, Candidate, Figure, Role, ScenarioResult, Stats, compare
from .progress import Progress

#: renders one PNG from a scenario's result into a directory; returns its path
PlotFn = Callable[[ScenarioResult, Path], Path]

#: --quick shrinks every time budget by this factor (sizes are chosen by each scenario)
QUICK_TIME_SCALE = 0.02
#: the issue's limit for a full run is 15 minutes on 2 cores; the runner aims below it
FULL_RUN_BUDGET_S = 14 * 60
QUICK_RUN_BUDGET_S = 50
#: interleaved rounds per comparison (see bench.harness.compare)
FULL_ROUNDS = 5
QUICK_ROUNDS = 2


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    title: str
    method: str
    run: Callable[[RunContext], ScenarioResult]
    plots: tuple[PlotFn, ...] = ()


@dataclass
class RunContext:
    """The run's settings as a scenario sees them, and its private data directory."""

    quick: bool
    data_dir: Path
    progress: Progress
    seed: int = 20240601
    #: time.monotonic() by which the whole run should be done (scenarios that grow, shrink)
    deadline: float = math.inf

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def budget(
        self,
        seconds: float,
        min_reps: int,
        *,
        max_reps: int = 100_000,
        warmup: int = 3,
        rewarm: int = 1,
    ) -> Budget:
        """A time budget for one implementation, shrunk for --quick."""
        if self.quick:
            return Budget(
                seconds * QUICK_TIME_SCALE,
                min(min_reps, 3),
                min(max_reps, 200),
                min(warmup, 1),
                min(rewarm, 1),
            )
        return Budget(seconds, min_reps, max_reps, warmup, rewarm)

    @property
    def rounds(self) -> int:
        return QUICK_ROUNDS if self.quick else FULL_ROUNDS

    def compare(
        self,
        what: str,
        candidates: Sequence[Candidate[Any]],
        budget: Budget,
        *,
        rounds: int | None = None,
    ) -> dict[str, Stats]:
        """:func:`bench.harness.compare` in interleaved rounds, then one progress step."""
        stats = compare(candidates, budget, rounds=rounds or self.rounds)
        self.progress.step(what)
        return stats

    def measure_figure(
        self,
        figure: Figure,
        entries: Sequence[tuple[Role, Candidate[Any]]],
        budget: Budget,
        *,
        rounds: int | None = None,
    ) -> Figure:
        """Compare the candidates and add each one's result to ``figure`` under its role."""
        stats = self.compare(figure.title, [c for _, c in entries], budget, rounds=rounds)
        for role, candidate in entries:
            figure.add(candidate.label, role, stats[candidate.label])
        return figure
