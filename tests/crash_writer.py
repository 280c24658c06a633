"""Child processes for the crash and concurrency tests, and the contexts they write.

Every version's content is a pure function of (slot, version), so anyone can
check a loaded context without knowing how it was written:
``check_context(ctx, slot, version)`` fails on a torn file, on tensors from two
versions mixed, or on config/metadata that belong to another version.

The crash tests run the writer as a forkserver child (``forked_writer``), which
starts in milliseconds; the other tests run this file as a script, a fresh
interpreter each time, as one of these children:

``python tests/crash_writer.py write STORE LOG [options]``
    opens STORE as the writer (recovery runs), prints ``ready``, then commits
    up to ``--commits`` versions to random slots. After each successful
    ``save_context`` it appends ``"slot version\\n"`` to LOG and fsyncs it, so
    the parent knows what was reported durable when it kills the child. The
    parent arms a crash point through CTXSTORE_CRASH_AT / CTXSTORE_CRASH_AFTER
    or simply sends SIGKILL.

``python tests/crash_writer.py read STORE STOP [options]``
    opens STORE read-only and loads every slot in a loop, checking each context
    is whole and that versions never go backwards; prints ``ready`` after the
    first round and a JSON summary at the end. It stops after the round that
    starts once the file STOP exists (or at ``--deadline`` seconds, a safety net).

``python tests/crash_writer.py hold STORE``
    holds STORE's writer lock, prints ``ready`` and waits for EOF on stdin.

``python tests/crash_writer.py probe STORE``
    tries to open STORE as a writer and prints, as JSON, what happened.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import sqlite3
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from ctxstore import Context, NotFoundError, WriterLockedError, faults
from ctxstore.store import PersistentStore

Array = np.ndarray[Any, Any]

MODEL_TYPE = "crashtest"
SHARED_SIZE = 2048  # the "shared" tensor is the same in every version: stored dedup
TENSOR_NAMES = ("stamp", "small", "ramp", "big", "twin_a", "twin_b", "shared", "pair", "empty")


def stamp_of(slot: int, version: int) -> int:
    """The value that marks every tensor of one version."""
    return slot * 100_000 + version


def expected_weights(slot: int, version: int) -> dict[str, Array]:
    """The tensors of (slot, version): a mix of dtypes and sizes, some repeated.

    twin_a and twin_b are equal (dedup inside one version), ``shared`` is equal
    in every version (dedup against stored files), ``pair`` is equal for
    versions 2k and 2k+1 (dedup against the previous version of the slot),
    ``big`` is 256 KiB every fourth version so kills land inside longer writes.
    """
    stamp = stamp_of(slot, version)
    twin = np.full((8, 8), stamp, dtype=np.float64)
    big_len = 32_768 if version % 4 == 0 else 1_024
    return {
        "stamp": np.full(4, stamp, dtype=np.int64),
        "small": np.full(1 + (version * 7) % 50, stamp, dtype=np.float64),
        "ramp": (np.arange(256 * (1 + version % 4), dtype=np.int32) + stamp).reshape(-1, 64),
        "big": np.arange(big_len, dtype=np.float64) + stamp,
        "twin_a": twin,
        "twin_b": twin.copy(),
        "shared": np.arange(SHARED_SIZE, dtype=np.int64),
        "pair": np.full(512, stamp_of(slot, version // 2), dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def expected_config(slot: int, version: int) -> dict[str, Any]:
    return {"slot": slot, "version": version, "stamp": stamp_of(slot, version)}


def expected_metadata(slot: int, version: int) -> dict[str, Any]:
    return {"stamp": stamp_of(slot, version), "note": f"s{slot}v{version}"}


def make_context(slot: int, version: int) -> Context:
    return Context(
        expected_weights(slot, version),
        expected_config(slot, version),
        expected_metadata(slot, version),
    )


def check_context(ctx: Context, slot: int, version: int) -> None:
    """Raise AssertionError unless ``ctx`` is exactly (slot, version), whole and read-only."""
    where = f"slot {slot} version {version}"
    assert (ctx.slot, ctx.version) == (slot, version), (
        f"{where}: context says ({ctx.slot}, {ctx.version})"
    )
    assert tuple(ctx.weights) == TENSOR_NAMES, f"{where}: tensors {tuple(ctx.weights)}"
    for name, want in expected_weights(slot, version).items():
        got = ctx.weights[name]
        assert got.dtype == want.dtype, f"{where} {name}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{where} {name}: shape {got.shape} != {want.shape}"
        assert not got.flags.writeable, f"{where} {name}: array is writeable"
        if not np.array_equal(got, want):
            bad = np.flatnonzero(np.asarray(got).reshape(-1) != want.reshape(-1))
            raise AssertionError(
                f"{where} {name}: {bad.size} wrong values, first at {bad[0]}: "
                f"{got.reshape(-1)[bad[0]]!r} != {want.reshape(-1)[bad[0]]!r}"
            )
    assert dict(ctx.config) == expected_config(slot, version), f"{where}: config {ctx.config}"
    assert dict(ctx.metadata) == expected_metadata(slot, version), (
        f"{where}: metadata {ctx.metadata}"
    )


def next_version(store: PersistentStore, slot: int) -> int:
    """The version the next save of ``slot`` will get: after the newest row, from 1."""
    try:
        return store.resolve(slot, "latest") + 1
    except NotFoundError:
        return 1


# -- the writer child ------------------------------------------------------------------------


def append_durably(fd: int, line: str) -> None:
    os.write(fd, line.encode())
    os.fsync(fd)


@dataclass(frozen=True)
class WriterPlan:
    """What one writer child does: where, how many commits, to which slots."""

    store: str
    log: str
    seed: int = 0
    slots: int = 3
    retention: int = 2
    commits: int = 500


def write_loop(plan: WriterPlan, ready: Callable[[], None]) -> None:
    """Open the store (recovery runs), call ready(), commit and log up to plan.commits versions."""
    rng = random.Random(plan.seed)
    log_fd = os.open(plan.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        with PersistentStore(plan.store, retention=plan.retention) as store:
            ready()
            for _ in range(plan.commits):
                slot = rng.randrange(plan.slots)
                version = next_version(store, slot)
                ctx = make_context(slot, version)
                saved = store.save_context(slot, ctx, model_type=MODEL_TYPE)
                assert saved == version, f"slot {slot}: expected version {version}, got {saved}"
                append_durably(log_fd, f"{slot} {version}\n")
    finally:
        os.close(log_fd)


def write_main(args: argparse.Namespace) -> int:
    plan = WriterPlan(args.store, args.log, args.seed, args.slots, args.retention, args.commits)
    write_loop(plan, lambda: print("ready", flush=True))
    return 0


def forked_writer(plan: WriterPlan, crash_at: str | None, after: int, channel: Connection) -> None:
    """write_loop as the target of a forkserver process, armed as a fresh interpreter would be.

    The forkserver imported ctxstore before CTXSTORE_CRASH_AT was set, so the
    variables are set here and ctxstore.faults is re-executed to read them
    (the store's crash_point reads that module's globals on every call).
    Sends "ready" once the store is open, or the traceback if anything fails.
    """
    for key in ("CTXSTORE_CRASH_AT", "CTXSTORE_CRASH_AFTER"):
        os.environ.pop(key, None)
    if crash_at is not None:
        os.environ["CTXSTORE_CRASH_AT"] = crash_at
        os.environ["CTXSTORE_CRASH_AFTER"] = str(after)
    importlib.reload(faults)
    try:
        write_loop(plan, lambda: channel.send("ready"))
    except BaseException:
        channel.send(traceback.format_exc())
        raise


def die_in_transaction(index: str, channel: Connection) -> None:
    """Begin a write transaction on the index, change rows until pages spill to the file,
    say "ready" and wait to be SIGKILLed: the index is left as a writer killed in the middle
    of a transaction leaves it, in whatever journal mode the store keeps it in (with a
    rollback journal: a hot journal; with WAL: uncommitted frames)."""
    conn = sqlite3.connect(index, isolation_level=None)
    conn.execute("PRAGMA cache_size = 2")  # spill: the journal is synced and pages written
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE slots SET updated_at = updated_at + 1")
    conn.execute("CREATE TABLE spill (data BLOB)")
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 256) "
        "INSERT INTO spill SELECT randomblob(4000) FROM n"
    )
    channel.send("ready")
    time.sleep(600)  # the parent kills us long before


# -- the reader (a child process, or a thread of the test) ------------------------------------


def read_loop(
    store: PersistentStore,
    slots: range,
    should_stop: Callable[[], bool],
    *,
    deadline: float,
    on_first_round: Callable[[], None] = lambda: None,
) -> dict[int, list[int]]:
    """Load every slot until a round that began with should_stop() true; check each load.

    Returns the distinct versions seen per slot, in the order seen. Raises
    AssertionError on a torn or mixed context or a version going backwards.
    The first context of each slot is kept mapped to the end and checked again
    then: retention has long unlinked its files, and it must still read right.
    """
    seen: dict[int, list[int]] = {slot: [] for slot in slots}
    first: dict[int, Context] = {}
    rounds = 0
    while True:
        stop = should_stop() or time.monotonic() > deadline
        for slot in slots:
            ctx = store.load_context(slot)
            assert ctx.version is not None
            check_context(ctx, slot, ctx.version)
            meta = store.get_metadata(slot)  # current again: this version or a newer one
            assert meta.version >= ctx.version, f"slot {slot}: metadata went back"
            assert dict(meta.config) == expected_config(slot, meta.version)
            assert dict(meta.metadata) == expected_metadata(slot, meta.version)
            assert meta.tensors is not None
            assert tuple(t.name for t in meta.tensors) == TENSOR_NAMES
            history = seen[slot]
            if history:
                assert ctx.version >= history[-1], (
                    f"slot {slot}: version went back from {history[-1]} to {ctx.version}"
                )
            if not history or history[-1] != ctx.version:
                history.append(ctx.version)
            first.setdefault(slot, ctx)
        rounds += 1
        if rounds == 1:
            on_first_round()
        if stop:
            break
    for slot, ctx in first.items():
        check_context(ctx, slot, seen[slot][0])
    return seen


def read_main(args: argparse.Namespace) -> int:
    stop_file = Path(args.stop)
    with PersistentStore(args.store, readonly=True) as store:
        seen = read_loop(
            store,
            range(args.slots),
            stop_file.exists,
            deadline=time.monotonic() + args.deadline,
            on_first_round=lambda: print("ready", flush=True),
        )
    print(json.dumps({"pid": os.getpid(), "seen": {str(k): v for k, v in seen.items()}}))
    return 0


# -- the lock holder and the lock prober ------------------------------------------------------


def hold_main(args: argparse.Namespace) -> int:
    with PersistentStore(args.store):
        print("ready", flush=True)
        sys.stdin.read()  # until the parent closes our stdin (or dies)
    return 0


def probe_main(args: argparse.Namespace) -> int:
    try:
        with PersistentStore(args.store):
            outcome: dict[str, Any] = {"kind": "opened"}
    except WriterLockedError as exc:
        outcome = {"kind": exc.kind, "holder_pid": exc.holder_pid, "message": str(exc)}
    print(json.dumps(outcome))
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    write = sub.add_parser("write")
    write.add_argument("store")
    write.add_argument("log")
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--slots", type=int, default=3)
    write.add_argument("--retention", type=int, default=2)
    write.add_argument("--commits", type=int, default=500)
    read = sub.add_parser("read")
    read.add_argument("store")
    read.add_argument("stop")
    read.add_argument("--slots", type=int, default=3)
    read.add_argument("--deadline", type=float, default=120.0)
    for mode in ("hold", "probe"):
        sub.add_parser(mode).add_argument("store")
    return parser.parse_args(argv)


MAINS: Mapping[str, Callable[[argparse.Namespace], int]] = {
    "write": write_main,
    "read": read_main,
    "hold": hold_main,
    "probe": probe_main,
}


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    sys.exit(MAINS[arguments.mode](arguments))
