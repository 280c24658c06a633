"""The origin's records and keys (sans-IO), the store's fixed-number commit a follower
uses, and the scale-out settings: no servers needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctxstore import Context
from ctxstore.daemon.config import DaemonConfig
from ctxstore.errors import ConflictError, IntegrityError, InvalidInputError
from ctxstore.origin.layout import FileEntry, Head, Manifest, Origin, TensorEntry, set_aliases
from ctxstore.store import PersistentStore

SUM = "0123456789abcdef0123456789abcdef"


def test_origin_urls_parse_to_bucket_and_prefix_and_bad_ones_say_why() -> None:
    origin = Origin.parse("s3://models/prod/eu/")
    assert (origin.bucket, origin.prefix) == ("models", "prod/eu")
    assert origin.object_key(SUM) == f"prod/eu/objects/{SUM}"
    assert origin.manifest_key(3, 12) == "prod/eu/manifests/3/12.json"
    assert origin.slot_of_head(origin.head_key(42)) == 42
    assert origin.slot_of_head("prod/eu/heads/x.json") is None
    assert Origin.parse("s3://models").key("heads", "1.json") == "heads/1.json"
    for bad, why in [
        ("http://models/p", "s3://BUCKET"),
        ("s3://Bad_Bucket/p", "no valid S3 bucket"),
        ("s3://models/a/../b", "'..'"),
        ("s3://models/p?x=1", "no query"),
    ]:
        with pytest.raises(InvalidInputError, match=why):
            Origin.parse(bad)


def test_manifests_and_heads_round_trip_and_damage_is_an_integrity_error() -> None:
    manifest = Manifest(
        1, 2, "mlp", {"d": 4}, {"note": "x"},
        (TensorEntry("w", "float32", (2, 3), 128, 24, SUM),),
        (FileEntry("config.json", 10, SUM),),
    )  # fmt: skip
    assert Manifest.from_bytes(manifest.to_bytes(), "m") == manifest
    assert manifest.tensors[0].size == 152
    head = Head(1, 7, 2, {"stable": 1}, "mlp", (1, 2))
    assert Head.from_bytes(head.to_bytes(), "h") == head
    for data in [b"not json", b'{"kind": "ctxstore.head"}', manifest.to_bytes()]:
        with pytest.raises(IntegrityError, match="h is"):
            Head.from_bytes(data, "h")
    forged = manifest.to_bytes().replace(SUM.encode(), b"../../etc/passwd", 1)
    with pytest.raises(IntegrityError, match="no valid manifest"):
        Manifest.from_bytes(forged, "m")
    with pytest.raises(IntegrityError, match="reserved"):
        Head.from_bytes(Head(1, 1, 1, {"latest": 1}).to_bytes(), "h")
    assert set_aliases({"latest": 3, "stable": 2}) == {"stable": 2}


def test_a_commit_at_a_given_number_skips_ahead_and_never_goes_back(tmp_path: Path) -> None:
    """A follower keeps its origin's numbers: version=N commits N (the next is N + 1);
    a number below the slot's next is refused and leaves nothing behind."""
    ctx = Context({"w": np.arange(4, dtype=np.float32)}, {}, {})
    with PersistentStore(tmp_path / "store") as store:
        assert store.save_context(1, ctx, version=5) == 5
        assert store.save_context(1, ctx) == 6
        with pytest.raises(ConflictError, match="next version is 7"):
            store.save_context(1, ctx, version=3)
        assert [v.version for v in store.list_versions(1)] == [5, 6]
        assert store.verify() == []


def test_a_daemon_is_a_writer_or_a_follower_not_both() -> None:
    with pytest.raises(InvalidInputError, match="not both"):
        DaemonConfig(origin="s3://models/a", follow="s3://models/a")
    with pytest.raises(InvalidInputError, match=r"cluster\.feed"):
        DaemonConfig(feed="http://nats:4222")
    assert DaemonConfig(follow="s3://models/a/").follow == "s3://models/a"
