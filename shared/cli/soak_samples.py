"""What ``ctxstore soak`` measures: one sample of the fleet's resources, and the trends that
say whether anything grew (the mean of the last third of the samples after warm-up
against the first third, each metric within its tolerance)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from ctxstore.client import SHM_PREFIX
from ctxstore.store import layout
from ctxstore.versiontable import segment_name

MiB = 1 << 20
SHM_DIR = Path("/dev/shm")  # noqa: S108 - where Linux keeps POSIX shared memory


@dataclass(frozen=True)
class Sample:
    """One measurement of the running fleet."""

    t: float  # seconds since the commits started
    commits: int
    daemon_rss: int
    daemon_fds: int
    readers_rss: int
    readers_pss: int
    shm_bytes: int
    disk_bytes: int
    index_bytes: int = 0  # of disk_bytes: index.db with its -wal and -shm
    versions: int = 0  # version directories on disk (retention's own plus reader-held ones)


@dataclass(frozen=True)
class Tolerance:
    """How much a metric may grow between the first and last third: max(absolute, relative)."""

    metric: str
    absolute: float
    relative: float


TOLERANCES = (
    Tolerance("daemon_rss", 16 * MiB, 0.25),
    Tolerance("daemon_fds", 4, 0.0),
    Tolerance("readers_pss", 32 * MiB, 0.25),
    Tolerance("shm_bytes", 64 << 10, 0.0),
    Tolerance("disk_bytes", 8 * MiB, 0.25),
)


@dataclass(frozen=True)
class Trend:
    """A metric's first-third and last-third means after warm-up, and whether it stayed flat."""

    metric: str
    first: float
    last: float
    limit: float
    flat: bool


def trends(samples: Sequence[Sample], warmup: float) -> list[Trend]:
    """Compare the mean of the last third of the samples after ``warmup`` with the first third."""
    steady = [s for s in samples if s.t >= warmup]
    third = len(steady) // 3
    if third == 0:
        return []
    out = []
    for tol in TOLERANCES:
        values = [float(getattr(s, tol.metric)) for s in steady]
        first = sum(values[:third]) / third
        last = sum(values[-third:]) / third
        limit = max(tol.absolute, tol.relative * first)
        out.append(Trend(tol.metric, first, last, limit, last - first <= limit))
    return out


# -- measuring --------------------------------------------------------------------------------


def _shm_bytes(store: Path) -> int:
    """Memory in /dev/shm of this run: the daemon's version table and our publish segments."""
    table = segment_name(store)[1:]
    ours = SHM_PREFIX[1:] + f"{os.getpid()}-"
    total = 0
    with contextlib.suppress(OSError), os.scandir(SHM_DIR) as entries:
        for entry in entries:
            if entry.name == table or entry.name.startswith(ours):
                with contextlib.suppress(OSError):
                    total += entry.stat().st_blocks * 512
    return total


def disk_usage(root: Path) -> int:
    """Bytes allocated under ``root``, each inode once (versions hard-link unchanged tensors)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


def _index_bytes(store: Path) -> int:
    index = layout.index_path(store)
    total = 0
    for path in (index, index.with_name(index.name + "-wal"), index.with_name(index.name + "-shm")):
        with contextlib.suppress(OSError):
            total += path.stat().st_blocks * 512
    return total


def _version_dirs(store: Path) -> int:
    slots = layout.slots_dir(store)
    with contextlib.suppress(OSError):
        return sum(len(os.listdir(slots / slot)) for slot in os.listdir(slots))
    return 0


def _memory(pids: Sequence[int]) -> tuple[int, int]:
    rss = pss = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            info = psutil.Process(pid).memory_full_info()
            rss += int(info.rss)
            pss += int(getattr(info, "pss", 0))
    return rss, pss


def take_sample(t: float, commits: int, daemon: int, readers: Sequence[int], store: Path) -> Sample:
    proc = psutil.Process(daemon)
    readers_rss, readers_pss = _memory(readers)
    return Sample(
        t=round(t, 1),
        commits=commits,
        daemon_rss=int(proc.memory_info().rss),
        daemon_fds=proc.num_fds(),
        readers_rss=readers_rss,
        readers_pss=readers_pss,
        shm_bytes=_shm_bytes(store),
        disk_bytes=disk_usage(store),
        index_bytes=_index_bytes(store),
        versions=_version_dirs(store),
    )


def row(s: Sample) -> list[str]:
    mib = [
        f"{v / MiB:.1f}"
        for v in (s.daemon_rss, s.readers_rss, s.readers_pss, s.disk_bytes, s.index_bytes)
    ]
    return [f"{s.t:.0f}", str(s.commits), mib[0], str(s.daemon_fds), mib[1], mib[2],
            f"{s.shm_bytes >> 10}", mib[3], mib[4], str(s.versions)]  # fmt: skip


HEADERS = ("t s", "commits", "daemon RSS MiB", "daemon fds", "readers RSS MiB",
           "readers PSS MiB", "shm KiB", "disk MiB", "index MiB", "versions")  # fmt: skip


__all__ = ["HEADERS", "TOLERANCES", "Sample", "Trend", "disk_usage", "row", "take_sample", "trends"]
