"""Run scenarios one after another, each in its own data directory; then report and plot."""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from . import machine, report
from .harness import ScenarioResult
from .progress import Progress
from .report import RunResult
from .scenario import FULL_RUN_BUDGET_S, QUICK_RUN_BUDGET_S, RunContext, Scenario

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench"
#: default parent of the data directory: inside the repo (same filesystem), ignored by git
DEFAULT_DATA_PARENT = REPO / "bench" / "out"


def run(
    scenarios: Sequence[Scenario],
    *,
    quick: bool,
    out: Path,
    data_parent: Path | None,
    progress: bool,
    command: str,
    pending: dict[str, str],
) -> RunResult:
    """Run ``scenarios``, write RESULTS.md, results.json and the plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    parent = data_parent or DEFAULT_DATA_PARENT
    parent.mkdir(parents=True, exist_ok=True)
    data = Path(tempfile.mkdtemp(prefix="ctxstore-bench-", dir=parent))
    started = time.perf_counter()
    deadline = time.monotonic() + (QUICK_RUN_BUDGET_S if quick else FULL_RUN_BUDGET_S)
    result = RunResult(
        quick=quick,
        command=command,
        machine=machine.describe(data, REPO),
        pending=pending,
    )
    try:
        with Progress(len(scenarios), enabled=progress) as bars:
            for scenario in scenarios:
                context = RunContext(quick, data / scenario.name, bars, deadline=deadline)
                result.scenarios.append((scenario, _run_one(scenario, context, out, bars)))
    finally:
        shutil.rmtree(data, ignore_errors=True)
    result.elapsed_s = time.perf_counter() - started
    result.machine = {**result.machine, "load average at end": machine.load_average()}
    report.write(result, out)
    return result


def _run_one(scenario: Scenario, context: RunContext, out: Path, bars: Progress) -> ScenarioResult:
    context.data_dir.mkdir()
    # The dirty pages the previous scenario left (scaleout writes some 5 GiB) are written
    # back now, untimed: left to the kernel, they made the next scenario's fsyncs wait.
    os.sync()
    if context.quick:
        # Every sample starts with a full collection (bench.harness), which walks every
        # object alive: with torch and matplotlib loaded that was 0.4 s a sample and most
        # of a quick run. What has survived until now (modules, caches) lives for the
        # whole run; frozen, it is no longer walked. Untimed, so no figure changes; the
        # full run keeps the method its RESULTS.md figures were measured with.
        gc.collect()
        gc.freeze()
    bars.begin(scenario.name)
    started = time.perf_counter()
    outcome = scenario.run(context)
    outcome.elapsed_s = time.perf_counter() - started
    for plot in scenario.plots:
        outcome.plots.append(str(plot(outcome, out)))
    bars.end(scenario.name)
    print(
        f"{scenario.name}: {len(outcome.figures)} figures in {outcome.elapsed_s:.1f} s",
        file=sys.stderr,
    )
    return outcome
