"""What the figures were measured on: CPU, memory, the bench directory's filesystem, versions."""

from __future__ import annotations

import datetime
import os
import platform
import sqlite3
import subprocess
import time
from importlib import metadata
from pathlib import Path

from .harness import format_ns, timer_overhead_ns

PACKAGES = ("numpy", "safetensors", "lmdb", "cachetools", "xxhash", "matplotlib", "ctxstore")


def describe(bench_dir: Path, repo: Path) -> dict[str, str]:
    """An ordered mapping of what RESULTS.md prints under "Machine"."""
    info = {
        "date (UTC)": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "CPU": cpu_model(),
        "cores": cores(),
        "memory": memory(),
        "bench directory filesystem": filesystem(bench_dir),
        "kernel": f"{platform.system()} {platform.release()} ({platform.machine()}){scheduler()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "SQLite": sqlite3.sqlite_version,
    }
    for package in PACKAGES:
        info[package] = _version(package)
    info["ctxstore commit"] = git_commit(repo)
    info["load average at start"] = load_average()
    clock = time.get_clock_info("perf_counter")
    info["timer"] = (
        f"perf_counter_ns, resolution {clock.resolution * 1e9:.0f} ns, "
        f"one read pair costs {format_ns(timer_overhead_ns())}"
    )
    return info


def load_average() -> str:
    """1, 5 and 15-minute load averages: other work on the machine shows in the tails."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores() -> str:
    logical = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    return f"{usable} usable of {logical} logical"


def memory() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    return "unknown"


def filesystem(path: Path) -> str:
    """Type, device and options of the mount holding ``path`` (/proc/mounts, else ``stat -f``)."""
    real = os.path.realpath(path)
    best: tuple[str, str, str, str] | None = None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, mount, fstype, options = line.split()[:4]
                mount = mount.replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and (best is None or len(mount) >= len(best[1])):
                    best = (device, mount, fstype, options)
    except OSError:
        best = None
    if best is not None:
        device, mount, fstype, options = best
        return f"{fstype} on {device} mounted at {mount} ({options}){_journal(fstype, device)}"
    try:
        out = subprocess.run(
            ["stat", "-f", "-c", "%T", real], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def _journal(fstype: str, device: str) -> str:
    """For ext4, whether it keeps a journal: without one each new inode skips every inode
    freed in the last minute or so (the kernel's ``recently_deleted``), which makes the
    commit figures' file creations cost more the faster versions come and go."""
    if fstype != "ext4" or not os.path.isdir("/proc/fs/jbd2"):
        return ""
    name = os.path.basename(device)
    journaled = any(entry.startswith(f"{name}-") for entry in os.listdir("/proc/fs/jbd2"))
    return "" if journaled else ", no journal"


def scheduler() -> str:
    """A non-standard scheduler setting some VM kernels carry: ``kernel.sched_vcpu_pack``
    places woken tasks on a busy vCPU, so a process that wakes another (the daemon's send
    to a reader) is often preempted by it at once: the fan-out's per-step times show it."""
    try:
        value = Path("/proc/sys/kernel/sched_vcpu_pack").read_text().strip()
    except OSError:
        return ""
    return f", kernel.sched_vcpu_pack = {value} (woken tasks packed onto busy vCPUs)"


def git_commit(repo: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
