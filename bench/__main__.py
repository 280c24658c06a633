"""``python -m bench``: run the benchmark scenarios and write RESULTS.md, results.json and plots."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from . import report, runner
from .scenarios import PENDING, SCENARIOS, by_name


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="ctxstore beside its alternatives and floors, measured in one run.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="every scenario at tiny sizes with few repetitions (well under a minute)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=runner.DEFAULT_OUT,
        help="where RESULTS.md, results.json and the plots go (default: bench/)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this scenario (repeatable, or comma-separated); see --list",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        help="parent of the temporary data directory (default: bench/out/ in the repo, "
        "i.e. the repo's filesystem); it is removed at the end",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    known = by_name()
    if args.list:
        for scenario in SCENARIOS:
            print(f"{scenario.name:10} {scenario.title}")
        for name, why in PENDING.items():
            print(f"{name:10} (not registered yet) {why}")
        return 0
    selected = list(SCENARIOS)
    if args.only:
        names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            print(
                f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(known)}",
                file=sys.stderr,
            )
            return 2
        selected = [s for s in SCENARIOS if s.name in names]
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    result = runner.run(
        selected,
        quick=args.quick,
        out=args.out,
        data_parent=args.dir,
        progress=not args.no_progress,
        command=command,
        pending=PENDING,
    )
    for title, outcome in report.goal_outcomes(result):
        print(f"{title}: {outcome}")
    print(f"wrote {args.out / 'RESULTS.md'} in {result.elapsed_s:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
