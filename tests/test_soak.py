"""``ctxstore soak``: continuous commits under many readers stay flat (a quarter of a minute
under 8 readers by default; the full minute under 16 with ``pytest --long``).

The command samples the daemon's RSS and file descriptors, the readers' memory,
shared memory and disk use over time and gives its own verdict; this test
checks that verdict and the figures in its JSON report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctxstore.cli.soak_samples import disk_usage

MiB = 1 << 20


#: (minutes, readers, seconds per sample): the default run samples as often over a quarter
#: of the time, so the trends compare as many samples; the slow one is the command's default
RUNS = [
    pytest.param(0.25, 8, 1.25, id="15s-8-readers"),
    pytest.param(1.0, 16, 5.0, marks=pytest.mark.slow, id="1min-16-readers"),
]


@pytest.mark.parametrize(("minutes", "readers", "interval"), RUNS)
def test_a_soak_under_many_readers_stays_flat(
    tmp_path: Path, minutes: float, readers: int, interval: float
) -> None:
    report = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "ctxstore.cli", "soak", "--minutes", str(minutes),
         "--readers", str(readers), "--interval", str(interval), "--json", str(report)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "soak: PASS: flat" in done.stdout
    run = json.loads(report.read_text())
    samples = run["samples"]
    assert len(samples) >= minutes * 60 / interval - 3  # one every interval, give or take
    assert samples[-1]["commits"] > samples[0]["commits"]
    assert run["flat"] and run["whole"] and run["ok"]
    assert {t["metric"] for t in run["trends"]} >= {"daemon_rss", "daemon_fds", "shm_bytes"}
    assert all(t["flat"] for t in run["trends"])
    assert len(run["readers_reports"]) == readers
    assert all(r["torn"] == 0 and r["reads"] > 0 for r in run["readers_reports"])
    steady = samples[len(samples) // 5 :]
    assert abs(steady[-1]["daemon_fds"] - steady[0]["daemon_fds"]) <= 4
    assert steady[-1]["daemon_rss"] - steady[0]["daemon_rss"] < 32 * MiB
    assert steady[-1]["shm_bytes"] == steady[0]["shm_bytes"]
    assert run["daemon_exit"] == 0 and run["leftovers"] == [] and run["problems"] == []


def test_disk_usage_counts_hard_links_once(tmp_path: Path) -> None:
    """Versions hard-link unchanged tensors: a link adds no bytes, a new file does."""
    (tmp_path / "a").write_bytes(b"x" * 100_000)
    base = disk_usage(tmp_path)
    os.link(tmp_path / "a", tmp_path / "b")
    assert disk_usage(tmp_path) == base
    (tmp_path / "c").write_bytes(b"y" * 100_000)
    assert disk_usage(tmp_path) > base
