"""The registered scenarios, in the order a run measures them.

Adding one: write ``bench/<name>.py`` defining ``SCENARIO = Scenario(name,
title, method, run, plots)`` whose ``run`` returns figures with their
alternatives, floor and goals, add its plots to ``bench/plots.py``, import it
here and append it to ``SCENARIOS``. A scenario that cannot run yet is not
registered: it gets a line in ``PENDING`` (listed by ``--list`` and in
RESULTS.md) and never writes placeholder figures.

``scale`` runs last: it fills its stores with whatever is left of the run's
time budget, so it adapts to the time the others took.
"""

from __future__ import annotations

from . import commit, disturbed, fanout, hfserve, hotget, memory, metadata, scale, scaleout
from . import open as open_context
from .scenario import Scenario

SCENARIOS: tuple[Scenario, ...] = (
    open_context.SCENARIO,
    hotget.SCENARIO,
    metadata.SCENARIO,
    commit.SCENARIO,
    fanout.SCENARIO,
    disturbed.SCENARIO,
    memory.SCENARIO,
    hfserve.SCENARIO,
    scaleout.SCENARIO,
    scale.SCENARIO,
)

#: scenarios that are not registered yet, and what they wait for
PENDING: dict[str, str] = {}


def by_name() -> dict[str, Scenario]:
    return {s.name: s for s in SCENARIOS}
