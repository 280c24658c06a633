"""The benchmark harness: the quick run produces every registered scenario's results and plots.

No timing is asserted anywhere (machines are noisy); only that every scenario
ran, reported its figures with alternatives, and drew its plots. The harness's
own pieces (statistics, interleaving, goals, disk accounting, the report) are
checked on small fixed inputs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ctxstore.cli.measure import BENCH_EXTRA_MODULES

REPO = Path(__file__).resolve().parent.parent
#: the bench extra: without these the harness cannot run, and these tests fail (never skip)
BENCH_DEPENDENCIES = BENCH_EXTRA_MODULES
QUICK_RUN_TIMEOUT_S = 300
SHM = "/dev/shm"


def _require_bench_dependencies() -> None:
    missing = [name for name in BENCH_DEPENDENCIES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(
            f"the benchmark harness needs {', '.join(missing)}: "
            "install the bench extra (pip install -e '.[bench]' or '.[test]')",
            pytrace=False,
        )


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The ``bench`` package, imported from the repository (it is not installed)."""
    _require_bench_dependencies()
    monkeypatch.syspath_prepend(str(REPO))
    import bench
    import bench.scenarios

    return bench


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``python -m bench --quick`` run for the whole module; returns its output directory."""
    _require_bench_dependencies()
    out = tmp_path_factory.mktemp("bench-out")
    data = tmp_path_factory.mktemp("bench-data")
    shm_before = set(os.listdir(SHM)) if os.path.isdir(SHM) else set()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--no-progress",
            "--out",
            str(out),
            "--dir",
            str(data),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=QUICK_RUN_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"quick run failed:\n{proc.stdout}\n{proc.stderr}"
    assert list(data.iterdir()) == [], "the run left its data directory behind"
    if os.path.isdir(SHM):
        left = {n for n in set(os.listdir(SHM)) - shm_before if n.startswith("ctxfan-")}
        assert not left, f"the fan-out scenario left {left} in {SHM}"
    return out


# -- the quick run ---------------------------------------------------------------------------


def test_quick_run_reports_every_registered_scenario(quick_run: Path, bench: Any) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    registered = [s.name for s in bench.scenarios.SCENARIOS]
    assert results["quick"] is True
    assert list(results["scenarios"]) == registered
    for name, scenario in results["scenarios"].items():
        assert scenario["figures"], f"scenario {name} produced no figure"
        for figure in scenario["figures"]:
            assert figure["measurements"], f"{name}: figure {figure['title']!r} is empty"
            roles = {m["role"] for m in figure["measurements"]}
            assert "ctxstore" in roles, f"{name}: {figure['title']!r} has no ctxstore result"
            for m in figure["measurements"]:
                assert m["stats"]["n"] >= 1
                assert m["stats"]["median"] >= 0


def test_quick_run_compares_with_alternatives_and_floors(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    figures = {f["key"]: f for s in results["scenarios"].values() for f in s["figures"]}
    labels = {m["label"] for m in figures["open.warm.1"]["measurements"]}
    for alternative in ("np.load(mmap_mode='r')", "safetensors", "LMDB", "pickle"):
        assert any(alternative in label for label in labels), alternative
    for key in ("commit.4096", "metadata.lookup"):
        assert "floor" in {m["role"] for m in figures[key]["measurements"]}, key
    assert "alternative" in {m["role"] for m in figures["hotget.hit"]["measurements"]}
    assert figures["commit.dedup"]["measurements"][0]["unit"] == "bytes"


def test_quick_run_measures_the_reader_get_hit_against_the_bare_lru(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    figure = next(
        f for f in results["scenarios"]["hotget"]["figures"] if f["key"] == "hotget.reader"
    )
    labels = {m["label"]: m["role"] for m in figure["measurements"]}
    assert labels["Reader.get(slot) hit, version-table check"] == "ctxstore"
    assert figure["reference"] in labels
    assert figure["goal"]["source"] == "issue 3"
    assert isinstance(figure["verdict"]["met"], bool)


def test_quick_run_fans_out_to_reader_processes_beside_floor_and_polling(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    figures = {f["key"]: f for f in results["scenarios"]["fanout"]["figures"]}
    sizes = sorted({f["params"]["readers"] for f in figures.values()})
    assert sizes == [1, 4]
    for n in sizes:
        notified = {m["label"]: m for m in figures[f"fanout.notified.{n}"]["measurements"]}
        roles = {m["role"] for m in notified.values()}
        assert {"ctxstore", "variant", "floor", "alternative"} <= roles
        assert any("polling every 1 ms" in label for label in notified)
        assert any("polling every 10 ms" in label for label in notified)
        assert any("version table bumped" in label for label in notified)  # issue 21
        for m in notified.values():
            assert m["stats"]["n"] >= 1 and m["unit"] == "ns"
        acked = figures[f"fanout.acked.{n}"]
        assert {m["role"] for m in acked["measurements"]} == {"ctxstore", "floor"}
        assert acked["reference"] == acked["measurements"][1]["label"]
        for key in (f"fanout.notified.{n}", f"fanout.acked.{n}"):
            assert figures[key]["goal"]["source"] == "issue 3"
            assert isinstance(figures[key]["verdict"]["met"], bool)
        cpu = figures[f"fanout.cpu.{n}"]["measurements"]
        assert len(cpu) == 5 and all(m["stats"]["median"] >= 0 for m in cpu)
    notes = " ".join(figures["fanout.notified.4"]["notes"])
    assert "where the time goes" in notes
    assert "each reader" in notes  # its CPU per version (issue 21)
    # issue 21's CPU goals, each beside the bare work under it, measured in this run
    assert "the bare server spends" in notes and "each floor client" in notes
    goals = next(n for n in figures["fanout.notified.4"]["notes"] if "CPU goals" in n)
    assert "goal <= 1 ms at N=16" in goals and "goal <= 80 us" in goals
    assert "bare durable commit of this version (an old one retired)" in goals
    assert "bare fan-out server" in goals and "bare floor client" in goals
    scenario_notes = results["scenarios"]["fanout"]["notes"]
    assert any(n.startswith("durable-commit floor:") for n in scenario_notes)


def test_quick_run_measures_disturbed_readers_beside_an_undisturbed_run(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    scenario = results["scenarios"]["disturbed"]
    figures = {f["key"]: f for f in scenario["figures"]}
    assert set(figures) == {
        "disturbed.publish",
        "disturbed.acked",
        "disturbed.daemon_rss",
        "disturbed.hostile_acked",
        "disturbed.hostile_rss",
    }
    for key, figure in figures.items():
        roles = {m["label"]: m["role"] for m in figure["measurements"]}
        assert sorted(roles.values()) == ["ctxstore", "variant"]
        assert roles[figure["reference"]] == "variant"
        assert figure["goal"]["source"] == ("issue 18" if "hostile" in key else "issue 7")
        assert isinstance(figure["verdict"]["met"], bool)
    for key in ("disturbed.daemon_rss", "disturbed.hostile_rss"):
        assert figures[key]["measurements"][0]["unit"] == "bytes"
    assert "slowloris and" in figures["disturbed.hostile_acked"]["measurements"][0]["label"]
    notes = " ".join(scenario["notes"])
    assert "the SIGKILLed reader left the daemon's status" in notes


def test_quick_run_sums_reader_memory_beside_private_copies_and_shm(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    figures = {f["key"]: f for f in results["scenarios"]["memory"]["figures"]}
    assert set(figures) == {"memory.pss.1", "memory.uss.1", "memory.pss.4", "memory.uss.4"}
    for key, figure in figures.items():
        labels = {m["label"]: m for m in figure["measurements"]}
        assert any("private copies" in label for label in labels), key
        assert any("shared_memory" in label for label in labels), key
        for m in labels.values():
            assert m["unit"] == "bytes" and m["stats"]["median"] > 0
        ours = next(m for m in labels.values() if m["role"] == "ctxstore")
        private = next(m for label, m in labels.items() if "private copies" in label)
        # not a timing: N readers each holding a private copy cannot count less than one copy
        assert private["stats"]["median"] >= figure["params"]["bytes"], key
        assert ours["stats"]["median"] > 0
    assert figures["memory.pss.4"]["goal"] is not None
    assert figures["memory.pss.4"]["reference"].startswith("ideal")


def test_quick_run_judges_goals(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    judged = [
        f
        for s in results["scenarios"].values()
        for f in s["figures"]
        if f["goal"] is not None and f["verdict"] is not None
    ]
    assert judged
    for figure in judged:
        assert isinstance(figure["verdict"]["met"], bool)
        assert figure["goal"]["source"]


def test_quick_run_writes_results_md_with_machine_and_every_figure(quick_run: Path) -> None:
    text = (quick_run / "RESULTS.md").read_text()
    results = json.loads((quick_run / "results.json").read_text())
    for heading in ("## Machine", "## Goals"):
        assert heading in text
    assert ("## Not measured yet" in text) == bool(results["pending"])
    for field in (
        "CPU",
        "cores",
        "memory",
        "bench directory filesystem",
        "kernel",
        "Python",
        "SQLite",
        "numpy",
        "date (UTC)",
    ):
        assert f"| {field} |" in text, field
    for scenario in results["scenarios"].values():
        assert scenario["title"] in text
        for figure in scenario["figures"]:
            assert f"### {figure['title']}" in text
    assert "met" in text or "MISSED" in text


def test_quick_run_draws_the_plots(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    plots = [p for s in results["scenarios"].values() for p in s["plots"]]
    assert {
        "open_latency.png",
        "commit_throughput.png",
        "scale.png",
        "fanout_latency.png",
        "memory_pss.png",
    } <= set(plots)
    text = (quick_run / "RESULTS.md").read_text()
    for name in plots:
        data = (quick_run / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        assert len(data) > 10_000, name
        assert f"]({name})" in text


def test_only_runs_the_named_scenario_and_rejects_unknown_ones(
    tmp_path: Path, bench: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [sys.executable, "-m", "bench", "--quick", "--no-progress"]
    proc = subprocess.run(
        [*argv, "--only", "metadata", "--out", str(tmp_path), "--dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=QUICK_RUN_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["scenarios"]) == ["metadata"]
    from bench.__main__ import main  # refused before anything runs: no process needed

    assert main(["--quick", "--no-progress", "--only", "nonesuch"]) == 2
    assert "unknown scenario" in capsys.readouterr().err


# -- harness pieces ---------------------------------------------------------------------------


def test_stats_median_and_nearest_rank_p99(bench: Any) -> None:
    from bench.harness import Stats, nearest_rank

    samples = [float(v) for v in range(1, 101)]
    stats = Stats.of(list(reversed(samples)))
    assert stats.median == 50.5
    assert stats.p99 == 99.0
    assert stats.minimum == 1.0
    assert stats.n == 100
    assert nearest_rank([1.0, 2.0, 3.0], 0.99) == 3.0
    assert Stats.single(7.0).p99 == 7.0


def test_compare_interleaves_rounds_and_runs_hooks_untimed(bench: Any) -> None:
    from bench.harness import Budget, Candidate, compare

    calls: list[str] = []

    def candidate(label: str) -> Any:
        return Candidate(
            label,
            lambda: calls.append(label),
            before=lambda: calls.append(f"before {label}"),
            after=lambda _result: calls.append(f"after {label}"),
        )

    budget = Budget(seconds=0.0, min_reps=4, max_reps=4, warmup=1, rewarm=0)
    stats = compare([candidate("a"), candidate("b")], budget, rounds=2)
    assert stats["a"].n == 4 and stats["b"].n == 4
    ops = [c for c in calls if c in ("a", "b")]
    # warm-up + 2 timed for a, then b; round 2 starts with b (rotated order)
    assert ops == ["a", "a", "a", "b", "b", "b", "b", "b", "a", "a"]
    assert calls.count("before a") == calls.count("a")
    assert calls.count("after b") == calls.count("b")


def test_batched_samples_are_per_call(bench: Any) -> None:
    from bench.harness import Budget, measure

    counter = [0]

    def op() -> None:
        counter[0] += 1

    stats = measure(op, Budget(0.0, 3, 3, warmup=0), batch=10)
    assert counter[0] == 30
    assert stats.batch == 10 and stats.n == 3


def test_goals_judge_the_ctxstore_measurement(bench: Any) -> None:
    from bench.harness import (
        AtMost,
        Figure,
        Flat,
        RatioAtMost,
        Stats,
        ThroughputAtLeast,
    )

    figure = Figure("k", "t", reference="floor")
    figure.add("ours", "ctxstore", Stats.single(150.0))
    figure.add("floor", "floor", Stats.single(100.0))
    assert AtMost(200.0, "test").judge(figure).met
    assert not AtMost(100.0, "test").judge(figure).met
    assert RatioAtMost("floor", 1.5, "test").judge(figure).met
    assert not RatioAtMost("floor", 1.4, "test").judge(figure).met
    verdict = ThroughputAtLeast("floor", 0.8, "test").judge(figure)
    assert verdict is not None and not verdict.met and verdict.ratio == pytest.approx(2 / 3)
    assert RatioAtMost("missing", 1.5, "test").judge(figure) is None

    scaling = Figure("s", "scale")
    for x, value in ((1, 10.0), (10, 30.0), (100, 12.0)):
        scaling.add(f"@{x}", "ctxstore", Stats.single(value), x=x)
    assert Flat(1.5, "test").judge(scaling).met
    assert Figure("e", "empty", goal=Flat(1.5, "test")).verdict() is None


def test_stamps_are_shared_between_mappings(bench: Any, tmp_path: Path) -> None:
    from bench.peers import ACKED, CONTROL, READY, RECEIVED, Stamps

    writer = Stamps.create(tmp_path / "s.stamps", readers=3, versions=5)
    other = Stamps.open(tmp_path / "s.stamps")
    try:
        assert (other.readers, other.versions) == (3, 5)
        writer.put(RECEIVED, 2, 4, 1.5)
        writer.put(RECEIVED, 0, 4, 2.5)
        writer.put(ACKED, 1, 99, 7.0)  # beyond the grid: ignored, never another cell
        other.put(CONTROL, 1, READY, 1.0)
        assert other.get(RECEIVED, 2, 4) == 1.5
        assert other.count(RECEIVED, 4) == 2
        assert writer.count(CONTROL, READY) == 1
        assert other.plane(RECEIVED)[0] == [0.0, 0.0, 0.0, 0.0, 2.5]
        assert sum(map(sum, other.plane(ACKED))) == 0.0
    finally:
        writer.close()
        other.close()
    (tmp_path / "bad").write_bytes(bytes(64))
    with pytest.raises(ValueError, match="not a stamps file"):
        Stamps.open(tmp_path / "bad")


def test_fanout_goal_needs_every_part(bench: Any) -> None:
    from bench.fanout import AllOf, goal_for
    from bench.harness import Figure, Stats

    figure = Figure("f", "t", reference="floor")
    figure.add("ours", "ctxstore", Stats.of([100.0, 100.0, 900.0]))
    figure.add("floor", "floor", Stats.of([90.0, 90.0]))
    assert goal_for(4, "floor").judge(figure).met  # no p99 goal below N=16: 1.11x the floor
    both = goal_for(16, "floor")
    assert isinstance(both, AllOf) and both.judge(figure).met  # p99 900 ns <= 1 ms
    slow = Figure("g", "t", reference="floor")
    slow.add("ours", "ctxstore", Stats.of([100.0, 2e6]))
    slow.add("floor", "floor", Stats.of([90.0, 90.0]))
    verdict = both.judge(slow)
    assert verdict is not None and not verdict.met
    assert "p99 <= 1 ms" in both.text and "1.3x" in both.text
    assert both.judge(Figure("e", "empty")) is None


def test_commit_floor_commits_durably_and_keeps_three_versions(bench: Any, tmp_path: Path) -> None:
    """The bare commit does the work the floor claims: files, links, rows, removal."""
    from bench.floors import KEEP_BACK, BareCommits
    from ctxstore.store.db import connect

    conn = connect(tmp_path / "index.db", readonly=False)
    conn.execute("CREATE TABLE versions(slot, version, manifest, PRIMARY KEY (slot, version))")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        payloads = [bytes([i]) * 100 for i in range(4)]
        linked = BareCommits(tmp_path / "linked", conn, 1, payloads)
        written = BareCommits(tmp_path / "written", conn, 2, payloads)
        for version in range(1, 6):
            linked.commit(version, link=True)
            written.commit(version, link=False)
        kept = [str(v) for v in range(6 - KEEP_BACK, 6)]
        for commits, slot in ((linked, 1), (written, 2)):
            assert sorted(p.name for p in commits.dir.iterdir()) == kept
            rows = conn.execute("SELECT version FROM versions WHERE slot = ?", (slot,))
            assert [r[0] for r in rows] == [int(v) for v in kept]
            for i, payload in enumerate(payloads):
                assert (commits.dir / "5" / f"{i}.npy").read_bytes() == payload
        inodes = [[(linked.dir / v / f"{i}.npy").stat().st_ino for i in range(4)] for v in "45"]
        assert [a == b for a, b in zip(*inodes, strict=True)] == [False, True, True, True]
        assert all((written.dir / "5" / f"{i}.npy").stat().st_nlink == 1 for i in range(4))
    finally:
        conn.close()


def test_dropped_file_is_not_resident(bench: Any, tmp_path: Path) -> None:
    from bench.data import drop_page_cache, resident_pages

    path = tmp_path / "f"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    counts = resident_pages(str(path))
    assert counts is not None and counts[1] == (1 << 20) // os.sysconf("SC_PAGE_SIZE")
    drop_page_cache([str(path)])
    after = resident_pages(str(path))
    assert after is not None and after[0] <= counts[0]


def test_report_marks_missed_goals_and_lists_pending_scenarios(bench: Any) -> None:
    from bench.harness import AtMost, Figure, ScenarioResult, Stats
    from bench.report import RunResult, as_json, markdown
    from bench.scenario import Scenario

    figure = Figure("x.y", "a figure", goal=AtMost(10.0, "issue 2"), reference="alt")
    figure.add("ours", "ctxstore", Stats.of([20.0, 20.0]))
    figure.add("alt", "alternative", Stats.of([40.0, 40.0]))
    scenario = Scenario("x", "Scenario X", "What X measures.", lambda _ctx: ScenarioResult())
    run = RunResult(
        quick=True,
        command="python -m bench --quick",
        machine={"CPU": "test"},
        scenarios=[(scenario, ScenarioResult(figures=[figure]))],
        pending={"fanout": "waits for the daemon"},
    )
    text = markdown(run)
    assert "**MISSED**" in text
    assert "| CPU | test |" in text
    assert "**fanout**: waits for the daemon" in text
    assert "0.50x" in text  # ours / alt in the goal table
    data = as_json(run)
    assert data["scenarios"]["x"]["figures"][0]["verdict"]["met"] is False
    json.dumps(data)


def test_ctxstore_bench_runs_the_harness_of_the_checkout(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ctxstore.cli import main
    from ctxstore.cli.measure import find_bench_checkout

    monkeypatch.chdir(tmp_path)  # found beside the (editable) package, wherever we stand
    assert find_bench_checkout() == REPO
    assert main(["bench", "--list"]) == 0  # it runs `python -m bench` in the checkout
    listed = capfd.readouterr().out
    assert {"open", "commit", "fanout", "memory", "scale"} <= {
        line.split()[0] for line in listed.splitlines() if line.strip()
    }
    assert main(["bench", "--only", "no-such-scenario"]) != 0


def test_ctxstore_bench_outside_a_checkout_says_where_to_run_it(tmp_path: Path) -> None:
    from ctxstore.cli.measure import find_bench_checkout
    from ctxstore.errors import NotFoundError

    (tmp_path / "bench").mkdir()  # a bench/ folder that is not our harness
    with pytest.raises(NotFoundError, match="source checkout"):
        find_bench_checkout([tmp_path, tmp_path.parent])


def test_compare_sets_each_figure_beside_the_previous_run(bench: Any) -> None:
    import bench.compare

    def run(commit: str, figures: dict[str, float]) -> dict[str, Any]:
        def measurement(role: str, median: float) -> dict[str, Any]:
            stats = {"n": 3, "median": median}
            return {"label": role, "role": role, "unit": "ns", "stats": stats}

        return {
            "machine": {"ctxstore commit": commit},
            "scenarios": {"s": {"figures": [
                {"key": key, "title": f"figure {key}", "reference": "floor", "measurements": [
                    measurement("floor", 500.0), measurement("ctxstore", median)]}
                for key, median in figures.items()
            ]}},
        }  # fmt: skip

    old, new = run("old1", {"a": 2_000, "gone": 5}), run("new2", {"a": 1_000, "b": 7})
    lines = bench.compare.table(old, new).splitlines()
    assert lines[0] == (
        "| figure | old1 p50 | new2 p50 | new / old | x reference, old1 | x reference, new2 |"
    )
    # only figures in both runs, the ctxstore measurement (not the floor), new over old,
    # and each run's ctxstore over its reference
    assert lines[2:] == ["| figure a | 2 us | 1 us | 0.50x | 4.00x | 2.00x |"]
