"""The store's writer against a plain dict model: random sequences of publishes, rollbacks,
alias moves and deletions, pins and retention, the store and the model compared after
every step (current versions, every stored version's data, aliases, pins, what retention
retired, and the errors of calls that name what is not there).

The model is the contract in a few lines: a version number is one past the slot's
newest; publishing makes it current; retention keeps the newest ``RETENTION`` versions
plus the current, pinned and aliased ones; ``latest`` is the newest.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ctxstore import Context, NotFoundError
from ctxstore.store import PersistentStore

RETENTION = 3
SLOTS = st.integers(min_value=1, max_value=2)
ALIASES = st.sampled_from(["best", "prod", "canary"])
#: the stores live in memory where there is a tmpfs: fsync is free there, and hundreds of
#: commits an example would otherwise spend seconds in it (what is compared is the same)
FAST_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None
#: a version reference as callers write it: a number (maybe one never made) or a name
NUMBERS = st.integers(min_value=1, max_value=10)


@dataclass
class SlotModel:
    values: dict[int, float] = field(default_factory=dict)  # version -> the value it holds
    current: int | None = None
    pinned: set[int] = field(default_factory=set)
    aliases: dict[str, int] = field(default_factory=dict)

    def retire(self) -> list[int]:
        """What retention removes now (the store runs it after each commit too)."""
        newest = sorted(self.values, reverse=True)
        if len(newest) < RETENTION:
            return []
        cutoff = newest[RETENTION - 1]
        kept = {self.current, *self.pinned, *self.aliases.values()}
        doomed = [v for v in sorted(self.values) if v < cutoff and v not in kept]
        for version in doomed:
            del self.values[version]
        return doomed


class WriterAgainstModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ctxstore-model-", dir=FAST_DIR))
        self.store = PersistentStore(self.dir / "store", retention=RETENTION)
        self.model: dict[int, SlotModel] = {}
        self.next_value = 0.0

    def teardown(self) -> None:
        try:
            assert self.store.verify() == []
        finally:
            self.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _slot(self, slot: int) -> SlotModel:
        return self.model.setdefault(slot, SlotModel())

    # -- operations -----------------------------------------------------------------------

    @rule(slot=SLOTS, alias=st.none() | ALIASES, pin=st.booleans())
    def publish(self, slot: int, alias: str | None, pin: bool) -> None:
        self.next_value += 1.0
        value = self.next_value
        aliases = () if alias is None else (alias,)
        ctx = Context({"w": np.full(3, value)}, {"value": value})
        version = self.store.save_context(slot, ctx, aliases=aliases, pin=pin)
        model = self._slot(slot)
        assert version == max(model.values, default=0) + 1  # the newest is never retired
        model.values[version] = value
        model.current = version
        if pin:
            model.pinned.add(version)
        if alias is not None:
            model.aliases[alias] = version
        model.retire()

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), to_previous=st.booleans())
    def rollback(self, data: st.DataObject, to_previous: bool) -> None:
        slot = data.draw(st.sampled_from(sorted(self.model)))
        model = self.model[slot]
        if to_previous:
            older = [v for v in model.values if model.current is not None and v < model.current]
            if not older:
                with pytest.raises(NotFoundError, match="no version older"):
                    self.store.rollback(slot)
                return
            assert self.store.rollback(slot) == max(older)
            model.current = max(older)
            return
        target = data.draw(NUMBERS)
        if target not in model.values:
            with pytest.raises(NotFoundError, match=f"no version {target}"):
                self.store.rollback(slot, target)
            return
        assert self.store.rollback(slot, target) == target
        model.current = target

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), alias=ALIASES)
    def set_alias(self, data: st.DataObject, alias: str) -> None:
        slot = data.draw(st.sampled_from(sorted(self.model)))
        model = self.model[slot]
        target = data.draw(NUMBERS | st.just("latest"))
        number = max(model.values) if target == "latest" else target
        if number not in model.values:
            with pytest.raises(NotFoundError):
                self.store.set_alias(slot, alias, target)
            return
        assert self.store.set_alias(slot, alias, target) == number
        model.aliases[alias] = number

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), alias=ALIASES)
    def delete_alias(self, data: st.DataObject, alias: str) -> None:
        slot = data.draw(st.sampled_from(sorted(self.model)))
        model = self.model[slot]
        if alias not in model.aliases:
            with pytest.raises(NotFoundError, match=f"no alias '{alias}'"):
                self.store.delete_alias(slot, alias)
            return
        self.store.delete_alias(slot, alias)
        del model.aliases[alias]

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), pinned=st.booleans())
    def pin(self, data: st.DataObject, pinned: bool) -> None:
        slot = data.draw(st.sampled_from(sorted(self.model)))
        model = self.model[slot]
        target = data.draw(NUMBERS)
        call = self.store.pin if pinned else self.store.unpin
        if target not in model.values:
            with pytest.raises(NotFoundError):
                call(slot, target)
            return
        assert call(slot, target) == target
        (model.pinned.add if pinned else model.pinned.discard)(target)

    @rule(one_slot=st.none() | SLOTS)
    def retention(self, one_slot: int | None) -> None:
        if one_slot is not None and one_slot not in self.model:
            return  # retention of a slot never published: nothing to compare
        slots = sorted(self.model) if one_slot is None else [one_slot]
        expected = sorted((slot, v) for slot in slots for v in self.model[slot].retire())
        assert sorted(self.store.apply_retention(one_slot)) == expected

    # -- what must hold after every step ----------------------------------------------------

    @invariant()
    def store_matches_model(self) -> None:
        currents = {slot: m.current for slot, m in self.model.items() if m.current is not None}
        assert self.store.current_versions() == currents
        for slot, model in self.model.items():
            listed = self.store.list_versions(slot)
            assert [v.version for v in listed] == sorted(model.values)
            assert {v.version for v in listed if v.pinned} == model.pinned & set(model.values)
            assert self.store.get_aliases(slot) == {**model.aliases, "latest": max(model.values)}
            current = self.store.load_context(slot)
            assert current.version == model.current
            assert current.config == {"value": model.values[current.version]}
            for version, value in model.values.items():
                assert np.array_equal(
                    self.store.load_context(slot, version)["w"], np.full(3, value)
                )
            for alias, version in model.aliases.items():
                assert self.store.resolve(slot, alias) == version
            gone = [v for v in range(1, max(model.values)) if v not in model.values]
            for version in gone[:2]:  # a retired number is gone for good
                with pytest.raises(NotFoundError):
                    self.store.load_context(slot, version)


WriterAgainstModel.TestCase.settings = settings(
    max_examples=12,
    stateful_step_count=25,
    deadline=None,  # each step commits with fsync: no timing belongs in a test
    suppress_health_check=[HealthCheck.too_slow],
)
test_writer_against_the_dict_model = WriterAgainstModel.TestCase
