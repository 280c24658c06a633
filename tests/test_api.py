"""The HTTP admin API: every endpoint with its error cases, auth, limits, metrics and events.

Most tests run a real Daemon in the test's event loop (its uvicorn bound to an
ephemeral port) and call the app in-process through httpx.ASGITransport; the
event stream and one smoke test go over real TCP, and one test runs the
daemon as a process to check the address flag, the log line and the exit
code when the port is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.daemon import start_daemon, wait_for_log
from support.inprocess import TOKEN, FakeQueue, commit, ctx, error_of, replace_jobs, run, running
from support.peers import AsyncPeer

from ctxstore.client import publish
from ctxstore.daemon.config import DaemonConfig
from ctxstore.daemon.events import EventBroadcaster
from ctxstore.daemon.server import Daemon
from ctxstore.errors import IntegrityError
from ctxstore.messages import Ack, Announce, Heartbeat, Subscribe, Subscribed
from ctxstore.versiontable import segment_name

# -- harness --------------------------------------------------------------------------------------


# -- health, readiness ----------------------------------------------------------------------------


def test_health_and_ready(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        assert (await http.get("/health")).json() == {"status": "ok"}
        ready = await http.get("/ready")
        assert ready.status_code == 200
        body = ready.json()
        assert body["ready"] is True and body["reasons"] == [] and body["free_bytes"] > 0

    run(tmp_path, scenario)


def test_not_ready_below_free_space_threshold(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        ready = await http.get("/ready")
        assert ready.status_code == 503
        (reason,) = ready.json()["reasons"]
        assert "ready_min_free_bytes" in reason
        assert (await http.get("/health")).status_code == 200  # alive all the same

    run(tmp_path, scenario, ready_min_free_bytes=2**62)


def test_not_ready_while_stopping(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        daemon.request_stop()
        ready = await http.get("/ready")
        assert ready.status_code == 503
        assert "the daemon is stopping" in ready.json()["reasons"]

    run(tmp_path, scenario)


# -- slots and versions ---------------------------------------------------------------------------


def test_slots_listing_and_filters(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        assert (await http.get("/slots")).json() == {"total": 0, "slots": []}
        await commit(daemon, 1, model_type="llm")
        await commit(daemon, 2, model_type="cnn")
        await commit(daemon, 2, 2.0, model_type="cnn")
        assert daemon.store is not None
        daemon.store.hierarchy.add_to_group(2, "vision")
        body = (await http.get("/slots")).json()
        assert body["total"] == 2
        assert [(s["slot"], s["current_version"], s["n_versions"]) for s in body["slots"]] == [
            (1, 1, 1),
            (2, 2, 2),
        ]
        only_llm = (await http.get("/slots", params={"model_type": "llm"})).json()
        assert [s["slot"] for s in only_llm["slots"]] == [1]
        vision = (await http.get("/slots", params={"group": "vision"})).json()
        assert [s["slot"] for s in vision["slots"]] == [2]
        page = (await http.get("/slots", params={"offset": 1, "limit": 1})).json()
        assert page["total"] == 2 and [s["slot"] for s in page["slots"]] == [2]
        error_of(await http.get("/slots", params={"model_type": "9bad"}), 400, "invalid_input")
        error_of(await http.get("/slots", params={"limit": 0}), 400, "invalid_input")

    run(tmp_path, scenario)


def test_slot_metadata_versions_and_tensor_table(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        await commit(daemon, 3, 1.0)
        await commit(daemon, 3, 2.0)
        slot = (await http.get("/slots/3")).json()
        assert slot["version"] == 2 and slot["current_version"] == 2
        assert slot["model_type"] == "llm"
        assert slot["config"] == {"layers": 2} and slot["metadata"] == {"loss": 2.0}
        assert slot["tensors"] is None
        versions = (await http.get("/slots/3/versions")).json()["versions"]
        assert [v["version"] for v in versions] == [1, 2]
        assert versions[0]["n_tensors"] == 1 and versions[0]["nbytes"] == 16
        one = (await http.get("/slots/3/versions/1")).json()
        assert one["version"] == 1 and one["metadata"] == {"loss": 1.0}
        (tensor,) = one["tensors"]
        assert tensor["name"] == "w" and tensor["dtype"] == "float32"
        assert tensor["shape"] == [4] and tensor["nbytes"] == 16 and tensor["position"] == 0
        assert len(tensor["checksum"]) == 32
        assert (await http.get("/slots/3/versions/latest")).json()["version"] == 2
        assert (await http.get("/slots/3/versions/current")).json()["version"] == 2

    run(tmp_path, scenario)


def test_slot_and_version_errors(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        await commit(daemon, 3)
        error_of(await http.get("/slots/4"), 404, "not_found")
        error_of(await http.get("/slots/4/versions"), 404, "not_found")
        error_of(await http.get("/slots/3/versions/9"), 404, "not_found")
        error_of(await http.get("/slots/3/versions/nosuch"), 404, "not_found")
        for bad in ("-1", "2147483648", "99999999999999999999", "abc", "1.5"):
            error_of(await http.get(f"/slots/{bad}"), 400, "invalid_input")
            error_of(await http.get(f"/slots/{bad}/versions"), 400, "invalid_input")
        for bad in ("0", "-1", "a..b", "9x"):
            error_of(await http.get(f"/slots/3/versions/{bad}"), 400, "invalid_input")

    run(tmp_path, scenario)


def test_aliases_are_set_announced_and_deleted(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        await commit(daemon, 1, 1.0)
        await commit(daemon, 1, 2.0)
        assert daemon.api is not None
        stream = daemon.api.events.subscribe()
        frames = stream.frames()
        await anext(frames)  # the preamble
        put = await http.put("/slots/1/aliases/best", json={"version": 1})
        assert put.status_code == 200
        assert put.json() == {"slot": 1, "alias": "best", "version": 1}
        event = _event(await anext(frames))
        assert event["slot"] == 1 and event["version"] == 2 and event["aliases"] == {"best": 1}
        assert (await http.get("/slots/1/versions/best")).json()["version"] == 1
        moved = await http.put("/slots/1/aliases/best", json={"version": "latest"})
        assert moved.json()["version"] == 2
        assert (await http.put("/slots/1/aliases/prod", json={"version": "best"})).json()[
            "version"
        ] == 2
        assert (await http.delete("/slots/1/aliases/best")).status_code == 204
        error_of(await http.delete("/slots/1/aliases/best"), 404, "not_found")
        error_of(await http.get("/slots/1/versions/best"), 404, "not_found")
        error_of(await http.put("/slots/1/aliases/x", json={"version": 7}), 404, "not_found")
        error_of(await http.put("/slots/9/aliases/x", json={"version": 1}), 404, "not_found")
        message = error_of(
            await http.put("/slots/1/aliases/latest", json={"version": 1}), 400, "invalid_input"
        )
        assert "reserved" in message
        error_of(await http.put("/slots/1/aliases/a..b", json={"version": 1}), 400)
        for body in ({}, {"version": 0}, {"version": True}, {"version": 1, "extra": 1}, []):
            error_of(await http.put("/slots/1/aliases/x", json=body), 400, "invalid_input")
        error_of(
            await http.put(
                "/slots/1/aliases/x",
                content=b"{not json",
                headers={"content-type": "application/json"},
            ),
            400,
            "invalid_input",
        )
        await frames.aclose()

    run(tmp_path, scenario)


def test_pin_and_unpin(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        await commit(daemon, 1)
        await commit(daemon, 1, 2.0)
        pinned = await http.post("/slots/1/versions/1/pin")
        assert pinned.json() == {"slot": 1, "version": 1, "pinned": True}
        versions = (await http.get("/slots/1/versions")).json()["versions"]
        assert [v["pinned"] for v in versions] == [True, False]
        unpinned = await http.delete("/slots/1/versions/1/pin")
        assert unpinned.json() == {"slot": 1, "version": 1, "pinned": False}
        assert (await http.post("/slots/1/versions/latest/pin")).json()["version"] == 2
        error_of(await http.post("/slots/1/versions/5/pin"), 404, "not_found")
        error_of(await http.delete("/slots/2/versions/1/pin"), 404, "not_found")
        error_of(await http.post("/slots/-5/versions/1/pin"), 400)

    run(tmp_path, scenario)


def test_rollback_moves_pointer_table_and_announces(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        for value in (1.0, 2.0, 3.0):
            await commit(daemon, 1, value)
        assert daemon.api is not None and daemon.table is not None and daemon.store is not None
        frames = daemon.api.events.subscribe([1]).frames()
        await anext(frames)
        back = await http.post("/slots/1/rollback")
        assert back.json() == {"slot": 1, "version": 2}
        assert daemon.store.current_version(1) == 2 and daemon.table.get(1) == 2
        assert _event(await anext(frames))["version"] == 2
        explicit = await http.post("/slots/1/rollback", json={"version": 3})
        assert explicit.json()["version"] == 3
        await http.put("/slots/1/aliases/good", json={"version": 1})
        assert (await http.post("/slots/1/rollback", json={"version": "good"})).json()[
            "version"
        ] == 1
        assert (await http.post("/slots/1/rollback", json={"version": None})).status_code == 404
        error_of(await http.post("/slots/1/rollback"), 404, "not_found")  # nothing older than 1
        error_of(await http.post("/slots/1/rollback", json={"version": 9}), 404, "not_found")
        error_of(await http.post("/slots/7/rollback"), 404, "not_found")
        error_of(await http.post("/slots/1/rollback", json={"version": -1}), 400)
        error_of(await http.post("/slots/1/rollback", json={"to": 1}), 400)
        await frames.aclose()

    run(tmp_path, scenario)


def test_verify_reports_problems_and_counts_failures(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        before = (await http.get("/metrics")).text  # both series exist before any run
        assert _sample(before, 'ctxstore_verify_runs_total{result="failed"}') == 0
        assert _sample(before, 'ctxstore_verify_runs_total{result="ok"}') == 0
        await commit(daemon, 1)
        await commit(daemon, 2, 5.0)  # other bytes: not a hard link to slot 1's file
        assert (await http.post("/verify")).json() == {"ok": True, "problems": []}
        assert (await http.post("/slots/1/verify")).json()["ok"] is True
        assert daemon.store is not None
        damaged = daemon.store.root / "slots" / "2" / "1" / "0.npy"
        data = bytearray(damaged.read_bytes())
        data[-1] ^= 0xFF
        os.chmod(damaged, 0o644)
        damaged.write_bytes(bytes(data))
        report = (await http.post("/verify")).json()
        assert report["ok"] is False
        (problem,) = report["problems"]
        assert problem["kind"] == "checksum_mismatch" and problem["slot"] == 2
        assert problem["version"] == 1 and problem["tensor"] == "w"
        assert (await http.post("/slots/1/verify")).json()["ok"] is True
        assert (await http.post("/slots/2/verify", params={"rehash": "false"})).json()["ok"]
        error_of(await http.post("/slots/9/verify"), 404, "not_found")
        metrics = (await http.get("/metrics")).text
        assert _sample(metrics, 'ctxstore_verify_runs_total{result="failed"}') == 1
        assert _sample(metrics, 'ctxstore_verify_runs_total{result="ok"}') == 4
        assert _sample(metrics, "ctxstore_verify_problems_total") == 1

    run(tmp_path, scenario)


# -- hierarchy and groups -------------------------------------------------------------------------


def test_hierarchy_endpoints(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        for child, parent in ((2, 1), (3, 1), (4, 2)):
            set_ = await http.post(f"/nodes/{child}/parent", json={"parent": parent})
            assert set_.json() == {"slot": child, "parent": parent}
        assert (await http.get("/nodes/4/parent")).json() == {"slot": 4, "parent": 2}
        assert (await http.get("/nodes/1/parent")).json() == {"slot": 1, "parent": None}
        assert (await http.get("/nodes/1/children")).json()["children"] == [2, 3]
        assert (await http.get("/nodes/4/ancestors")).json()["ancestors"] == [1, 2]
        assert (await http.get("/nodes/1/descendants")).json()["descendants"] == [2, 3, 4]
        assert (await http.get("/nodes/4/root")).json() == {"slot": 4, "root": 1}
        nodes = (await http.get("/hierarchy")).json()["nodes"]
        assert {n["slot"]: n["parent"] for n in nodes} == {1: None, 2: 1, 3: 1, 4: 2}
        stats = (await http.get("/hierarchy/stats")).json()
        assert stats == {"nodes": 4, "roots": 1, "max_depth": 2, "groups": 0}
        root = await http.post("/nodes/2/parent", json={"parent": None})
        assert root.json() == {"slot": 2, "parent": None}
        assert (await http.get("/nodes/4/root")).json()["root"] == 2
        assert (await http.get("/hierarchy/stats")).json()["roots"] == 2

    run(tmp_path, scenario)


def test_node_hierarchy_answers_everything_in_one_call(tmp_path: Path) -> None:
    """GET /nodes/{slot}/hierarchy: parent, children, ancestors, descendants, root and
    groups, equal to what the single-purpose endpoints answer; 404 for an unknown node."""

    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        for child, parent in ((2, 1), (3, 1), (4, 2), (5, 4)):
            await http.post(f"/nodes/{child}/parent", json={"parent": parent})
        for group in ("vision", "edge"):
            await http.post("/nodes/2/groups", json={"group": group})
        answer = await http.get("/nodes/2/hierarchy")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "slot": 2,
            "parent": 1,
            "children": [4],
            "ancestors": [1],
            "descendants": [4, 5],
            "root": 1,
            "groups": ["edge", "vision"],
        }
        for slot in (1, 5):
            whole = (await http.get(f"/nodes/{slot}/hierarchy")).json()
            for part in ("parent", "children", "ancestors", "descendants", "root", "groups"):
                single = (await http.get(f"/nodes/{slot}/{part}")).json()
                assert whole[part] == single[part], (slot, part)
        error_of(await http.get("/nodes/99/hierarchy"), 404, "not_found")

    run(tmp_path, scenario)


def test_hierarchy_counts_every_node_as_the_node_endpoints_do(tmp_path: Path) -> None:
    """A slot given only a group is a node (GET /nodes/{slot}/parent answers null, a root):
    /hierarchy and /hierarchy/stats count it too, and agree with each other."""

    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        for slot in (5, 6):
            assert (await http.post(f"/nodes/{slot}/groups", json={"group": "vision"})).is_success
        await http.post("/nodes/6/groups", json={"group": "edge"})
        assert (await http.get("/nodes/5/parent")).json() == {"slot": 5, "parent": None}
        stats = (await http.get("/hierarchy/stats")).json()
        assert stats == {"nodes": 2, "roots": 2, "max_depth": 0, "groups": 2}
        await http.post("/nodes/7/parent", json={"parent": 6})  # 6: in the tree and a group
        await http.post("/nodes/8/parent", json={"parent": 7})
        stats = (await http.get("/hierarchy/stats")).json()
        assert stats == {"nodes": 4, "roots": 2, "max_depth": 2, "groups": 2}
        nodes = (await http.get("/hierarchy")).json()["nodes"]
        assert nodes == [
            {"slot": 5, "parent": None},
            {"slot": 6, "parent": None},
            {"slot": 7, "parent": 6},
            {"slot": 8, "parent": 7},
        ]
        assert daemon.store is not None
        assert daemon.store.hierarchy.stats().nodes == len(nodes)
        await http.delete("/nodes/5/groups/vision")  # no group, no parent: no longer a node
        assert (await http.get("/hierarchy/stats")).json()["nodes"] == 3
        error_of(await http.get("/nodes/5/parent"), 404, "not_found")

    run(tmp_path, scenario)


def test_hierarchy_errors(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        await http.post("/nodes/2/parent", json={"parent": 1})
        message = error_of(await http.post("/nodes/1/parent", json={"parent": 2}), 409, "conflict")
        assert "cycle" in message
        error_of(await http.post("/nodes/5/parent", json={"parent": 5}), 409, "conflict")
        for path in ("parent", "children", "ancestors", "descendants", "root", "groups"):
            error_of(await http.get(f"/nodes/77/{path}"), 404, "not_found")
            error_of(await http.get(f"/nodes/-1/{path}"), 400, "invalid_input")
        for body in ({}, {"parent": "1"}, {"parent": True}, {"parent": -1}, {"parent": 2**31}):
            error_of(await http.post("/nodes/3/parent", json=body), 400, "invalid_input")
        error_of(await http.post("/nodes/3/parent", json={"parent": 1, "x": 0}), 400)

    run(tmp_path, scenario)


def test_group_endpoints_and_errors(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        added = await http.post("/nodes/5/groups", json={"group": "vision"})
        assert added.status_code == 201 and added.json() == {"slot": 5, "group": "vision"}
        await http.post("/nodes/6/groups", json={"group": "vision"})
        await http.post("/nodes/6/groups", json={"group": "edge"})
        assert (await http.get("/nodes/6/groups")).json() == {
            "slot": 6,
            "groups": ["edge", "vision"],
        }
        assert (await http.get("/groups")).json()["groups"] == [
            {"name": "edge", "members": 1},
            {"name": "vision", "members": 2},
        ]
        assert (await http.get("/groups/vision")).json() == {"name": "vision", "slots": [5, 6]}
        assert (await http.delete("/nodes/6/groups/vision")).status_code == 204
        assert (await http.get("/groups/vision")).json()["slots"] == [5]
        error_of(await http.delete("/nodes/6/groups/vision"), 404, "not_found")
        error_of(await http.get("/groups/nobody"), 404, "not_found")
        error_of(await http.get("/groups/bad..name"), 400, "invalid_input")
        error_of(await http.post("/nodes/5/groups", json={"group": "9x"}), 400, "invalid_input")
        error_of(await http.post("/nodes/5/groups", json={"group": 5}), 400, "invalid_input")
        error_of(await http.post("/nodes/5/groups", json={}), 400, "invalid_input")

    run(tmp_path, scenario)


# -- readers, acks and metrics --------------------------------------------------------------------


def test_readers_lag_memory_and_ack_latency(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        await commit(daemon, 1)
        peer = await AsyncPeer.connect(daemon.config.socket, "worker-a")
        try:
            await peer.send(Subscribe(request_id=1, all=True))
            assert isinstance(await peer.next(), Subscribed)
            beat = Heartbeat(pid=os.getpid(), name="worker-a", held=((1, 1),), uss=7, pss=9)
            await peer.send(beat)
            await commit(daemon, 1, 2.0)
            announce = await peer.next()
            assert isinstance(announce, Announce) and announce.version == 2
            await _until(lambda: _readers(http), lambda rows: bool(rows) and rows[0]["pss"] == 9)
            (row,) = await _readers(http)
            assert row["pid"] == os.getpid() and row["name"] == "worker-a"
            assert row["held"] == {"1": 1} and row["lag"] == {"1": 1}
            metrics = (await http.get("/metrics")).text
            assert _sample(metrics, 'ctxstore_peers_connected{role="reader"}') == 1
            assert _sample(metrics, "ctxstore_reader_lag_versions", 'name="worker-a"') == 1
            assert _sample(metrics, "ctxstore_commit_to_ack_seconds_count") == 0
            await peer.send(Ack(slot=1, version=2))
            await peer.send(Ack(slot=1, version=2))  # one sample per reader and announcement
            await peer.send(Heartbeat(pid=os.getpid(), name="w", held=((1, 2),), uss=3, pss=4))
            await _until(lambda: _readers(http), lambda rows: rows[0]["pss"] == 4)
            (row,) = await _readers(http)
            assert row["held"] == {"1": 2} and row["lag"] == {"1": 0} and row["uss"] == 3
            metrics = (await http.get("/metrics")).text
            assert _sample(metrics, "ctxstore_commit_to_ack_seconds_count") == 1
            assert _sample(metrics, "ctxstore_reader_lag_versions", 'name="worker-a"') == 0
            assert _sample(metrics, "ctxstore_reader_pss_bytes", 'name="worker-a"') == 4
        finally:
            await peer.close()
        await _until(lambda: _readers(http), lambda rows: rows == [])

    run(tmp_path, scenario)


def test_metrics_count_commits_and_bytes(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        response = await http.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        before = response.text
        for name in (
            "ctxstore_commits_total",
            "ctxstore_commit_duration_seconds_bucket",
            "ctxstore_commit_written_bytes_total",
            "ctxstore_commit_deduplicated_bytes_total",
            "ctxstore_commit_to_ack_seconds_bucket",
            "ctxstore_peers_connected",
            "ctxstore_verify_problems_total",
            "ctxstore_daemon_cpu_seconds_total",
            "ctxstore_daemon_memory_bytes",
        ):
            assert name in before, name
        assert _sample(before, "ctxstore_commits_total") == 0
        assert daemon.committer is not None
        await daemon.committer.commit(1, ctx(1.0, extra=8))
        await daemon.committer.commit(1, ctx(2.0, extra=8))  # "x" is unchanged: hard-linked
        after = (await http.get("/metrics")).text
        assert _sample(after, "ctxstore_commits_total") == 2
        assert _sample(after, "ctxstore_commit_duration_seconds_count") == 2
        header = 128  # every .npy file here has a 128-byte header
        w, x = header + 16, header + 64
        assert _sample(after, "ctxstore_commit_written_bytes_total") == w + x + w
        assert _sample(after, "ctxstore_commit_deduplicated_bytes_total") == x

    run(tmp_path, scenario)


# -- jobs -----------------------------------------------------------------------------------------


def test_jobs_without_a_queue_are_503(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        if daemon.jobs is not None:
            await daemon.jobs.stop()
        daemon.jobs = None
        body = {"slot": 1, "node_type": "llm"}
        for response in (
            await http.post("/jobs", json=body),
            await http.get("/jobs"),
            await http.get("/jobs/1"),
            await http.delete("/jobs/1"),
        ):
            assert "job queue" in error_of(response, 503)

    run(tmp_path, scenario)


def test_jobs_submit_list_get_cancel(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        await replace_jobs(daemon, FakeQueue())
        created = await http.post(
            "/jobs", json={"slot": 4, "node_type": "llm", "config": {"n": 2}, "priority": 5}
        )
        assert created.status_code == 201
        job = created.json()["job"]
        assert job["slot"] == 4 and job["config"] == {"n": 2} and job["priority"] == 5
        await http.post("/jobs", json={"slot": 5, "node_type": "llm"})
        listed = (await http.get("/jobs")).json()["jobs"]
        assert [j["id"] for j in listed] == [2, 1]
        assert (await http.get(f"/jobs/{job['id']}")).json()["job"]["state"] == "pending"
        metrics = (await http.get("/metrics")).text
        assert _sample(metrics, "ctxstore_jobs_queue_depth") == 2
        assert _sample(metrics, 'ctxstore_jobs{state="pending"}') == 2
        cancelled = await http.delete("/jobs/1")
        assert cancelled.json()["job"]["state"] == "cancelled"
        assert [j["id"] for j in (await http.get("/jobs?state=cancelled")).json()["jobs"]] == [1]
        error_of(await http.delete("/jobs/1"), 409, "conflict")
        error_of(await http.get("/jobs/99"), 404, "not_found")
        error_of(await http.post("/jobs", json={"slot": 1, "node_type": "nope"}), 404)
        error_of(await http.get("/jobs/0"), 400)
        error_of(await http.get("/jobs?state=weird"), 400)
        for body in (
            {"node_type": "llm"},
            {"slot": -1, "node_type": "llm"},
            {"slot": 1, "node_type": "llm", "priority": "high"},
            {"slot": 1, "node_type": "llm", "config": []},
        ):
            error_of(await http.post("/jobs", json=body), 400, "invalid_input")

    run(tmp_path, scenario)


def test_job_calls_wait_for_a_commit_off_the_event_loop(tmp_path: Path) -> None:
    """A commit holds the store's write lock while it fsyncs; a POST /jobs that waits for it
    must not freeze the loop (health checks, readers and /events run on it)."""

    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        assert daemon.store is not None
        taken, release = threading.Event(), threading.Event()

        def hold_the_write_lock() -> None:  # what a long commit does
            with daemon.store._write_lock:  # type: ignore[union-attr]
                taken.set()
                release.wait(30)

        holder = threading.Thread(target=hold_the_write_lock)
        holder.start()
        try:
            assert taken.wait(10)
            submit = asyncio.ensure_future(
                http.post("/jobs", json={"slot": 3, "node_type": "cnn", "config": {"seed": 1}})
            )
            await asyncio.sleep(0.05)
            health = await asyncio.wait_for(http.get("/health"), 10)
            assert health.status_code == 200
            assert not submit.done()  # still waiting for the lock, yet the loop answered
        finally:
            release.set()
            holder.join(10)
        created = await asyncio.wait_for(submit, 30)
        assert created.status_code == 201, created.text
        job = created.json()["job"]
        assert (await http.get(f"/jobs/{job['id']}")).json()["job"]["slot"] == 3

    run(tmp_path, scenario)


# -- errors, limits, auth -------------------------------------------------------------------------


def test_unknown_routes_and_methods_answer_json(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        error_of(await http.get("/nope"), 404, "not_found")
        response = await http.patch("/slots")
        error_of(response, 405, "method_not_allowed")
        assert response.headers["allow"] == "GET"
        both = await http.patch("/slots/1/aliases/best")  # two routes share this path
        assert error_of(both, 405) and both.headers["allow"] == "DELETE, PUT"

    run(tmp_path, scenario)


def test_internal_errors_are_generic_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        assert daemon.store is not None
        store = daemon.store.view  # what the read routes read through

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("secret internals /etc/shadow")

        def damaged(*args: object, **kwargs: object) -> None:
            raise IntegrityError("slot 1 version 1 is recorded but its files are missing")

        store.list_slots = broken  # type: ignore[method-assign]
        message = error_of(await http.get("/slots"), 500, "internal")
        assert "secret" not in message and "RuntimeError" not in message
        store.list_versions = damaged  # type: ignore[method-assign]
        assert "files are missing" in error_of(
            await http.get("/slots/1/versions"), 500, "integrity"
        )

    with caplog.at_level("ERROR", logger="ctxstore.daemon.api"):
        run(tmp_path, scenario)
    assert "secret internals" in caplog.text  # the traceback went to the log


def test_request_bodies_are_size_limited(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        big = {"slot": 1, "node_type": "llm", "config": {"pad": "x" * 2000}}
        message = error_of(await http.post("/jobs", json=big), 413, "invalid_input")
        assert "1024" in message

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(5):
                yield b" " * 400

        chunked = await http.post(
            "/nodes/1/parent", content=chunks(), headers={"content-type": "application/json"}
        )
        error_of(chunked, 413)

        async def small() -> AsyncIterator[bytes]:
            yield b'{"parent":'
            yield b" null}"

        fine = await http.post(
            "/nodes/1/parent", content=small(), headers={"content-type": "application/json"}
        )
        assert fine.json() == {"slot": 1, "parent": None}

    run(tmp_path, scenario, max_body_bytes=1024)


def _token_file(tmp_path: Path, token: str = TOKEN) -> Path:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def test_token_guards_every_mutating_endpoint(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        await commit(daemon, 1)
        mutating = [
            ("POST", "/nodes/2/parent", {"parent": 1}),
            ("POST", "/nodes/2/groups", {"group": "g"}),
            ("DELETE", "/nodes/2/groups/g", None),
            ("PUT", "/slots/1/aliases/best", {"version": 1}),
            ("DELETE", "/slots/1/aliases/best", None),
            ("POST", "/slots/1/versions/1/pin", None),
            ("DELETE", "/slots/1/versions/1/pin", None),
            ("POST", "/slots/1/rollback", {"version": 1}),
            ("POST", "/verify", None),
            ("POST", "/slots/1/verify", None),
            ("POST", "/jobs", {"slot": 1, "node_type": "llm"}),
            ("DELETE", "/jobs/1", None),
        ]
        for method, path, body in mutating:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
                response = await http.request(method, path, json=body, headers=headers)
                error_of(response, 401, "unauthorized")
                assert response.headers["www-authenticate"].startswith("Bearer")
        assert (await http.get("/slots/1")).status_code == 200  # reads stay open
        assert (await http.get("/metrics")).status_code == 200
        await replace_jobs(daemon, FakeQueue())
        auth = {"authorization": f"Bearer {TOKEN}"}
        for method, path, body in mutating:
            response = await http.request(method, path, json=body, headers=auth)
            assert response.status_code < 300, (method, path, response.text)

    run(tmp_path, scenario, token_file=_token_file(tmp_path))


def test_a_new_token_applies_after_reload(tmp_path: Path) -> None:
    token_file = _token_file(tmp_path)

    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        old = {"authorization": f"Bearer {TOKEN}"}
        assert (await http.post("/nodes/1/parent", json={"parent": None}, headers=old)).is_success
        new_token = "another-token-abcdefghijklmnop"
        token_file.write_text(new_token)
        daemon.config = daemon.config.replace(token_file=token_file)  # what SIGHUP does
        error_of(await http.post("/nodes/1/parent", json={"parent": None}, headers=old), 401)
        new = {"authorization": f"Bearer {new_token}"}
        assert (await http.post("/nodes/1/parent", json={"parent": None}, headers=new)).is_success
        token_file.chmod(0o644)  # a token file others may read is refused: fail closed
        daemon.config = daemon.config.replace(token_file=token_file)
        message = error_of(await http.post("/nodes/1/parent", json={}, headers=new), 503)
        assert "token file" in message
        assert (await http.get("/nodes/1/parent")).is_success

    run(tmp_path, scenario, token_file=token_file)


def test_job_errors_are_shown_only_to_token_holders(tmp_path: Path) -> None:
    """With a token, GET /jobs and /jobs/{id} without it show a failed job's state but not
    its error text (it can describe files the caller may not read); with it, both."""
    broken = tmp_path / "broken.npy"
    broken.write_bytes(b"not an npy file at all")

    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        auth = {"authorization": f"Bearer {TOKEN}"}
        body = {"slot": 1, "node_type": "file", "config": {"path": str(broken)}}
        submitted = await http.post("/jobs", json=body, headers=auth)
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["job"]["id"]
        assert daemon.jobs is not None
        await daemon.jobs.wait(job_id)
        for anonymous in ((await http.get(f"/jobs/{job_id}")).json()["job"],
                          (await http.get("/jobs")).json()["jobs"][0]):  # fmt: skip
            assert anonymous["state"] == "failed" and anonymous["attempts"] == 1
            assert anonymous["error"] is None and anonymous["error_hidden"] is True
        for holder in ((await http.get(f"/jobs/{job_id}", headers=auth)).json()["job"],
                       (await http.get("/jobs", headers=auth)).json()["jobs"][0]):  # fmt: skip
            assert holder["state"] == "failed" and holder["error_hidden"] is False
            assert holder["error"]

    run(tmp_path, scenario, token_file=_token_file(tmp_path), jobs_max_attempts=1)


def test_job_errors_are_shown_to_everyone_without_a_token(tmp_path: Path) -> None:
    broken = tmp_path / "broken.npy"
    broken.write_bytes(b"not an npy file at all")

    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        body = {"slot": 1, "node_type": "file", "config": {"path": str(broken)}}
        job_id = (await http.post("/jobs", json=body)).json()["job"]["id"]
        assert daemon.jobs is not None
        await daemon.jobs.wait(job_id)
        job = (await http.get(f"/jobs/{job_id}")).json()["job"]
        assert job["error"] and job["error_hidden"] is False

    run(tmp_path, scenario, jobs_max_attempts=1)


def test_cross_origin_writes_and_foreign_hosts_are_refused(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        evil = {"origin": "http://evil.example"}
        error_of(await http.post("/nodes/1/parent", json={"parent": None}, headers=evil), 403)
        assert (await http.get("/slots", headers=evil)).status_code == 200
        same = {"origin": "http://127.0.0.1"}
        assert (await http.post("/nodes/1/parent", json={"parent": None}, headers=same)).is_success
        rebound = {"host": "evil.example:8470"}
        error_of(await http.get("/slots", headers=rebound), 400, "invalid_input")
        assert (await http.get("/slots", headers={"host": "localhost:1"})).status_code == 200

    run(tmp_path, scenario)


# -- OpenAPI and the event stream over TCP --------------------------------------------------------


def test_openapi_and_docs(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        schema = (await http.get("/openapi.json")).json()
        paths = schema["paths"]
        for path in (
            "/nodes/{slot}/parent",
            "/nodes/{slot}/children",
            "/nodes/{slot}/hierarchy",
            "/nodes/{slot}/ancestors",
            "/nodes/{slot}/descendants",
            "/nodes/{slot}/root",
            "/hierarchy",
            "/hierarchy/stats",
            "/nodes/{slot}/groups",
            "/nodes/{slot}/groups/{name}",
            "/groups",
            "/groups/{name}",
            "/slots",
            "/slots/{slot}",
            "/slots/{slot}/versions",
            "/slots/{slot}/versions/{version}",
            "/slots/{slot}/aliases/{name}",
            "/slots/{slot}/versions/{version}/pin",
            "/slots/{slot}/rollback",
            "/verify",
            "/slots/{slot}/verify",
            "/readers",
            "/health",
            "/ready",
            "/metrics",
            "/events",
            "/jobs",
            "/jobs/{job_id}",
        ):
            assert path in paths, path
        assert paths["/slots/{slot}/rollback"]["post"]["security"] == [{"bearerAuth": []}, {}]
        assert "401" in paths["/slots/{slot}/rollback"]["post"]["responses"]
        assert "security" not in paths["/slots"]["get"]
        docs = await http.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()

    run(tmp_path, scenario)


def test_events_stream_over_tcp(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, _: httpx.AsyncClient) -> None:
        assert daemon.api is not None
        base = f"http://127.0.0.1:{daemon.api.port}"
        async with (
            httpx.AsyncClient(base_url=base, trust_env=False, timeout=30) as http,
            http.stream("GET", "/events", params={"slot": [1, 2]}) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.aiter_lines()
            assert await anext(lines) == ": ctxstore events"  # subscribed from here on
            await commit(daemon, 3)  # filtered out
            await commit(daemon, 1)
            event = await _next_event(lines)
            assert event["event"] == "announce"
            data = json.loads(event["data"])
            assert data["slot"] == 1 and data["version"] == 1 and data["model_type"] == "llm"
            assert int(event["id"]) == data["seq"]
            assert (await http.get("/health")).json() == {"status": "ok"}

    run(tmp_path, scenario)


def test_event_streams_past_the_limit_get_a_clear_503(tmp_path: Path) -> None:
    """limits.event_streams open /events streams at most: one more is a 503 that names the
    limit, the rest of the API answers, and a closed stream's place is free again."""

    async def scenario(daemon: Daemon, _: httpx.AsyncClient) -> None:
        assert daemon.api is not None
        base = f"http://127.0.0.1:{daemon.api.port}"
        async with contextlib.AsyncExitStack() as streams:
            http = await streams.enter_async_context(
                httpx.AsyncClient(base_url=base, trust_env=False, timeout=30)
            )
            first = await streams.enter_async_context(http.stream("GET", "/events"))
            async with http.stream("GET", "/events") as second:
                for response in (first, second):
                    assert response.status_code == 200
                    assert await anext(response.aiter_lines()) == ": ctxstore events"
                message = error_of(await http.get("/events"), 503, "daemon_unavailable")
                assert "limits.event_streams = 2" in message, message
                assert (await http.get("/health")).status_code == 200
            for _ in range(500):  # the server notices the closed stream on its next write
                if len(daemon.api.events) < 2:
                    break
                await commit(daemon, 1)
                await asyncio.sleep(0.01)
            async with http.stream("GET", "/events") as again:
                assert again.status_code == 200

    run(tmp_path, scenario, max_event_streams=2)


def test_http_connections_past_the_limit_get_a_503_and_are_closed(tmp_path: Path) -> None:
    """limits.http_connections open TCP connections at most, idle ones included: one more
    is answered 503 and closed, so HTTP never takes the descriptors the socket needs."""

    async def scenario(daemon: Daemon, _: httpx.AsyncClient) -> None:
        assert daemon.api is not None
        port = daemon.api.port
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await asyncio.wait_for(reader.read(), 30)  # the 503, then EOF
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), answer
        error = json.loads(body)["error"]
        assert error["type"] == "daemon_unavailable"
        assert "limits.http_connections = 3" in error["message"]
        writer.close()
        for _, idle_writer in idle:
            idle_writer.close()
            await idle_writer.wait_closed()
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=30) as http:
            for _ in range(200):  # the server sees the idle ones close on its next loop turn
                response = await http.get("/health")
                if response.status_code == 200:
                    break
                await asyncio.sleep(0.01)
            assert response.json() == {"status": "ok"}

    run(tmp_path, scenario, max_http_connections=3)


def test_event_stream_heartbeats_coalesces_and_drops() -> None:
    async def scenario() -> None:
        broadcaster = EventBroadcaster(heartbeat=0.01, max_pending=2)
        stream = broadcaster.subscribe()
        frames = stream.frames()
        assert (await anext(frames)).startswith(": ctxstore events")
        assert await anext(frames) == ": heartbeat\n\n"
        for seq, (slot, version) in enumerate([(1, 1), (2, 1), (1, 2), (3, 1)], start=1):
            broadcaster.publish(Announce(slot=slot, version=version, seq=seq, committed_at=1.0))
        # slot 1 coalesced to version 2; slot 2 dropped for room; order by announcement
        assert await anext(frames) == 'event: dropped\ndata: {"dropped":1}\n\n'
        assert _event(await anext(frames))["version"] == 2
        assert _event(await anext(frames))["slot"] == 3
        broadcaster.close()
        assert [frame async for frame in frames] == []
        assert len(broadcaster) == 0
        late = broadcaster.subscribe().frames()
        assert [frame async for frame in late][1:] == []

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_stop_ends_open_event_streams(tmp_path: Path) -> None:
    async def main() -> None:
        config = DaemonConfig(
            store=tmp_path / "store", socket=tmp_path / "ctx.sock", http="127.0.0.1:0"
        )
        daemon = Daemon(config)
        await daemon.start()
        assert daemon.api is not None
        base = f"http://127.0.0.1:{daemon.api.port}"
        async with (
            httpx.AsyncClient(base_url=base, trust_env=False, timeout=30) as http,
            http.stream("GET", "/events") as response,
        ):
            lines = response.aiter_lines()
            await anext(lines)
            stopping = asyncio.create_task(daemon.stop("test"))
            rest = [line async for line in lines]  # ends: the daemon closed the stream
            assert all(not line.startswith("event:") for line in rest)
            await asyncio.wait_for(stopping, 20)

    asyncio.run(asyncio.wait_for(main(), 60))


# -- the daemon process ---------------------------------------------------------------------------


def _start_process(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    daemon = start_daemon(tmp_path, tmp_path / "store", tmp_path / "ctx.sock", None, *extra)
    return daemon.proc, daemon.log


@pytest.fixture
def cleanup_process(tmp_path: Path) -> Any:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    table = Path("/dev/shm" + segment_name(tmp_path / "store"))
    if table.exists():
        table.unlink()


def test_daemon_process_serves_http_and_stops_cleanly(
    tmp_path: Path, cleanup_process: list[subprocess.Popen[bytes]]
) -> None:
    proc, log = _start_process(tmp_path, "--http", "127.0.0.1:0")
    cleanup_process.append(proc)
    port = int(wait_for_log(proc, log, r"http listening on 127\.0\.0\.1:(\d+)")[1])
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/openapi.json").json()["info"]["title"] == "ctxstore admin API"
        assert http.post("/nodes/1/parent", json={"parent": None}).status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    probe = socket.socket()
    try:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # the port is closed again
    finally:
        probe.close()


def test_sighup_rotates_the_token_and_applies_retention(
    tmp_path: Path, cleanup_process: list[subprocess.Popen[bytes]]
) -> None:
    """A real SIGHUP: the old token is refused and the new one works, retention changes;
    a token file that became unsafe makes the reload fail and the running token stays."""
    token_file = _token_file(tmp_path)
    config = tmp_path / "ctxstore.toml"
    config.write_text(f'token_file = "{token_file}"\nretention = 5\n')
    proc, log = _start_process(tmp_path, "--http", "127.0.0.1:0", "--config", str(config))
    cleanup_process.append(proc)
    port = int(wait_for_log(proc, log, r"http listening on 127\.0\.0\.1:(\d+)")[1])
    old = {"authorization": f"Bearer {TOKEN}"}
    new_token = "another-token-abcdefghijklmnop"
    new = {"authorization": f"Bearer {new_token}"}

    def mutate(http: httpx.Client, headers: dict[str, str]) -> int:
        return http.post("/nodes/1/parent", json={"parent": None}, headers=headers).status_code

    def reload_until(done: Callable[[], bool]) -> None:
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while not done():
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
            time.sleep(0.05)

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as http:
        for value in range(1, 5):
            publish(1, ctx(float(value)), socket=tmp_path / "ctx.sock")
        assert mutate(http, old) == 200 and mutate(http, new) == 401
        token_file.write_text(new_token + "\n")
        config.write_text(f'token_file = "{token_file}"\nretention = 2\n')
        reload_until(lambda: mutate(http, old) == 401)
        assert mutate(http, new) == 200
        publish(1, ctx(5.0), socket=tmp_path / "ctx.sock")
        versions = http.get("/slots/1/versions").json()["versions"]
        assert [v["version"] for v in versions] == [4, 5]  # retention 2 from now on
        token_file.chmod(0o644)  # others may read it: unsafe, so this reload is refused
        proc.send_signal(signal.SIGHUP)
        wait_for_log(proc, log, r"configuration not reloaded, the running one stays")
        assert mutate(http, new) == 200 and mutate(http, old) == 401
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


def test_daemon_exits_1_when_the_port_is_taken(
    tmp_path: Path, cleanup_process: list[subprocess.Popen[bytes]]
) -> None:
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc, log = _start_process(tmp_path, "--http", f"127.0.0.1:{port}")
        cleanup_process.append(proc)
        assert proc.wait(30) == 1
    finally:
        taken.close()
    text = log.read_text(errors="replace")
    assert f"http address 127.0.0.1:{port} is already in use" in text
    assert "Traceback" not in text
    assert not (tmp_path / "ctx.sock").exists()


def test_http_off_serves_no_api(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, http="off") as daemon:
            assert daemon.api is None

    asyncio.run(main())


# -- helpers --------------------------------------------------------------------------------------


def _event(frame: str) -> dict[str, Any]:
    fields = dict(line.split(": ", 1) for line in frame.strip().splitlines())
    assert fields["event"] == "announce"
    data: dict[str, Any] = json.loads(fields["data"])
    return data


async def _next_event(lines: AsyncIterator[str]) -> dict[str, str]:
    event: dict[str, str] = {}
    async for line in lines:
        if line.startswith(":"):
            continue
        if not line:
            if "event" in event:
                return event
            event = {}
            continue
        key, _, value = line.partition(": ")
        event[key] = value
    raise AssertionError("the stream ended")


def _sample(text: str, name: str, label: str | None = None) -> float:
    """The value of ``name`` (exact, labels included) or of its series that has ``label``."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        if metric == name or (
            label is not None and metric.partition("{")[0] == name and label in metric
        ):
            return float(value)
    raise AssertionError(f"no sample {name} {label or ''} in:\n{text}")


async def _readers(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = (await http.get("/readers")).json()["readers"]
    return rows


async def _until(
    fetch: Callable[[], Awaitable[Any]], done: Callable[[Any], Any], attempts: int = 2000
) -> None:
    """Poll ``fetch`` until ``done`` holds (the daemon handles frames on the same loop)."""
    for _ in range(attempts):
        if done(await fetch()):
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")
