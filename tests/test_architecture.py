"""The guard rails of the code's shape (issue 19): the import contracts hold, no
module outgrows 400 lines unless docs/architecture.md says why, and nothing in the
repository cites a file outside it."""

from __future__ import annotations

import ast
import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "daemon", "readers")
LIMIT = 400


def _line_count(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


def _explained_modules() -> set[str]:
    """The modules docs/architecture.md's table of long modules names (`shared/x.py`)."""
    text = (TOP / "docs" / "architecture.md").read_text()
    return set(re.findall(r"^\|\s*`((?:shared|daemon|readers)/[^`]+\.py)`", text, re.M))


def test_no_module_over_the_limit_unless_the_map_says_why() -> None:
    explained = _explained_modules()
    unexplained = []
    for package in PACKAGES:
        for path in sorted((TOP / package).rglob("*.py")):
            name = path.relative_to(TOP).as_posix()
            if _line_count(path) > LIMIT and name not in explained:
                unexplained.append(f"{name} ({_line_count(path)} lines)")
    assert not unexplained, (
        f"modules over {LIMIT} lines that docs/architecture.md does not explain: "
        + ", ".join(unexplained)
    )


def test_the_map_lists_only_modules_that_exist() -> None:
    missing = sorted(name for name in _explained_modules() if not (TOP / name).is_file())
    assert not missing, f"docs/architecture.md explains modules that do not exist: {missing}"


def _project_text_files() -> list[Path]:
    roots = [TOP / name for name in (*PACKAGES, "tests", "bench", "docs", "systemd", ".ci")]
    files = [p for root in roots for p in root.rglob("*") if p.suffix in (".py", ".md", ".toml")]
    return [*files, TOP / "README.md", TOP / "pyproject.toml"]


def test_nothing_cites_a_file_outside_the_repository() -> None:
    outside = re.compile(r"DESIGN\.md|STYLE\.md|\.\./shared/")
    offenders = []
    for path in _project_text_files():
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if outside.search(line):
                offenders.append(f"{path.relative_to(TOP)}:{number}")
    assert not offenders, f"references to files outside the repository: {offenders}"


def test_import_contracts_hold() -> None:
    """pyproject.toml's import-linter contracts, over the package as it installs."""
    bindir = os.path.dirname(sys.executable)
    assert shutil.which("lint-imports", path=bindir), (
        "lint-imports is missing: install the test extra (pip install -e '.[test]')"
    )
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    script = str(TOP / ".ci" / "importlint")
    result = subprocess.run([script], check=False, cwd=TOP, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_test_module_imports_another_or_starts_a_daemon_its_own_way() -> None:
    """What test modules share lives in tests/support; a daemon process is started by its
    one launcher (support.daemon.start_daemon, which makes it die with pytest)."""
    importing, launching = [], set()
    for path in sorted((TOP / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("test_"):
                importing.append(f"{path.name}: from {node.module}")
            elif isinstance(node, ast.Import):
                importing += [
                    f"{path.name}: {a.name}" for a in node.names if a.name.startswith("test_")
                ]
            elif isinstance(node, ast.List) and _runs_the_daemon(node):
                launching.add(path.name)
    assert importing == []
    assert launching == set()


def _runs_the_daemon(argv: ast.List) -> bool:
    """An argv literal ``[..., "ctxstore.cli", "daemon", ...]``: a daemon started by hand."""
    words = [e.value for e in argv.elts if isinstance(e, ast.Constant)]
    return any(a == "ctxstore.cli" and b == "daemon" for a, b in itertools.pairwise(words))
