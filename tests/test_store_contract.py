"""One contract for reading a store, run against every way of opening it: the writer, and
the read-only view (what readers, hooks and the API's reads get) beside it, opened as
``PersistentStore(path, readonly=True)`` and as ``StoreView(path)``.

Every read answers the same on both, and names the same missing thing the same way.
The store is built once for the module; no test here writes to it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from ctxstore import Context, NotFoundError
from ctxstore.store import PersistentStore, StoreView

CONFIG_JSON = b'{"hidden_size": 8}'


@pytest.fixture(scope="module")
def writer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PersistentStore]:
    """Slot 1: three versions (2 is pinned and aliased ``best``, current is 3, version 1
    carries an extra file); slot 2: one version of model type ``cnn`` in group ``vision``."""
    root = tmp_path_factory.mktemp("contract") / "store"
    with PersistentStore(root) as store:
        store.save_context(
            1,
            Context({"w": np.arange(6.0).reshape(2, 3), "b": np.ones(2, "f4")}, {"n": 1}),
            model_type="llm",
            files={"config.json": CONFIG_JSON},
            publish_key="key-one",
        )
        store.save_context(1, Context({"w": np.zeros(3)}, {"n": 2}), aliases=("best",), pin=True)
        store.save_context(1, Context({"w": np.full(3, 3.0)}, {"n": 3}, {"loss": 0.5}))
        store.save_context(2, Context({"x": np.arange(4, dtype="i8")}), model_type="cnn")
        store.hierarchy.add_to_group(2, "vision")
        yield store


@pytest.fixture(params=["writer", "readonly", "view"])
def view(request: pytest.FixtureRequest, writer: PersistentStore) -> Iterator[StoreView]:
    """The same store three ways: the writer, ``PersistentStore(readonly=True)`` and
    ``StoreView`` (the first two are the seed's entry point, the last the view's own)."""
    if request.param == "writer":
        yield writer
        return
    opened = (
        PersistentStore(writer.root, readonly=True)
        if request.param == "readonly"
        else StoreView(writer.root)
    )
    with opened as readonly:
        yield readonly


def test_current_versions_and_resolution(view: StoreView) -> None:
    assert view.current_versions() == {1: 3, 2: 1}
    assert [view.current_version(slot) for slot in (1, 2, 9)] == [3, 1, None]
    refs = (None, "current", "latest", "best", 1, "2")
    assert [view.resolve(1, ref) for ref in refs] == [3, 3, 3, 2, 1, 2]


def test_contexts_load_whole_with_their_config_and_metadata(view: StoreView) -> None:
    first = view.load_context(1, 1, verify=True)
    assert first.version == 1 and first.config == {"n": 1}
    assert np.array_equal(first["w"], np.arange(6.0).reshape(2, 3))
    assert first["b"].dtype == np.dtype("f4")
    current = view.load_context(1)
    assert current.version == 3 and current.metadata == {"loss": 0.5}
    assert np.array_equal(view.load_context(1, "best")["w"], np.zeros(3))
    assert view.load_context(2)["x"].tolist() == [0, 1, 2, 3]


def test_metadata_versions_aliases_and_slots(view: StoreView) -> None:
    meta = view.get_metadata(1, 2)
    assert (meta.version, meta.current_version, meta.pinned, meta.aliases) == (
        2,
        3,
        True,
        ("best",),
    )
    assert meta.model_type == "llm" and meta.tensors is not None
    assert [t.name for t in view.get_metadata(1, 1).tensors or ()] == ["w", "b"]
    versions = view.list_versions(1)
    assert [(v.version, v.pinned, v.aliases) for v in versions] == [
        (1, False, ()),
        (2, True, ("best",)),
        (3, False, ()),
    ]
    assert view.get_aliases(1) == {"best": 2, "latest": 3}
    assert [(s.slot, s.current_version, s.n_versions) for s in view.list_slots()] == [
        (1, 3, 3),
        (2, 1, 1),
    ]
    assert [s.slot for s in view.list_slots(model_type="cnn")] == [2]
    assert [s.slot for s in view.list_slots(group="vision")] == [2]
    assert view.hierarchy.list_by_group("vision") == [2]


def test_extra_files_and_publish_keys(view: StoreView) -> None:
    assert [f.name for f in view.list_files(1, 1)] == ["config.json"]
    assert view.list_files(1) == ()
    assert view.read_file(1, 1, "config.json") == CONFIG_JSON
    assert view.publish_key_version("key-one") == (1, 1)
    assert view.publish_key_version("never-used") is None


def test_verify_finds_nothing(view: StoreView) -> None:
    assert view.verify() == []
    assert view.verify(1) == []


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.load_context(9), "slot 9 has no versions"),
        (lambda s: s.load_context(1, 7), "slot 1 has no version 7"),
        (lambda s: s.load_context(1, "nosuch"), "slot 1 has no alias 'nosuch'"),
        (lambda s: s.get_metadata(2, 5), "slot 2 has no version 5"),
        (lambda s: s.list_versions(9), "slot 9 does not exist"),
        (lambda s: s.get_aliases(9), "slot 9 does not exist"),
        (lambda s: s.read_file(1, 1, "tokenizer.json"), "has no file 'tokenizer.json'"),
        (lambda s: s.verify(9), "slot 9"),
    ],
)
def test_what_is_not_there_is_named_the_same_way(
    view: StoreView, call: object, message: str
) -> None:
    with pytest.raises(NotFoundError, match=message):
        call(view)  # type: ignore[operator]


#: every public method the writer adds to the view: each one writes (or waits for writes, or
#: says what its own last commit recorded)
WRITES = {
    "apply_retention",
    "committed_record",
    "delete_alias",
    "mark_damaged",
    "newest_intact",
    "pin",
    "record_check",
    "repair",
    "rollback",
    "save_context",
    "save_import",
    "set_alias",
    "unpin",
    "verified_by_commit",
    "wait_background",
    "write_transaction",
}


#: and every public method the writer's hierarchy adds to the view's
HIERARCHY_WRITES = {"add_to_group", "move_node", "remove_from_group", "remove_node", "set_parent"}


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_the_view_is_the_writer_without_its_writes() -> None:
    """The writer is the view plus its writes (and ``view``, the read-only view of itself
    it hands to hooks and read routes): the view's type cannot even name a write."""
    assert issubclass(PersistentStore, StoreView)
    assert _public(PersistentStore) - _public(StoreView) == WRITES | {"view"}


def test_only_the_writer_writes(view: StoreView, writer: PersistentStore) -> None:
    """The one place the two differ: the read-only store has no write to call, nor has
    its hierarchy, and the store is left as it was."""
    if view is writer:
        assert writer.set_alias(1, "probe", 1) == 1
        writer.delete_alias(1, "probe")
        return
    assert type(view) is StoreView and not isinstance(view, PersistentStore)
    assert not any(hasattr(view, name) for name in WRITES)
    assert _public(type(writer.hierarchy)) - _public(type(view.hierarchy)) == HIERARCHY_WRITES
    assert view.current_versions() == {1: 3, 2: 1}
    assert view.get_aliases(1) == {"best": 2, "latest": 3}
