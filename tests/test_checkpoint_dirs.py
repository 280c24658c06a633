"""Checkpoint directories and the extra files that travel with a version (no torch here).

The directories are written with the safetensors library the way ``save_pretrained``
lays them out: shards named by a ``model.safetensors.index.json``, a
``config.json`` and other small files. Every malformed directory is refused before
anything is committed; extra files are staged, recorded, verified, deduplicated
and retired with their version; recovery after a kill leaves whole versions only.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from support.checkpoints import CONFIG, SHARDS, tensors, write_checkpoint
from support.daemon import DaemonProcess, guarded_daemon

from ctxstore import Context, IntegrityError, InvalidInputError, NotFoundError, PersistentStore
from ctxstore.errors import ConflictError
from ctxstore.export import export_version
from ctxstore.nodes import FileNode, ImportLimits, load_weights_file, open_import
from ctxstore.store.schema import LATEST
from ctxstore.verify import check_version_files


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[DaemonProcess]:
    with guarded_daemon(tmp_path) as daemon:
        yield daemon


EXTRA = ("chat_template.jinja", "config.json", "generation_config.json", "tokenizer.json")


def assert_nothing_committed(store: PersistentStore) -> None:
    """No version, no slot directory, nothing staged but the prepared spare directory."""
    assert store.list_slots() == []
    assert not (store.root / "slots" / "1").exists() or not os.listdir(store.root / "slots/1")
    assert all(name.startswith("spare-") for name in os.listdir(store.root / "wal"))


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_a_checkpoint_directory_is_one_version_with_its_files(
    store: PersistentStore, tmp_path: Path, sharded: bool
) -> None:
    weights = tensors()
    ckpt = write_checkpoint(tmp_path / "ckpt", weights, SHARDS if sharded else None)
    (ckpt / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (ckpt / "original").mkdir()
    with open_import(ckpt) as imported:
        version = store.save_import(1, imported, model_type="llm")
    ctx = store.load_context(1, version, verify=True)
    assert set(ctx.names) == set(weights)
    for name, array in weights.items():
        assert ctx[name].dtype == array.dtype and np.array_equal(ctx[name], array), name
    assert dict(ctx.config) | {"architectures": list(ctx.config["architectures"])} == CONFIG
    assert [f.name for f in store.list_files(1, version)] == list(EXTRA)
    for name in EXTRA:
        assert store.read_file(1, version, name) == (ckpt / name).read_bytes(), name
    source = ctx.metadata["source"]
    assert source["format"] == "checkpoint" and source["skipped"] == (".gitattributes", "original")
    assert len(source["shards"]) == (3 if sharded else 1)
    # nothing of the index travels as a file: export writes its own
    assert "model.safetensors.index.json" not in {f.name for f in store.list_files(1)}


def _refused(store: PersistentStore, ckpt: Path, *patterns: str, **limits: int) -> str:
    with (
        pytest.raises(InvalidInputError) as info,
        open_import(ckpt, limits=ImportLimits(**limits)) as imported,
    ):
        store.save_import(1, imported)
    for pattern in patterns:
        assert pattern in str(info.value), str(info.value)
    assert_nothing_committed(store)
    return str(info.value)


def test_a_missing_shard_is_refused_before_anything_is_committed(
    store: PersistentStore, tmp_path: Path
) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt", tensors(), SHARDS)
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    _refused(store, ckpt, "names shard 'model-00002-of-00003.safetensors', which is missing")


def test_an_extra_shard_is_refused(store: PersistentStore, tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt", tensors(), SHARDS)
    safetensors.numpy.save_file({"stale": np.ones(2, "f4")}, ckpt / "model.safetensors")
    _refused(store, ckpt, "shard 'model.safetensors' is not named by its index")


def test_a_tensor_named_twice_is_refused(store: PersistentStore, tmp_path: Path) -> None:
    weights = tensors()
    ckpt = write_checkpoint(tmp_path / "ckpt", weights, SHARDS)
    # shard 3 also holds embed.weight, and the index (a dict) can only place it once
    safetensors.numpy.save_file(
        {"layers.1.w": weights["layers.1.w"], "norm.weight": weights["norm.weight"],
         "embed.weight": weights["embed.weight"]},
        ckpt / "model-00003-of-00003.safetensors",
    )  # fmt: skip
    _refused(store, ckpt, "holds tensor 'embed.weight', which the index puts in "
             "'model-00001-of-00003.safetensors'")  # fmt: skip


def test_index_and_shards_must_agree(store: PersistentStore, tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt", tensors(), SHARDS)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost"] = "model-00002-of-00003.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(store, ckpt, "puts tensor 'ghost' in 'model-00002-of-00003.safetensors'")
    index["weight_map"] = {"a": "../outside.safetensors"}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(store, ckpt, "directly in the directory")


def test_a_directory_without_safetensors_weights_is_refused(
    store: PersistentStore, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "pytorch_model.bin").write_bytes(b"pickle")
    _refused(store, ckpt, "holds no model.safetensors", "never read")


def test_symlinks_and_special_files_in_a_checkpoint_are_refused(
    store: PersistentStore, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"TOPSECRET" * 10)
    ckpt = write_checkpoint(tmp_path / "ckpt", tensors())
    (ckpt / "notes.txt").symlink_to(secret)
    message = _refused(store, ckpt, "'notes.txt'", "symbolic link")
    assert "TOPSECRET" not in message
    (ckpt / "notes.txt").unlink()
    (ckpt / "model.safetensors").rename(tmp_path / "real.safetensors")
    (ckpt / "model.safetensors").symlink_to(tmp_path / "real.safetensors")
    _refused(store, ckpt, "symbolic link")
    (ckpt / "model.safetensors").unlink()
    (tmp_path / "real.safetensors").rename(ckpt / "model.safetensors")
    os.mkfifo(ckpt / "pipe")
    _refused(store, ckpt, "'pipe' is not a regular file")


def test_extra_files_are_bounded_in_count_size_and_name(
    store: PersistentStore, tmp_path: Path
) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt", tensors())
    _refused(store, ckpt, "4 files besides its weights, more than the limit of 3", max_files=3)
    _refused(store, ckpt, "'tokenizer.json' is larger than the limit of 700 bytes",
             max_file_bytes=700)  # fmt: skip
    _refused(store, ckpt, "larger than the limit of 100 bytes", max_bytes=100)
    extra = [ckpt / f"extra{i}.txt" for i in range(4)]
    for path in extra:
        path.write_bytes(b"x" * 700)  # each within 800 bytes, all > 4 x 800 with the others
    _refused(store, ckpt, "larger than the limit of 3200 bytes together", max_file_bytes=800)
    for path in extra:
        path.unlink()
    (ckpt / "bad name.txt").write_text("x")
    _refused(store, ckpt, "'bad name.txt'", "is not allowed")


def test_config_json_must_be_a_json_object(store: PersistentStore, tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt", tensors())
    (ckpt / "config.json").write_text("[1, 2]")
    _refused(store, ckpt, "config.json is not a JSON object")


def test_tied_weights_in_a_checkpoint_are_stored_once(
    store: PersistentStore, tmp_path: Path
) -> None:
    weights = tensors()
    weights["lm_head.weight"] = weights["embed.weight"].copy()
    ckpt = write_checkpoint(tmp_path / "ckpt", weights, [["embed.weight"], ["lm_head.weight"],
                            ["layers.0.w", "layers.1.w", "norm.weight", "steps"]])  # fmt: skip
    with open_import(ckpt) as imported:
        version = store.save_import(1, imported)
    tables = {t.name: t.position for t in store.get_metadata(1, version).tensors or ()}
    directory = store.root / "slots" / "1" / str(version)
    embed = os.stat(directory / f"{tables['embed.weight']}.npy")
    head = os.stat(directory / f"{tables['lm_head.weight']}.npy")
    assert embed.st_ino == head.st_ino and embed.st_nlink == 2
    # and the next version of the same checkpoint links every tensor and file to this one
    with open_import(ckpt) as imported:
        again = store.save_import(1, imported)
    for name in ("config.json", "tokenizer.json"):
        first = os.stat(directory / "files" / name)
        assert os.stat(store.root / f"slots/1/{again}/files/{name}").st_ino == first.st_ino
    assert np.array_equal(store.load_context(1, again)["lm_head.weight"], weights["embed.weight"])


def test_files_from_python_and_their_checks(store: PersistentStore) -> None:
    ctx = Context({"w": np.arange(4, dtype="f4")})
    version = store.save_context(1, ctx, files={"README.md": b"# model\n", "vocab.txt": b""})
    assert store.read_file(1, version, "vocab.txt") == b""
    assert store.read_file(1, None, "README.md") == b"# model\n"
    with pytest.raises(NotFoundError, match=r"has no file 'other\.txt'"):
        store.read_file(1, version, "other.txt")
    for bad in ("../x", "a/b", ".hidden", "", "x" * 300):
        with pytest.raises(InvalidInputError, match="is not allowed"):
            store.save_context(1, ctx, files={bad: b"x"})
        with pytest.raises(InvalidInputError, match="is not allowed"):
            store.read_file(1, version, bad)
    with pytest.raises(InvalidInputError, match="more than the limit of 64"):
        store.save_context(1, ctx, files={f"f{i}": b"" for i in range(65)})
    assert store.current_version(1) == version


def test_verify_checks_extra_files_and_read_file_refuses_damage(store: PersistentStore) -> None:
    version = store.save_context(1, Context({"w": np.zeros(2)}), files={"config.json": b"{}  "})
    path = store.root / f"slots/1/{version}/files/config.json"
    os.chmod(path, 0o644)
    path.write_bytes(b"{} x")  # same size, other bytes
    problems = store.verify(1)
    assert [(p.kind, p.tensor) for p in problems] == [("checksum_mismatch", "config.json")]
    assert store.verify(1, rehash=False) == []
    with pytest.raises(IntegrityError, match="does not match its recorded size and checksum"):
        store.read_file(1, version, "config.json")
    path.write_bytes(b"{}")
    assert [p.kind for p in store.verify(1, rehash=False)] == ["wrong_size"]
    path.write_bytes(b"{}  ")
    (path.parent / "stray.txt").write_text("?")
    assert [p.kind for p in store.verify(1)] == ["stray_file"]
    (path.parent / "stray.txt").unlink()
    path.unlink()
    # (store.verify would wait up to 10 s for a missing file beside a writer: this store)
    conn = sqlite3.connect(store.root / "index.db")
    try:
        assert [p.kind for p in check_version_files(store.root, conn, 1)] == ["missing_file"]
    finally:
        conn.close()
    path.symlink_to("/etc/hostname")
    assert [p.kind for p in store.verify(1)] == ["not_a_file"]
    with pytest.raises(IntegrityError):
        store.read_file(1, version, "config.json")
    path.unlink()
    path.write_bytes(b"{}  ")


def test_retention_removes_a_versions_files_with_it(store_dir: Path) -> None:
    with PersistentStore(store_dir, retention=1) as store:
        first = store.save_context(1, Context({"w": np.zeros(2)}), files={"a.txt": b"1"})
        second = store.save_context(1, Context({"w": np.ones(2)}), files={"a.txt": b"2"})
        store.wait_background()
        assert not (store_dir / f"slots/1/{first}").exists()
        assert store.read_query("SELECT version FROM version_files") == [(second,)]
        assert store.verify() == []


def test_a_store_of_schema_4_gains_the_files_table(store_dir: Path) -> None:
    with PersistentStore(store_dir) as store:
        store.save_context(1, Context({"w": np.zeros(2)}))
    conn = sqlite3.connect(store_dir / "index.db")
    conn.executescript("DROP TABLE version_files; PRAGMA user_version = 4;")
    conn.close()
    with PersistentStore(store_dir) as store:
        assert store.read_query("PRAGMA user_version") == [(LATEST,)]
        assert store.list_files(1) == ()
        store.save_context(1, Context({"w": np.zeros(2)}), files={"a.txt": b"1"})
        assert store.verify() == []


_CRASHING_COMMIT = """
import sys
from ctxstore import PersistentStore
from ctxstore.nodes import open_import
with PersistentStore(sys.argv[1]) as store, open_import(sys.argv[2]) as imported:
    store.save_import(1, imported)
"""


@pytest.mark.parametrize("point", ["staging", "staged", "renamed", "in_transaction", "committed"])
def test_a_killed_import_leaves_its_version_whole_or_invisible(tmp_path: Path, point: str) -> None:
    weights = tensors()
    ckpt = write_checkpoint(tmp_path / "ckpt", weights, SHARDS)
    store_dir = tmp_path / "store"
    after = "1" if point == "staging" else "0"  # staging: the second tensor, after a written one
    env = {**os.environ, "CTXSTORE_CRASH_AT": point, "CTXSTORE_CRASH_AFTER": after}
    child = subprocess.run([sys.executable, "-c", _CRASHING_COMMIT, str(store_dir), str(ckpt)],
                           env=env, capture_output=True, timeout=120, check=False)  # fmt: skip
    assert child.returncode == -9, child.stderr.decode()
    with PersistentStore(store_dir) as store:
        assert store.verify() == []
        if point == "committed":
            ctx = store.load_context(1, 1, verify=True)
            assert all(np.array_equal(ctx[n], a) for n, a in weights.items())
            assert store.read_file(1, 1, "tokenizer.json") == (ckpt / "tokenizer.json").read_bytes()
        else:
            assert store.list_slots() == []
            assert list((store_dir / "wal").iterdir()) == []


def test_export_writes_a_loadable_directory_and_never_overwrites(
    store: PersistentStore, tmp_path: Path
) -> None:
    weights = tensors()
    ckpt = write_checkpoint(tmp_path / "ckpt", weights, SHARDS)
    with open_import(ckpt) as imported:
        version = store.save_import(1, imported)
    out = tmp_path / "out"
    written = export_version(store, 1, version, out, max_shard_bytes=600)
    assert sorted(written) == sorted(os.listdir(out))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(weights)
    loaded: dict[str, np.ndarray] = {}
    for shard in sorted(set(index["weight_map"].values())):
        assert os.path.getsize(out / shard) < 600 + 1024  # a shard: at most one tensor over
        loaded |= load_weights_file(out / shard)  # (safetensors' numpy loader lacks fp8)
    assert all(np.array_equal(loaded[n], a) and loaded[n].dtype == a.dtype
               for n, a in weights.items())  # fmt: skip
    for name in EXTRA:
        assert (out / name).read_bytes() == (ckpt / name).read_bytes()
    with pytest.raises(ConflictError, match="already exists"):
        export_version(store, 1, version, out)
    single = export_version(store, 1, None, tmp_path / "single")
    assert "model.safetensors" in single and "model.safetensors.index.json" not in single
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_writes_the_config_when_a_version_has_no_config_file(
    store: PersistentStore, tmp_path: Path
) -> None:
    store.save_context(1, Context({"w": np.ones(3, "f4")}, config={"hidden_size": 3}))
    export_version(store, 1, None, tmp_path / "out")
    assert json.loads((tmp_path / "out/config.json").read_text()) == {"hidden_size": 3}
    assert np.array_equal(safetensors.numpy.load_file(tmp_path / "out/model.safetensors")["w"],
                          np.ones(3, "f4"))  # fmt: skip


def test_file_node_imports_a_checkpoint_directory(store: PersistentStore, tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt", tensors(), SHARDS)
    node = FileNode(3, {"path": str(ckpt)})
    FileNode.check_inputs(node.config)
    with node.build_import() as imported:
        version = store.save_import(3, imported, model_type=node.model_type)
    meta = store.get_metadata(3, version)
    assert meta.config["hidden_size"] == 8 and meta.metadata["node_type"] == "file"
    with pytest.raises(InvalidInputError, match="more than the limit of 1"):
        FileNode(3, {"path": str(ckpt), "max_files": 1}).build_import()


def test_http_file_jobs_import_a_checkpoint_directory_within_the_daemons_limits(
    tmp_path: Path,
) -> None:
    """A ``file`` job names a directory: it is checked against the import roots when
    queued, imported as one version with its files, and the daemon's ``imports.*``
    settings bound it (a job's own config can only lower them)."""
    import asyncio

    import httpx
    from support.inprocess import error_of, job_finished, run

    from ctxstore.daemon.server import Daemon

    root = tmp_path / "models"
    ckpt = write_checkpoint(root / "llama", tensors(), SHARDS)
    outside = write_checkpoint(tmp_path / "outside", tensors())

    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        refused = {"slot": 1, "node_type": "file", "config": {"path": str(outside)}}
        error_of(await http.post("/jobs", json=refused), 403, "permission_denied")
        body = {"slot": 1, "node_type": "file", "config": {"path": str(ckpt)}}
        done = await job_finished(http, (await http.post("/jobs", json=body)).json()["job"]["id"])
        assert (done["state"], done["version"]) == ("done", 1), done
        store = daemon.store
        assert store is not None
        assert store.read_file(1, 1, "tokenizer.json") == (ckpt / "tokenizer.json").read_bytes()
        assert store.get_metadata(1).config["hidden_size"] == 8
        daemon.config = daemon.config.replace(import_max_files=2)
        failed = await job_finished(http, (await http.post("/jobs", json=body)).json()["job"]["id"])
        assert failed["state"] == "failed", failed
        assert "more than the limit of 2" in str(failed["error"]), failed
        assert await asyncio.to_thread(store.list_versions, 1) != []

    run(tmp_path, scenario, import_roots=(root,))


def test_a_shard_that_changes_after_its_check_fails_the_commit_cleanly(
    store: PersistentStore, tmp_path: Path
) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt", tensors(), SHARDS)
    with open_import(ckpt) as imported:
        shard = ckpt / "model-00003-of-00003.safetensors"
        os.truncate(shard, shard.stat().st_size - 16)  # after its header was checked
        with pytest.raises(InvalidInputError, match="changed while it was imported"):
            store.save_import(1, imported)
    assert_nothing_committed(store)


def test_pre_commit_hooks_see_an_imports_tensors_and_can_refuse_it(
    store: PersistentStore, tmp_path: Path
) -> None:
    weights = tensors()
    ckpt = write_checkpoint(tmp_path / "ckpt", weights, SHARDS)
    seen: dict[str, np.ndarray] = {}

    def hook(slot: int, context: Context) -> None:
        seen.update({name: np.array(array) for name, array in context.weights.items()})
        assert context.config["hidden_size"] == 8
        raise InvalidInputError("refused by the hook")

    store.pre_commit_hooks.append(hook)
    with open_import(ckpt) as imported, pytest.raises(InvalidInputError, match="the hook"):
        store.save_import(1, imported)
    assert set(seen) == set(weights)
    assert all(np.array_equal(seen[n], a) for n, a in weights.items())
    assert_nothing_committed(store)


def test_cli_show_lists_a_versions_files(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ctxstore.cli import main

    with PersistentStore(store_dir) as store:
        store.save_context(1, Context({"w": np.zeros(2)}), files={"config.json": b"{}"})
    assert main(["show", "--store", str(store_dir), "1"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == [{"name": "config.json", "size": 2}]


def test_building_a_context_from_a_directory_says_how_to_import_it(tmp_path: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt", tensors())
    with pytest.raises(InvalidInputError, match="build_import"):
        FileNode(1, {"path": str(ckpt)}).build_context()


def test_a_checkpoint_publish_reports_the_bytes_it_copied_and_its_hooks_see_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Progress frames of a directory publish count the tensor bytes copied into the store;
    the daemon's pre-commit hook (paused, after the copy) sees exactly the checkpoint."""
    import threading
    import time

    from support.contexts import digest
    from support.hooks import BOUND, hooked_daemon, seen_by_hook

    from ctxstore.client import publish
    from ctxstore.messages import Progress

    # (the pause hook hashes bytes(array.data), which ml_dtypes' buffers cannot give)
    weights = {n: a for n, a in tensors().items() if n not in ("layers.0.bf16", "layers.1.fp8")}
    shards = [[n for n in shard if n in weights] for shard in SHARDS]
    ckpt = write_checkpoint(tmp_path / "ckpt", weights, shards)
    total = sum(a.nbytes for a in weights.values())
    settings = "publish_progress_interval = 0.05"
    with hooked_daemon(tmp_path, monkeypatch, settings=settings) as (daemon, pauser):
        pauser.arm()
        updates: list[Progress] = []
        result: list[object] = []
        thread = threading.Thread(
            target=lambda: result.append(
                publish(4, ckpt, socket=daemon.socket, progress=updates.append)
            ),
            daemon=True,
        )
        thread.start()
        pauser.wait_paused(lambda: daemon.proc.poll() is None)
        deadline = time.monotonic() + BOUND
        while not any(u.stage == "committing" and u.done == total for u in updates):
            assert time.monotonic() < deadline and thread.is_alive(), (updates, result)
            time.sleep(0.02)
        pauser.release()
        thread.join(BOUND)
        assert result == [1]
        assert all(u.total == total for u in updates if u.stage == "committing")
        assert seen_by_hook(tmp_path, 4) == {n: digest(a) for n, a in weights.items()}


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a peer as another uid")
def test_a_peer_imports_only_a_directory_whose_every_file_it_owns(
    guarded: DaemonProcess,
) -> None:
    """Ownership is checked on the directory and on each file read from it: a peer's own
    checkpoint with one file of root's in it is refused, naming that file only."""
    from support.procs import PEER_UID, as_uid

    from ctxstore import CtxStoreError
    from ctxstore.client import publish

    ckpt = write_checkpoint(guarded.socket.parent / "ckpt", tensors(), SHARDS)
    for path in (ckpt, *ckpt.iterdir()):
        os.chown(path, PEER_UID, 0)
    secret = ckpt / "notes.txt"
    secret.write_text("root's secret")
    secret.chmod(0o600)  # root's: the peer cannot read it, the daemon (root here) can

    def publish_twice() -> bytes:
        answers = []
        for _ in range(2):
            try:
                answers.append(f"version {publish(1, ckpt, socket=guarded.socket)}")
            except CtxStoreError as exc:
                answers.append(str(exc))
            secret.unlink(missing_ok=True)  # the peer owns the directory: it may
        return json.dumps(answers).encode()

    received = as_uid(PEER_UID, publish_twice)
    answers = json.loads(received) if received.startswith(b"[") else [received.decode()]
    assert f"'notes.txt' belongs to uid 0, not to the requesting uid {PEER_UID}" in answers[0]
    assert "root's secret" not in answers[0]
    assert answers[1] == "version 1", answers


def test_a_files_directory_replaced_by_a_link_is_reported_and_never_followed(
    store: PersistentStore, tmp_path: Path
) -> None:
    version = store.save_context(1, Context({"w": np.zeros(2)}), files={"a.txt": b"mine"})
    files = store.root / f"slots/1/{version}/files"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.txt").write_bytes(b"mine")
    os.chmod(files, 0o755)
    for name in os.listdir(files):
        (files / name).unlink()
    files.rmdir()
    files.symlink_to(elsewhere)
    assert [p.kind for p in store.verify(1)] == ["stray_entry"]
    with pytest.raises(IntegrityError, match="cannot be read"):
        store.read_file(1, version, "a.txt")
    files.unlink()
    files.mkdir()
    (files / "a.txt").write_bytes(b"mine")
