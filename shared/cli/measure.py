"""Commands that measure: ``soak`` (resources under a reader fleet over time) and
``bench`` (the benchmark harness of a source checkout, ``python -m bench``)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from ctxstore.errors import NotFoundError

from .common import Commands, positive


def cmd_soak(args: argparse.Namespace) -> int:
    from .soak import run_soak

    return run_soak(
        args.minutes, readers=args.readers, interval=args.interval, json_path=args.json,
        store=args.store,
    )  # fmt: skip


def find_bench_checkout(starts: Sequence[Path] | None = None) -> Path:
    """The source checkout whose ``bench/`` harness ``ctxstore bench`` runs.

    The harness is not part of the installed package: it lives in the
    repository. Looked for in the working directory and its parents, then
    beside the package itself (an editable install).
    """
    from ctxstore import __file__ as package_file

    if starts is None:
        here = Path.cwd()
        starts = [here, *here.parents, Path(package_file).resolve().parent.parent]
    for root in starts:
        if (root / "bench" / "__main__.py").is_file() and (root / "pyproject.toml").is_file():
            return root
    raise NotFoundError(
        "ctxstore bench runs the harness in bench/ of a ctxstore source checkout, which "
        "`pip install .` does not install: run it inside the clone (or pip install -e it)"
    )


#: what ``pip install '.[bench]'`` adds, and the harness imports
BENCH_EXTRA_MODULES = ("matplotlib", "lmdb", "rich")


def run_bench(argv: Sequence[str]) -> int:
    """``ctxstore bench ARGS``: ``python -m bench ARGS`` in the checkout; its exit code."""
    import subprocess

    root = find_bench_checkout()
    missing = [name for name in BENCH_EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise NotFoundError(f"the harness needs {', '.join(missing)}: pip install '{root}[bench]'")
    return subprocess.call([sys.executable, "-m", "bench", *argv], cwd=root)


def register(commands: Commands) -> None:
    """``soak``, and ``bench`` (listed for --help: main() hands it to the harness unparsed)."""
    bench_help = "run the benchmark harness: python -m bench (--help: its flags)"
    commands.subparsers.add_parser("bench", help=bench_help)
    soak_help = "commit continuously under N readers; report resources over time"
    p = commands.add("soak", cmd_soak, soak_help)
    p.add_argument("--minutes", type=positive(float), default=1.0, help="how long (default 1)")
    p.add_argument("--readers", type=positive(int), default=16, help="reader processes (16)")
    p.add_argument("--interval", type=positive(float), default=5.0, help="seconds per sample")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the run as JSON")
