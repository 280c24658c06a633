"""``python -m bench.compare OLD NEW``: the ctxstore p50 of each figure in two runs, side by side.

A full run replaces RESULTS.md; this keeps the previous run's figures readable beside the new
ones (a Markdown table on stdout), so a change can be judged against the run before it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.harness import format_bytes, format_ns


def ctxstore_p50s(results: dict[str, Any]) -> dict[str, tuple[str, float, str]]:
    """Figure key -> (title, the ctxstore measurement's p50, its unit), in run order."""
    found: dict[str, tuple[str, float, str]] = {}
    for scenario in results["scenarios"].values():
        for figure in scenario["figures"]:
            for m in figure["measurements"]:
                if m["role"] == "ctxstore" and m["stats"]["n"]:
                    found[figure["key"]] = (figure["title"], m["stats"]["median"], m["unit"])
                    break
    return found


def table(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The Markdown table: figures in both runs, the new run's order."""
    before, after = ctxstore_p50s(old), ctxstore_p50s(new)
    rows = [
        f"| figure | {old['machine']['ctxstore commit']} p50 | "
        f"{new['machine']['ctxstore commit']} p50 | new / old |",
        "|---|---|---|---|",
    ]
    for key, (title, value, unit) in after.items():
        if key not in before or before[key][2] != unit or not before[key][1]:
            continue
        was = before[key][1]
        shown = format_bytes if unit == "bytes" else format_ns
        rows.append(f"| {title} | {shown(was)} | {shown(value)} | {value / was:.2f}x |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("old", type=Path, help="the earlier run's results.json")
    parser.add_argument("new", type=Path, help="the later run's results.json")
    args = parser.parse_args(argv)
    print(table(json.loads(args.old.read_text()), json.loads(args.new.read_text())))


if __name__ == "__main__":
    main()
