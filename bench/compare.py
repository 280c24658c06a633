"""``python -m bench.compare OLD NEW``: the ctxstore p50 of each figure in two runs, side by side.

A full run replaces RESULTS.md; this keeps the previous run's figures readable beside the new
ones (a Markdown table on stdout), so a change can be judged against the run before it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, NamedTuple

from bench.harness import format_bytes, format_ns


class P50(NamedTuple):
    """One figure of one run: its ctxstore p50 and, where it names one, its reference's."""

    title: str
    value: float
    unit: str
    reference: float | None


def ctxstore_p50s(results: dict[str, Any]) -> dict[str, P50]:
    """Figure key -> its P50, in run order."""
    found: dict[str, P50] = {}
    for scenario in results["scenarios"].values():
        for figure in scenario["figures"]:
            medians = {m["label"]: m["stats"]["median"] for m in figure["measurements"]
                       if m["stats"]["n"]}  # fmt: skip
            ours = [m for m in figure["measurements"] if m["role"] == "ctxstore"]
            if ours and ours[0]["label"] in medians:
                reference = medians.get(figure.get("reference"))
                value = medians[ours[0]["label"]]
                found[figure["key"]] = P50(figure["title"], value, ours[0]["unit"], reference)
    return found


def _against_reference(p50: P50) -> str:
    return f"{p50.value / p50.reference:.2f}x" if p50.reference else "-"


def table(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The Markdown table: figures in both runs, the new run's order. Each run's ratio to the
    figure's reference (its alternative or floor, measured in the same run) shows what a
    slower or faster machine moved alike."""
    before, after = ctxstore_p50s(old), ctxstore_p50s(new)
    a, b = old["machine"]["ctxstore commit"], new["machine"]["ctxstore commit"]
    rows = [
        f"| figure | {a} p50 | {b} p50 | new / old | x reference, {a} | x reference, {b} |",
        "|---|---|---|---|---|---|",
    ]
    for key, now in after.items():
        was = before.get(key)
        if was is None or was.unit != now.unit or not was.value:
            continue
        shown = format_bytes if now.unit == "bytes" else format_ns
        rows.append(
            f"| {now.title} | {shown(was.value)} | {shown(now.value)} | "
            f"{now.value / was.value:.2f}x | {_against_reference(was)} | "
            f"{_against_reference(now)} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("old", type=Path, help="the earlier run's results.json")
    parser.add_argument("new", type=Path, help="the later run's results.json")
    args = parser.parse_args(argv)
    print(table(json.loads(args.old.read_text()), json.loads(args.new.read_text())))


if __name__ == "__main__":
    main()
