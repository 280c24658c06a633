"""PNG plots drawn from scenario results with matplotlib (no pyplot: no global state, no display).

Each function takes one scenario's result and the output directory and returns
the file it wrote. Scenarios list theirs in ``Scenario.plots``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure as Canvas

from .harness import Figure, ScenarioResult, format_bytes

MARKERS = "osD^v<>ph*"


def _series(
    figures: Iterable[Figure],
    x_param: str,
    *,
    roles: tuple[str, ...] | None = None,
    stat: str = "median",
) -> dict[str, list[tuple[float, float]]]:
    """label -> [(x, median or p99)] over figures, x read from each figure's params."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for figure in figures:
        x = float(figure.params[x_param])
        for m in figure.measurements:
            if roles is None or m.role in roles:
                series[m.label].append((x, m.stats.p99 if stat == "p99" else m.stats.median))
    return {label: sorted(points) for label, points in series.items()}


def _draw(axes: Axes, series: dict[str, list[tuple[float, float]]], scale: float = 1.0) -> None:
    for i, (label, points) in enumerate(series.items()):
        xs = [p[0] for p in points]
        ys = [p[1] * scale for p in points]
        bold = label.startswith("ctxstore")
        axes.plot(
            xs,
            ys,
            marker=MARKERS[i % len(MARKERS)],
            linewidth=2.5 if bold else 1.2,
            label=label,
        )
    axes.grid(True, which="both", alpha=0.3)


def _save(canvas: Canvas, out: Path, name: str) -> Path:
    path = out / name
    canvas.tight_layout()
    canvas.savefig(path, dpi=110)
    return path


def open_latency(result: ScenarioResult, out: Path) -> Path:
    """Open latency (median) against tensor count, one panel per page-cache state."""
    modes = {
        "warm": "open, warm page cache",
        "cold": "open, cold page cache",
        "cold+read": "open and read every page, cold",
    }
    canvas = Canvas(figsize=(16, 5.2))
    axes_list = canvas.subplots(1, len(modes), sharey=True)
    for axes, (mode, title) in zip(axes_list, modes.items(), strict=True):
        figures = [f for f in result.figures if f.params.get("cache") == mode]
        _draw(axes, _series(figures, "tensors"), scale=1e-3)
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_title(title)
        axes.set_xlabel("tensors in the context")
    axes_list[0].set_ylabel("median latency (us)")
    axes_list[0].legend(fontsize=7)
    return _save(canvas, out, "open_latency.png")


def commit_throughput(result: ScenarioResult, out: Path) -> Path:
    """Commit throughput (MB/s at the median) against context size, beside the durable floor."""
    canvas = Canvas(figsize=(8, 5))
    axes = canvas.subplots()
    figures = [f for f in result.figures if "bytes" in f.params]
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for figure in figures:
        nbytes = float(figure.params["bytes"])
        for m in figure.measurements:
            series[m.label].append((nbytes, nbytes / m.stats.median * 1e3))  # bytes/ns -> MB/s
    _draw(axes, {k: sorted(v) for k, v in series.items()})
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    sizes = sorted({float(f.params["bytes"]) for f in figures})
    axes.set_xticks(sizes, [format_bytes(s) for s in sizes])
    axes.set_xlabel("context size")
    axes.set_ylabel("throughput at the median (MB/s)")
    axes.set_title("durable commit throughput vs the write+fsync+rename+SQLite floor")
    axes.legend(fontsize=8)
    return _save(canvas, out, "commit_throughput.png")


def scale_cost(result: ScenarioResult, out: Path) -> Path:
    """Lookup, open and commit latency against versions in a slot and against slots."""
    dims = (("versions", "versions in one slot"), ("slots", "slots in the store"))
    canvas = Canvas(figsize=(13, 5))
    axes_list = canvas.subplots(1, 2, sharey=True)
    for axes, (dim, xlabel) in zip(axes_list, dims, strict=True):
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for figure in result.figures:
            if figure.params.get("dimension") != dim:
                continue
            for m in figure.measurements:
                if m.x is not None and m.role == "ctxstore":
                    label = str(figure.params.get("operation", m.label))
                    series[label].append((m.x, m.stats.median * 1e-3))
        _draw(axes, {k: sorted(v) for k, v in series.items()})
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel(xlabel)
        axes.set_title(f"cost vs {xlabel}")
        axes.legend(fontsize=8)
    axes_list[0].set_ylabel("median latency (us)")
    return _save(canvas, out, "scale.png")


def fanout_latency(result: ScenarioResult, out: Path) -> Path:
    """Commit to all N notified / acknowledged (p50 solid, p99 dashed) and readers' CPU vs N."""
    canvas = Canvas(figsize=(18, 5.4))
    axes_list = canvas.subplots(1, 3)
    panels = (
        ("notified", "commit to all N readers notified"),
        ("acked", "commit to all N readers acknowledged"),
    )
    readers = sorted({float(f.params["readers"]) for f in result.figures})
    for axes, (event, title) in zip(axes_list, panels, strict=False):
        figures = [f for f in result.figures if f.params.get("event") == event]
        p99 = _series(figures, "readers", stat="p99")
        for i, (label, points) in enumerate(_series(figures, "readers").items()):
            color, bold = f"C{i}", label.startswith("ctxstore")
            xs, ys = [p[0] for p in points], [p[1] * 1e-6 for p in points]
            axes.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], color=color,
                      linewidth=2.5 if bold else 1.2, label=f"{label} (p50)")  # fmt: skip
            tail = p99.get(label, [])
            axes.plot([p[0] for p in tail], [p[1] * 1e-6 for p in tail], linestyle="--",
                      color=color, linewidth=1.5 if bold else 0.8)  # fmt: skip
        goals = [(n, ns * 1e-6) for n, ns in ((16, 1e6), (64, 3e6)) if n in readers]
        if goals:
            axes.scatter([g[0] for g in goals], [g[1] for g in goals], marker="*", s=160,
                         color="red", zorder=5, label="issue 3 goal (p99)")  # fmt: skip
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xticks(readers, [f"{n:g}" for n in readers])
        axes.set_xlabel("readers (N)")
        axes.set_ylabel("latency (ms); solid p50, dashed p99")
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7)
    cpu_axes = axes_list[2]
    cpu = [f for f in result.figures if f.params.get("event") == "cpu"]
    _draw(cpu_axes, _series(cpu, "readers"), scale=1e-7)  # ns of CPU per s -> % of one core
    cpu_axes.set_xscale("log", base=2)
    cpu_axes.set_yscale("log")
    cpu_axes.set_xticks(readers, [f"{n:g}" for n in readers])
    cpu_axes.set_xlabel("readers (N)")
    cpu_axes.set_ylabel("CPU of all readers (% of one core)")
    cpu_axes.set_title("readers' CPU while following")
    cpu_axes.legend(fontsize=7)
    return _save(canvas, out, "fanout_latency.png")


def memory_pss(result: ScenarioResult, out: Path) -> Path:
    """Total PSS (and USS) of N readers of one context against N, beside private copies."""
    canvas = Canvas(figsize=(13, 5.2))
    axes_list = canvas.subplots(1, 2, sharey=True)
    labels = list(dict.fromkeys(m.label for f in result.figures for m in f.measurements))
    for axes, kind in zip(axes_list, ("PSS", "USS"), strict=True):
        figures = [f for f in result.figures if f.params.get("measure") == kind]
        for label, points in _series(figures, "readers").items():
            i = labels.index(label)  # one color and marker per label in both panels
            axes.plot(
                [p[0] for p in points],
                [p[1] / (1 << 20) for p in points],
                marker=MARKERS[i % len(MARKERS)],
                color=f"C{i}",
                linewidth=2.5 if label.startswith("ctxstore") else 1.2,
                label=label,
            )
        readers = sorted({float(f.params["readers"]) for f in figures})
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xticks(readers, [f"{n:g}" for n in readers])
        axes.set_xlabel("readers (N)")
        axes.set_title(f"total {kind} of N readers of one context")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7)
    axes_list[0].set_ylabel("MiB (sum over the reader processes)")
    return _save(canvas, out, "memory_pss.png")


def disturbed_latency(result: ScenarioResult, out: Path) -> Path:
    """p50 and p99 of publish and of commit-to-acked, undisturbed beside disturbed, as bars."""
    figures = [f for f in result.figures if f.params.get("event") in ("publish", "acked")]
    canvas = Canvas(figsize=(11, 5))
    axes_list = canvas.subplots(1, len(figures), squeeze=False)[0]
    for axes, figure in zip(axes_list, figures, strict=True):
        ordered = sorted(figure.measurements, key=lambda m: m.role != "variant")  # calm first
        for i, m in enumerate(ordered):
            values = [m.stats.median * 1e-6, m.stats.p99 * 1e-6]
            axes.bar([j + i * 0.4 for j in range(2)], values, width=0.4, color=f"C{i}",
                     label=m.label)  # fmt: skip
        axes.set_xticks([0.2, 1.2], ["p50", "p99"])
        axes.set_ylabel("ms")
        axes.set_title(figure.title, fontsize=10)
        axes.grid(True, axis="y", alpha=0.3)
        axes.legend(fontsize=7)
    return _save(canvas, out, "disturbed_latency.png")
