"""``ctxstore soak``: one minute of continuous commits under 16 readers stays flat.

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

from ctxstore.cli.soak_samples import disk_usage

MiB = 1 << 20


def test_one_minute_soak_with_16_readers_stays_flat(tmp_path: Path) -> None:
    report = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "ctxstore.cli", "soak", "--minutes", "1", "--readers", "16",
         "--json", str(report)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "soak: PASS: flat" in done.stdout
    run = json.loads(report.read_text())
    samples = run["samples"]
    assert len(samples) >= 9  # every 5 s for a minute
    assert samples[-1]["commits"] > samples[0]["commits"]
    assert run["flat"] and run["whole"] and run["ok"]
    assert {t["metric"] for t in run["trends"]} >= {"daemon_rss", "daemon_fds", "shm_bytes"}
    assert all(t["flat"] for t in run["trends"])
    assert len(run["readers_reports"]) == 16
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
