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

from . import commit, disturbed, fanout, hfserve, hotget, memory, metadata, scale
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
    scale.SCENARIO,
)

#: scenarios that are not registered yet, and what they wait for
PENDING: dict[str, str] = {
    "scaleout": "issue 20: a 1 GiB context to 4 followers over SeaweedFS beside each follower "
    "downloading the same files with boto3 (the anchor) and a local copy (the floor); bytes "
    "moved per follower for 1 changed tensor of 10; commit-to-all-followers-serving p50/p99 "
    "for 1, 4 and 8 followers. The origin, followers and their servers exist "
    "(ctxstore.origin, docs/scale-out.md); this scenario is not written yet",
}


def by_name() -> dict[str, Scenario]:
    return {s.name: s for s in SCENARIOS}
