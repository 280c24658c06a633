"""The registered scenarios, in the order a run measures them.

Adding one (fan-out once ``ctxstore daemon`` exists, memory once
``ctxstore.readers.Reader`` does): write ``bench/<name>.py`` defining
``SCENARIO = Scenario(name, title, method, run, plots)`` whose ``run`` returns
figures with their alternatives, floor and goals (issue 3: N=16 p99 <= 1 ms,
N=64 p99 <= 3 ms, within 1.3x of the bare Unix-socket floor; Reader.get() hit
<= 2 us p50; 32 readers' total PSS <= 1.15 x (256 MiB + 32 x one bare reader)),
add its plots to ``bench/plots.py`` (fan-out latency vs N, total PSS vs N), import
it here, append it to ``SCENARIOS`` and drop its line from ``PENDING``. A
scenario that cannot run is not registered: it never writes placeholder figures.
"""

from __future__ import annotations

from . import commit, hotget, metadata, scale
from . import open as open_context
from .scenario import Scenario

SCENARIOS: tuple[Scenario, ...] = (
    open_context.SCENARIO,
    hotget.SCENARIO,
    metadata.SCENARIO,
    commit.SCENARIO,
    scale.SCENARIO,
)

#: scenarios of issue 6 that are not registered yet, and what they wait for
PENDING: dict[str, str] = {
    "fanout": (
        "commit to all N readers notified and acknowledged (N = 1, 4, 16, 64) vs a bare "
        "Unix-socket fan-out and SQLite polling; waits for `ctxstore daemon` and "
        "`ctxstore.readers.Reader`"
    ),
    "memory": (
        "total PSS/USS of N = 1, 8, 32 readers of a 256 MiB context vs private copies and "
        "multiprocessing.shared_memory; waits for `ctxstore.readers.Reader`"
    ),
    "reader get()": "the Reader.get() hit (<= 2 us p50) joins `hotget` once the reader exists",
}


def by_name() -> dict[str, Scenario]:
    return {s.name: s for s in SCENARIOS}
