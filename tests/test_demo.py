"""The Quick start's `ctxstore demo` runs to completion on its own and reports what it saw."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctxstore.cli", *args],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_demo_with_daemon_and_four_readers() -> None:
    result = run_cli("demo", "--versions", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    adopted = [line for line in result.stdout.splitlines() if " 4/4 " in line]
    assert len(adopted) == 4  # 2 versions x (llm, cnn), every reader adopted each
    assert "total PSS" in result.stdout
    assert "daemon stopped (exit 0)" in result.stdout


def test_embedded_demo() -> None:
    result = run_cli("demo", "--embedded", "--versions", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify: ok" in result.stdout
    assert result.stdout.count(" yes") == 4
