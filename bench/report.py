"""RESULTS.md for people and results.json for tools, from one run's results."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .harness import Figure, Measurement, ScenarioResult, format_value
from .scenario import Scenario


@dataclass
class RunResult:
    """Everything one ``python -m bench`` run produced."""

    quick: bool
    command: str
    machine: Mapping[str, str]
    elapsed_s: float = 0.0
    scenarios: list[tuple[Scenario, ScenarioResult]] = field(default_factory=list)
    pending: Mapping[str, str] = field(default_factory=dict)


def write(run: RunResult, out: Path) -> tuple[Path, Path]:
    md, js = out / "RESULTS.md", out / "results.json"
    md.write_text(markdown(run))
    js.write_text(json.dumps(as_json(run), indent=1) + "\n")
    return md, js


# -- markdown ------------------------------------------------------------------------------


def markdown(run: RunResult) -> str:
    lines = [
        "# ctxstore benchmark results",
        "",
        _preamble(run),
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {_cell(v)} |" for k, v in run.machine.items()),
        "",
        "## Goals",
        "",
        *_goal_table(run),
        "",
    ]
    for scenario, result in run.scenarios:
        lines += _scenario_section(scenario, result)
    if run.pending:
        lines += ["## Not measured yet", ""]
        lines += [f"- **{name}**: {why}" for name, why in run.pending.items()]
        lines.append("")
    return "\n".join(lines)


def _preamble(run: RunResult) -> str:
    kind = (
        "a `--quick` run (tiny sizes, few repetitions: the figures only show that every "
        "scenario works)"
        if run.quick
        else "a full run"
    )
    return (
        f"Written by `{run.command}`, {kind}, in {run.elapsed_s:.0f} s. Every figure below "
        "was measured in this run on this machine, beside its alternatives and its floor. "
        "p50 is the median, p99 the 99th percentile by nearest rank, n the number of samples; "
        "warm-up calls are not counted, garbage collection is off while timing. "
        "Where a sample is a batch of calls, its time is divided by the batch size "
        "(the table says so)."
    )


def _goal_table(run: RunResult) -> list[str]:
    rows = [
        "| figure | ctxstore p50 | ctxstore p99 | compared with | its p50 | ratio | goal | "
        "from | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for _scenario, result in run.scenarios:
        for figure in result.figures:
            if figure.goal is not None:
                rows.append(_goal_row(figure))
    if len(rows) == 2:
        rows.append("| (no goal was measured in this run) | | | | | | | | |")
    return rows


def _goal_row(figure: Figure) -> str:
    goal = figure.goal
    assert goal is not None
    m, ref = figure.ctxstore, figure.reference_measurement
    verdict = figure.verdict()
    p50 = format_value(m, m.stats.median) if m else "-"
    p99 = format_value(m, m.stats.p99) if m else "-"
    ref_label = ref.label if ref else "-"
    ref_p50 = format_value(ref, ref.stats.median) if ref else "-"
    ratio = f"{m.stats.median / ref.stats.median:.2f}x" if m and ref and ref.stats.median else "-"
    if verdict is None:
        outcome = "not measured"
    else:
        outcome = f"{verdict.shown}: **{'met' if verdict.met else 'MISSED'}**"
    cells = (figure.title, p50, p99, ref_label, ref_p50, ratio, goal.text, goal.source, outcome)
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _scenario_section(scenario: Scenario, result: ScenarioResult) -> list[str]:
    lines = [f"## {scenario.title} (`{scenario.name}`, {result.elapsed_s:.0f} s)", ""]
    lines += [_dedent(scenario.method), ""]
    for figure in result.figures:
        lines += [f"### {figure.title}", ""]
        lines += _figure_table(figure)
        if figure.goal is not None:
            verdict = figure.verdict()
            outcome = (
                "not measured"
                if verdict is None
                else f"{verdict.shown}, {'met' if verdict.met else 'MISSED'}"
            )
            lines.append(f"Goal ({figure.goal.source}): {figure.goal.text}: {outcome}.")
        lines += [f"- {note}" for note in figure.notes]
        lines.append("")
    if result.notes:
        lines += ["Notes:", "", *(f"- {note}" for note in result.notes), ""]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in result.plots]
    if result.plots:
        lines.append("")
    return lines


def _figure_table(figure: Figure) -> list[str]:
    base = figure.ctxstore
    rows = [
        "| implementation | role | p50 | p99 | n | x ctxstore p50 |",
        "|---|---|---|---|---|---|",
    ]
    for m in figure.measurements:
        rows.append(_measurement_row(m, base))
    return [*rows, ""]


def _measurement_row(m: Measurement, base: Measurement | None) -> str:
    times = "-"
    if base is not None and base.stats.median and base.unit == m.unit:
        times = f"{m.stats.median / base.stats.median:.2f}x"
    n = f"{m.stats.n} x {m.stats.batch} calls" if m.stats.batch > 1 else str(m.stats.n)
    label = m.label if not m.note else f"{m.label} ({m.note})"
    cells = (
        f"**{label}**" if m.role == "ctxstore" else label,
        m.role,
        format_value(m, m.stats.median),
        format_value(m, m.stats.p99) if m.stats.n > 1 else "-",
        n,
        times,
    )
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _dedent(doc: str) -> str:
    """A module docstring as markdown: its first line bold, the rest as written."""
    lines = doc.strip().splitlines()
    if not lines:
        return ""
    return "\n".join([f"**{lines[0]}**", *lines[1:]])


# -- json ----------------------------------------------------------------------------------


def as_json(run: RunResult) -> dict[str, Any]:
    return {
        "quick": run.quick,
        "command": run.command,
        "elapsed_s": run.elapsed_s,
        "machine": dict(run.machine),
        "scenarios": {
            scenario.name: {
                "title": scenario.title,
                "elapsed_s": result.elapsed_s,
                "notes": result.notes,
                "plots": [Path(p).name for p in result.plots],
                "figures": [_figure_json(f) for f in result.figures],
            }
            for scenario, result in run.scenarios
        },
        "pending": dict(run.pending),
    }


def _figure_json(figure: Figure) -> dict[str, Any]:
    verdict = figure.verdict()
    return {
        "key": figure.key,
        "title": figure.title,
        "params": dict(figure.params),
        "reference": figure.reference,
        "goal": None
        if figure.goal is None
        else {"text": figure.goal.text, "source": figure.goal.source},
        "verdict": None if verdict is None else asdict(verdict),
        "notes": figure.notes,
        "measurements": [_measurement_json(m) for m in figure.measurements],
    }


def _measurement_json(m: Measurement) -> dict[str, Any]:
    return {
        "label": m.label,
        "role": m.role,
        "unit": m.unit,
        "x": m.x,
        "note": m.note,
        "stats": asdict(m.stats),
    }


def goal_outcomes(run: RunResult) -> Iterable[tuple[str, str]]:
    """(figure title, outcome) for every goal: the summary printed at the end of a run."""
    for _scenario, result in run.scenarios:
        for figure in result.figures:
            if figure.goal is None:
                continue
            verdict = figure.verdict()
            if verdict is None:
                yield figure.title, "not measured"
            else:
                yield (
                    figure.title,
                    f"{verdict.shown} ({figure.goal.text}): "
                    + ("met" if verdict.met else "MISSED"),
                )
