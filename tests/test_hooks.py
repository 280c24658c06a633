"""Hooks: priority order, pre-commit rejection, post-commit isolation, loading, built-ins."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import textwrap
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ctxstore.context import Context
from ctxstore.daemon.hooks import (
    BEST_ALIAS,
    ENTRY_POINT_GROUP,
    BestVersionTracker,
    CommitEvent,
    HookOutcome,
    Hooks,
    RegisteredHook,
    finite_check,
    load_hook,
)
from ctxstore.errors import ConflictError, InvalidInputError, NotFoundError, ReadOnlyError
from ctxstore.store import PersistentStore, StoreView


@dataclass(frozen=True)
class Spec:
    """Shaped like daemon.config.HookSpec."""

    target: str
    priority: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)


def ctx(value: float = 1.0, **metadata: Any) -> Context:
    return Context({"w": np.full(4, value, np.float32)}, None, metadata)


def event_for(store: PersistentStore, slot: int, version: int) -> CommitEvent:
    return CommitEvent(slot, version, store.load_context(slot, version), None, store)


def post(hooks: Hooks, event: CommitEvent) -> list[HookOutcome]:
    return asyncio.run(hooks.post_commit(event))


def pre_recorder(calls: list[str], name: str) -> Callable[[int, Context], None]:
    def hook(slot: int, context: Context) -> None:
        calls.append(name)

    return hook


# -- order --------------------------------------------------------------------------------------


def test_pre_hooks_run_by_priority_higher_first_ties_in_configured_order() -> None:
    calls: list[str] = []
    hooks = Hooks(
        [
            RegisteredHook("low", -1, pre_recorder(calls, "low")),
            RegisteredHook("mid-a", 5, pre_recorder(calls, "mid-a")),
            RegisteredHook("zero", 0, pre_recorder(calls, "zero")),
            RegisteredHook("mid-b", 5, pre_recorder(calls, "mid-b")),
            RegisteredHook("high", 9, pre_recorder(calls, "high")),
        ]
    )
    hooks.pre_commit(1, ctx())
    assert calls == ["high", "mid-a", "mid-b", "zero", "low"]
    assert hooks.names == {"pre": calls, "post": []}


def test_post_hooks_run_by_priority(store: PersistentStore) -> None:
    calls: list[str] = []

    def recorder(name: str) -> Callable[[CommitEvent], None]:
        return lambda event: calls.append(name)

    hooks = Hooks(
        post=[RegisteredHook(n, p, recorder(n)) for n, p in [("a", 0), ("b", 3), ("c", -2)]]
    )
    version = store.save_context(1, ctx())
    outcomes = post(hooks, event_for(store, 1, version))
    assert calls == ["b", "a", "c"]
    assert [o.name for o in outcomes] == ["b", "a", "c"]
    assert all(o.ok and o.error is None and o.seconds >= 0 for o in outcomes)


def test_builtins_come_first_among_equal_priorities(tmp_path: Path, monkeypatch: Any) -> None:
    module = write_module(tmp_path, monkeypatch, "def check(slot, context):\n    pass\n")
    hooks = Hooks.load(
        [Spec(f"{module}:check"), Spec(f"{module}:check", priority=1)],
        [],
        check_finite=True,
        best_metric="loss",
    )
    assert hooks.names == {
        "pre": [f"{module}:check", "builtin:finite_check", f"{module}:check"],
        "post": ["builtin:best_version"],
    }
    assert Hooks.load([], []).names == {"pre": [], "post": []}


# -- pre-commit rejection -----------------------------------------------------------------------


def test_rejection_stops_the_commit_and_nothing_is_stored(store: PersistentStore) -> None:
    store.save_context(1, ctx(1.0))
    calls: list[str] = []

    def refuse(slot: int, context: Context) -> None:
        raise InvalidInputError(f"slot {slot} is frozen")

    hooks = Hooks(
        [
            RegisteredHook("first", 2, pre_recorder(calls, "first")),
            RegisteredHook("refuse", 1, refuse),
            RegisteredHook("after", 0, pre_recorder(calls, "after")),
        ]
    )
    store.pre_commit_hooks.append(hooks.pre_commit)
    with pytest.raises(InvalidInputError) as info:
        store.save_context(1, ctx(2.0), aliases=("candidate",))
    assert str(info.value) == "pre-commit hook refuse rejected the commit: slot 1 is frozen"
    assert isinstance(info.value.__cause__, InvalidInputError)
    assert calls == ["first"]  # the hook after the rejection never ran
    assert [v.version for v in store.list_versions(1)] == [1]
    assert store.current_version(1) == 1
    assert store.get_aliases(1) == {"latest": 1}
    assert store.load_context(1).equals(ctx(1.0))
    with pytest.raises(NotFoundError):
        store.get_metadata(2)  # no slot made by a rejected first commit either
    with pytest.raises(InvalidInputError):
        store.save_context(2, ctx())
    assert [s.slot for s in store.list_slots()] == [1]


def test_rejection_keeps_a_conflict_and_wraps_anything_else() -> None:
    def conflict(slot: int, context: Context) -> None:
        raise ConflictError("another build owns this slot")

    def crash(slot: int, context: Context) -> None:
        raise ZeroDivisionError("division by zero")

    with pytest.raises(ConflictError, match="hook busy rejected the commit: another build"):
        Hooks([RegisteredHook("busy", 0, conflict)]).pre_commit(1, ctx())
    with pytest.raises(InvalidInputError) as info:
        Hooks([RegisteredHook("crash", 0, crash)]).pre_commit(1, ctx())
    assert str(info.value) == (
        "pre-commit hook crash rejected the commit: ZeroDivisionError: division by zero"
    )
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_finite_check_rejects_a_real_commit(store: PersistentStore) -> None:
    store.pre_commit_hooks.append(Hooks.load([], [], check_finite=True).pre_commit)
    store.save_context(1, ctx(1.0))
    with pytest.raises(InvalidInputError, match=r"builtin:finite_check .*'w' has 4 NaN"):
        store.save_context(1, ctx(float("nan")))
    assert store.current_version(1) == 1
    assert [v.version for v in store.list_versions(1)] == [1]


# -- post-commit isolation ----------------------------------------------------------------------


def test_failing_post_hook_is_isolated_and_reported(
    store: PersistentStore, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[int] = []

    def broken(event: CommitEvent) -> None:
        raise RuntimeError("metrics backend is down")

    hooks = Hooks(
        post=[
            RegisteredHook("broken", 1, broken),
            RegisteredHook("after", 0, lambda event: ran.append(event.version)),
        ]
    )
    version = store.save_context(1, ctx())
    with caplog.at_level(logging.ERROR, logger="ctxstore.daemon.hooks"):
        outcomes = post(hooks, event_for(store, 1, version))
    assert ran == [version]
    assert outcomes[0].name == "broken" and not outcomes[0].ok
    assert outcomes[0].error == "RuntimeError: metrics backend is down"
    assert outcomes[1].ok
    assert "post-commit hook broken failed for slot 1 version 1" in caplog.text
    assert store.current_version(1) == version  # the commit stands


def test_slow_post_hook_times_out_and_later_hooks_still_run(
    store: PersistentStore, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    started: list[threading.Thread] = []
    ran: list[str] = []

    def slow(event: CommitEvent) -> None:
        started.append(threading.current_thread())
        release.wait(timeout=60)

    hooks = Hooks(
        post=[
            RegisteredHook("slow", 1, slow),
            RegisteredHook("after", 0, lambda event: ran.append("after")),
        ],
        post_timeout=0.2,
    )
    version = store.save_context(1, ctx())
    try:
        with caplog.at_level(logging.ERROR, logger="ctxstore.daemon.hooks"):
            first = post(hooks, event_for(store, 1, version))
            second = post(hooks, event_for(store, 1, version))
        assert not first[0].ok
        assert first[0].error is not None and "timed out after 0.2s" in first[0].error
        assert "post-commit hook slow timed out" in caplog.text
        assert first[1].ok and ran == ["after", "after"]
        # the stuck call still runs: the hook is skipped rather than stacking threads
        assert not second[0].ok and second[0].error is not None
        assert "still running" in second[0].error
        assert len(started) == 1
    finally:
        release.set()
        for thread in started:
            thread.join(timeout=10)
    assert not started[0].is_alive()
    third = post(hooks, event_for(store, 1, version))  # once it ended, the hook runs again
    assert len(started) == 2 and third[0].ok


def test_post_hook_returns_the_aliases_it_moved(store: PersistentStore) -> None:
    def promote(event: CommitEvent) -> Mapping[str, int]:
        event.set_alias("stable")
        return {"stable": event.version}

    hooks = Hooks(
        post=[
            RegisteredHook("promote", 0, promote),
            RegisteredHook("odd", 0, lambda event: ["stable"]),
            RegisteredHook("bad-version", 0, lambda event: {"x": "1"}),
        ]
    )
    version = store.save_context(1, ctx())
    promoted, odd, bad = post(hooks, event_for(store, 1, version))
    assert promoted.ok and dict(promoted.aliases) == {"stable": version}
    assert store.get_aliases(1)["stable"] == version
    assert not odd.ok and odd.error is not None and "returned list" in odd.error
    assert not bad.ok and dict(bad.aliases) == {}


def test_post_commit_timeout_must_be_positive() -> None:
    for bad in (0, -1.0, float("nan"), "1"):
        with pytest.raises(InvalidInputError, match="timeout"):
            Hooks(post_timeout=bad)  # type: ignore[arg-type]


# -- loading ------------------------------------------------------------------------------------

HOOK_MODULE = """
calls = []

def check(slot, context):
    calls.append(("check", slot))
    if slot == 13:
        raise ValueError("slot 13 is unlucky")

def notify(event):
    calls.append(("notify", event.version))

def make_limit(max_tensors=1):
    def limit(slot, context):
        if len(context) > max_tensors:
            raise ValueError(f"{len(context)} tensors > {max_tensors}")
    return limit

class Tagger:
    def __init__(self, alias="tagged"):
        self.alias = alias

    def __call__(self, event):
        event.set_alias(self.alias)
        return {self.alias: event.version}

class Holder:
    @staticmethod
    def hook(slot, context):
        calls.append(("holder", slot))

NOT_CALLABLE = 42

def two_args_post(event, extra):
    pass

def factory_that_fails(level=3):
    raise RuntimeError(f"bad level {level}")

def factory_returning_data():
    return 7
"""


def write_module(tmp_path: Path, monkeypatch: Any, source: str = HOOK_MODULE) -> str:
    name = f"hooks_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.fixture
def module(tmp_path: Path, monkeypatch: Any) -> str:
    return write_module(tmp_path, monkeypatch)


def test_load_by_dotted_path_with_factories(module: str, store: PersistentStore) -> None:
    import importlib

    hooks = Hooks.load(
        [
            Spec(f"{module}:check", priority=2),
            Spec(f"{module}:Holder.hook", priority=1),
            Spec(f"{module}:make_limit", options={"max_tensors": 2}),
        ],
        [Spec(f"{module}:notify", priority=1), Spec(f"{module}:Tagger", options={"alias": "ok"})],
    )
    calls = importlib.import_module(module).calls
    hooks.pre_commit(1, Context({"a": np.zeros(1), "b": np.zeros(1)}))
    assert calls == [("check", 1), ("holder", 1)]
    with pytest.raises(InvalidInputError, match=rf"{module}:make_limit rejected.*3 tensors > 2"):
        hooks.pre_commit(1, Context({"a": np.zeros(1), "b": np.zeros(1), "c": np.zeros(1)}))
    with pytest.raises(InvalidInputError, match="slot 13 is unlucky"):
        hooks.pre_commit(13, ctx())

    version = store.save_context(1, ctx())
    notified, tagged = post(hooks, event_for(store, 1, version))
    assert notified.ok and calls[-1] == ("notify", version)
    assert tagged.ok and dict(tagged.aliases) == {"ok": version}
    assert store.get_aliases(1)["ok"] == version


def test_a_class_without_options_is_instantiated(module: str, store: PersistentStore) -> None:
    hooks = Hooks.load([], [Spec(f"{module}:Tagger")])
    version = store.save_context(1, ctx())
    (outcome,) = post(hooks, event_for(store, 1, version))
    assert dict(outcome.aliases) == {"tagged": version}


def test_builtin_tracker_loads_by_dotted_path_too(store: PersistentStore) -> None:
    hooks = Hooks.load(
        [Spec("ctxstore.daemon.hooks:finite_check")],
        [
            Spec(
                "ctxstore.daemon.hooks:BestVersionTracker", options={"metric": "acc", "mode": "max"}
            )
        ],
    )
    version = store.save_context(1, ctx(acc=0.9))
    (outcome,) = post(hooks, event_for(store, 1, version))
    assert dict(outcome.aliases) == {BEST_ALIAS: version}


def fake_entry_points(
    monkeypatch: Any, *points: importlib.metadata.EntryPoint
) -> list[dict[str, Any]]:
    asked: list[dict[str, Any]] = []

    def entry_points(**params: Any) -> list[importlib.metadata.EntryPoint]:
        asked.append(params)
        return [p for p in points if p.group == params.get("group")]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return asked


def test_load_by_entry_point(module: str, monkeypatch: Any, store: PersistentStore) -> None:
    ep = importlib.metadata.EntryPoint
    asked = fake_entry_points(
        monkeypatch,
        ep("limit", f"{module}:make_limit", ENTRY_POINT_GROUP),
        ep("tag", f"{module}:Tagger", ENTRY_POINT_GROUP),
        ep("limit", "elsewhere:thing", "another.group"),
    )
    hooks = Hooks.load(
        [Spec("entrypoint:limit", options={"max_tensors": 0})], [Spec("entrypoint:tag")]
    )
    assert asked == [{"group": ENTRY_POINT_GROUP}] * 2
    assert hooks.names == {"pre": ["entrypoint:limit"], "post": ["entrypoint:tag"]}
    with pytest.raises(InvalidInputError, match="entrypoint:limit rejected"):
        hooks.pre_commit(1, ctx())
    version = store.save_context(1, ctx())
    (outcome,) = post(hooks, event_for(store, 1, version))
    assert dict(outcome.aliases) == {"tagged": version}


def test_entry_point_missing_or_ambiguous(monkeypatch: Any) -> None:
    ep = importlib.metadata.EntryPoint
    fake_entry_points(
        monkeypatch,
        ep("twice", "one.mod:hook", ENTRY_POINT_GROUP),
        ep("twice", "two.mod:hook", ENTRY_POINT_GROUP),
        ep("broken", "no_such_module_for_ctxstore:hook", ENTRY_POINT_GROUP),
    )
    with pytest.raises(InvalidInputError, match=r"'entrypoint:absent'.*no entry point 'absent'"):
        Hooks.load([Spec("entrypoint:absent")], [])
    with pytest.raises(InvalidInputError, match=r"more than once \(one.mod:hook, two.mod:hook\)"):
        Hooks.load([Spec("entrypoint:twice")], [])
    with pytest.raises(InvalidInputError, match=r"'entrypoint:broken'.*loading entry point"):
        Hooks.load([Spec("entrypoint:broken")], [])


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("no_such_module_for_ctxstore:hook", "cannot import 'no_such_module_for_ctxstore'"),
        ("{m}:missing", "has no attribute 'missing'"),
        ("{m}:Holder.missing", "has no attribute 'Holder.missing'"),
        ("{m}:NOT_CALLABLE", "is a int, not a callable"),
        ("{m}:two_args_post", "must be callable as (event)"),
        ("{m}:factory_returning_data", "factory returned a int"),
        ("{m}:factory_that_fails", "factory failed"),
        ("{m}", "must be 'package.module:attribute' or 'entrypoint:NAME'"),
        ("{m}:", "must be 'package.module:attribute'"),
        (":hook", "must be 'package.module:attribute'"),
        ("{m}:a b", "must be 'package.module:attribute'"),
        ("../{m}:check", "must be 'package.module:attribute'"),
        (".{m}:check", "must be 'package.module:attribute'"),
        ("entrypoint:", "needs an entry-point name"),
    ],
)
def test_bad_targets_are_refused_naming_them(module: str, target: str, why: str) -> None:
    target = target.format(m=module)
    with pytest.raises(InvalidInputError) as info:
        Hooks.load([], [Spec(target)])
    assert repr(target) in str(info.value)
    assert why in str(info.value)


def test_a_module_that_fails_to_import_is_named(tmp_path: Path, monkeypatch: Any) -> None:
    broken = write_module(tmp_path, monkeypatch, "raise RuntimeError('missing licence key')\n")
    with pytest.raises(InvalidInputError, match=rf"'{broken}:hook'.*missing licence key"):
        Hooks.load([Spec(f"{broken}:hook")], [])


def test_bad_spec_fields(module: str) -> None:
    with pytest.raises(InvalidInputError, match="must be a string"):
        load_hook(Spec(42), kind="pre")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="priority must be an integer"):
        load_hook(Spec(f"{module}:check", priority=True), kind="pre")
    with pytest.raises(InvalidInputError, match="options must be a table"):
        load_hook(Spec(f"{module}:check", options=[1]), kind="pre")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"pre-commit hook .* must be callable as \(slot"):
        load_hook(Spec(f"{module}:notify"), kind="pre")
    with pytest.raises(InvalidInputError, match=r"factory failed with options \['nope'\]"):
        load_hook(Spec(f"{module}:make_limit", options={"nope": 1}), kind="pre")


# -- finite_check -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "complex64", "complex128"])
@pytest.mark.parametrize(("bad", "word"), [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_finite_check_rejects_nan_and_inf(dtype: str, bad: float, word: str) -> None:
    values = np.arange(10, dtype=dtype)
    values[[2, 7]] = bad
    context = Context({"fine": np.ones(3, dtype), "bad": values})
    with pytest.raises(InvalidInputError) as info:
        finite_check(1, context)
    assert str(info.value) == f"tensor 'bad' has 2 {word} values (of 10)"


def test_finite_check_complex_parts_and_mixed_counts() -> None:
    z = np.zeros(4, np.complex64)
    z[1] = complex(0, np.inf)
    z[2] = complex(np.nan, 0)
    with pytest.raises(InvalidInputError, match=r"'z' has 1 NaN and 1 Inf values \(of 4\)"):
        finite_check(1, Context({"z": z}))


def test_finite_check_names_every_bad_tensor_up_to_a_limit() -> None:
    weights = {f"t{i}": np.array([np.nan], np.float32) for i in range(8)}
    with pytest.raises(InvalidInputError) as info:
        finite_check(1, Context(weights))
    message = str(info.value)
    assert "'t0'" in message and "'t4'" in message and "'t5'" not in message
    assert message.endswith("(and 3 more tensors)")


def test_finite_check_passes_finite_floats_even_when_their_sum_overflows() -> None:
    big = np.full(100, 60000, np.float16)  # float16 sums overflow to inf
    finite_check(1, Context({"big": big, "max": np.full(4, np.finfo(np.float64).max)}))
    finite_check(1, Context({"empty": np.zeros((0, 3), np.float32)}))


@pytest.mark.parametrize("dtype", ["int8", "int32", "int64", "uint16", "uint64", "bool"])
def test_finite_check_passes_integers(dtype: str) -> None:
    finite_check(1, Context({"ints": np.arange(5).astype(dtype)}))


# -- BestVersionTracker -------------------------------------------------------------------------


def track(store: PersistentStore, tracker: BestVersionTracker, **metadata: Any) -> Any:
    version = store.save_context(1, ctx(**metadata))
    return version, tracker(event_for(store, 1, version))


def best(store: PersistentStore) -> int | None:
    return store.get_aliases(1).get(BEST_ALIAS)


def test_tracker_min_moves_best_only_on_improvement(store: PersistentStore) -> None:
    tracker = BestVersionTracker("loss")
    assert track(store, tracker, loss=0.5) == (1, {"best": 1})
    assert track(store, tracker, loss=0.7) == (2, None)
    assert best(store) == 1
    assert track(store, tracker, loss=0.5) == (3, None)  # a tie keeps the older version
    assert track(store, tracker, loss=0.25) == (4, {"best": 4})
    assert best(store) == 4


def test_tracker_max(store: PersistentStore) -> None:
    tracker = BestVersionTracker("eval.accuracy", mode="max")
    assert track(store, tracker, eval={"accuracy": 0.8}) == (1, {"best": 1})
    assert track(store, tracker, eval={"accuracy": 0.7}) == (2, None)
    assert track(store, tracker, eval={"accuracy": 1}) == (3, {"best": 3})
    assert best(store) == 3


def test_tracker_ignores_missing_and_non_numeric_metrics(
    store: PersistentStore, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = BestVersionTracker("loss")
    assert track(store, tracker, note="no metric") == (1, None)
    assert best(store) is None
    assert track(store, tracker, loss=0.9) == (2, {"best": 2})
    with caplog.at_level(logging.WARNING, logger="ctxstore.daemon.hooks"):
        for bad in ("low", True, None, [0.1], {"value": 0.1}):
            assert track(store, tracker, loss=bad)[1] is None
    assert "metric 'loss' is 'low', not a finite number" in caplog.text
    assert best(store) == 2


def test_tracker_replaces_a_best_without_the_metric(store: PersistentStore) -> None:
    first = store.save_context(1, ctx())
    store.set_alias(1, BEST_ALIAS, first)
    assert track(store, BestVersionTracker("loss"), loss=3.0) == (2, {"best": 2})


def test_tracker_through_hooks_reports_the_move(store: PersistentStore) -> None:
    hooks = Hooks.load([], [], best_metric="loss", best_mode="min")
    version = store.save_context(1, ctx(loss=1.0))
    (outcome,) = post(hooks, CommitEvent(1, version, ctx(loss=1.0), "llm", store))
    assert outcome.name == "builtin:best_version"
    assert outcome.ok and dict(outcome.aliases) == {"best": version}


def test_a_hook_moves_an_alias_through_its_event_never_through_a_view(
    store: PersistentStore,
) -> None:
    """CommitEvent.store is the read-only view's type; the event's set_alias is the one
    write a post-commit hook makes, and it is refused when the store is a view."""
    version = store.save_context(1, ctx())
    assert event_for(store, 1, version).set_alias("fresh") == version
    assert store.get_aliases(1)["fresh"] == version
    with PersistentStore(store.root, readonly=True) as view:
        event = CommitEvent(1, version, ctx(), None, view)
        assert not hasattr(event.store, "set_alias")
        with pytest.raises(ReadOnlyError, match="read-only"):
            event.set_alias("other")
    assert "other" not in store.get_aliases(1)


def test_a_hook_given_the_writer_sees_only_a_view_with_no_write_to_name(
    store: PersistentStore,
) -> None:
    """The daemon makes the event with its writer; the hook still gets a StoreView (the
    writer's ``view``), so a write through ``event.store`` is an AttributeError, nothing
    is written, and the commit stands. Its one write is ``event.set_alias``."""
    seen: list[object] = []

    def sneaky(event: CommitEvent) -> None:
        seen.append(event.store)
        event.store.save_context(event.slot, ctx(9.0))  # type: ignore[attr-defined]

    def reader(event: CommitEvent) -> Mapping[str, int]:
        assert event.store.current_version(event.slot) == event.version  # it reads
        event.set_alias("read")
        return {"read": event.version}

    hooks = Hooks(post=[RegisteredHook("sneaky", 1, sneaky), RegisteredHook("reader", 0, reader)])
    version = store.save_context(1, ctx())
    sneaky_outcome, read_outcome = post(hooks, CommitEvent(1, version, ctx(), None, store))
    (view,) = seen
    assert isinstance(view, StoreView) and not isinstance(view, PersistentStore)
    assert view is store.view and view.root == store.root
    writes = _public(PersistentStore) - _public(StoreView)  # what the writer adds
    assert {"save_context", "set_alias", "rollback", "pin", "repair"} <= writes
    assert sorted(name for name in writes if hasattr(view, name)) == []
    assert not sneaky_outcome.ok and sneaky_outcome.error is not None
    assert "AttributeError" in sneaky_outcome.error and "save_context" in sneaky_outcome.error
    assert read_outcome.ok and dict(read_outcome.aliases) == {"read": version}
    assert store.current_version(1) == version and store.get_aliases(1)["read"] == version
    assert [v.version for v in store.list_versions(1)] == [version]


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_tracker_arguments_are_checked() -> None:
    with pytest.raises(InvalidInputError, match="mode must be 'min' or 'max'"):
        BestVersionTracker("loss", "lowest")
    with pytest.raises(InvalidInputError, match="metric must be a non-empty string"):
        BestVersionTracker("")
    with pytest.raises(InvalidInputError, match="mode"):
        Hooks.load([], [], best_metric="loss", best_mode="median")


def test_configured_hook_specs_load(module: str, store: PersistentStore) -> None:
    from ctxstore.daemon.config import HookSpec  # the daemon's own spec type, options frozen

    hooks = Hooks.load(
        [HookSpec(f"{module}:make_limit", priority=1, options={"max_tensors": 1})],
        [HookSpec(f"{module}:Tagger", options={"alias": "from-config"})],
        check_finite=True,
    )
    assert hooks.names["pre"] == [f"{module}:make_limit", "builtin:finite_check"]
    version = store.save_context(1, ctx())
    (outcome,) = post(hooks, event_for(store, 1, version))
    assert dict(outcome.aliases) == {"from-config": version}
