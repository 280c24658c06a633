"""Hugging Face checkpoint directories, as ``save_pretrained`` writes them.

One ``model.safetensors``, or shards listed by a ``*.safetensors.index.json``
(its ``weight_map`` names each tensor's shard). All shards become one version.
Everything is checked before the store sees a byte: a shard the index names
but the directory lacks, a ``.safetensors`` file the index does not name, a
tensor in a shard the index does not put there, or a tensor named twice is
refused, so nothing is half-committed.

``config.json`` becomes the context's config; it and every other regular file
of the directory (generation config, tokenizer files, chat template, README)
travel with the version byte-exact as extra files (:mod:`ctxstore.versionfiles`),
within the import's limits on their count and size. The index itself does not
travel: it describes the shards, which ``ctxstore export`` writes anew.
Hidden entries (``.cache``, ``.gitattributes``) and subdirectories are skipped
and listed in the version's ``source`` metadata. Files are opened relative to
the directory's descriptor without following symlinks: a symlink, or anything
but a regular file, is refused, so nothing outside the directory is read.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from ..errors import InvalidInputError
from ..sources import Imported
from ..validation import MAX_TENSORS
from ..versionfiles import check_file_name
from .files import FileCheck, ImportLimits, safetensors_layout
from .imports import _add_spans, open_checked

INDEX_SUFFIX = ".safetensors.index.json"
SHARD_SUFFIX = ".safetensors"
CONFIG_NAME = "config.json"
#: entries listed before a directory is refused as not a checkpoint
MAX_ENTRIES = 100_000
#: the extra files of one import together: at most this many times max_file_bytes
TOTAL_FILE_BYTES_FACTOR = 4


def read_checkpoint(
    dir_fd: int, name: str, imported: Imported, limits: ImportLimits, check: FileCheck | None
) -> None:
    """Fill ``imported`` from the checkpoint directory open on ``dir_fd``."""
    where = f"checkpoint directory {name!r}"
    shards, indexes, others, skipped = _entries(dir_fd, where)
    if len(indexes) > 1:
        raise InvalidInputError(f"{where} holds several shard indexes: {', '.join(indexes)}")
    weight_map = _weight_map(dir_fd, indexes[0], where, limits, check) if indexes else None
    if weight_map is None:
        if not shards:
            raise InvalidInputError(
                f"{where} holds no model.safetensors (only safetensors checkpoints are "
                "imported; pickled .bin weights are never read)"
            )
        if len(shards) > 1:
            raise InvalidInputError(
                f"{where} holds several .safetensors files ({', '.join(shards[:4])}) "
                f"and no {INDEX_SUFFIX[1:]} that names them"
            )
    else:
        _check_shard_set(shards, set(weight_map.values()), indexes[0], where)
    total, file_metadata = _add_shards(dir_fd, shards, weight_map, where, imported, limits, check)
    if weight_map is not None and len(weight_map) != len(imported.tensors):
        lost = next(t for t in weight_map if t not in imported.tensors)
        raise InvalidInputError(
            f"{where}: the index puts tensor {lost!r:.80} in {weight_map[lost]!r}, "
            "which does not hold it"
        )
    imported.files = _extra_files(dir_fd, others, where, limits, check)
    if CONFIG_NAME in imported.files:
        imported.config = _json_object(imported.files[CONFIG_NAME], f"{where} {CONFIG_NAME}")
    source: dict[str, Any] = {
        "path": os.path.abspath(name),
        "format": "checkpoint",
        "bytes": total,
        "shards": shards,
    }
    if skipped:
        source["skipped"] = skipped
    imported.metadata = {"source": source}
    if file_metadata:
        imported.metadata["file_metadata"] = file_metadata


def _add_shards(  # noqa: PLR0917 (the import's state, passed down once)
    dir_fd: int,
    shards: list[str],
    weight_map: dict[str, str] | None,
    where: str,
    imported: Imported,
    limits: ImportLimits,
    check: FileCheck | None,
) -> tuple[int, dict[str, str]]:
    """Check each shard's header against the index and add its tensors as sources; returns
    the tensor bytes and the first shard's ``__metadata__``."""
    total = 0
    file_metadata: dict[str, str] = {}
    for shard in shards:
        shard_where = f"{where} shard {shard!r}"
        fd = open_checked(shard, dir_fd, shard_where, check)
        imported.closers.append(functools.partial(os.close, fd))
        stream = os.fdopen(os.dup(fd), "rb")
        imported.closers.append(stream.close)
        spans, metadata, start = safetensors_layout(stream, os.fstat(fd).st_size, shard_where)
        file_metadata = file_metadata or metadata
        if weight_map is not None:
            for span in spans:
                if weight_map.get(span.name) != shard:
                    placed = weight_map.get(span.name)
                    raise InvalidInputError(
                        f"{shard_where} holds tensor {span.name!r:.80}, which the index "
                        + ("does not name" if placed is None else f"puts in {placed!r}")
                    )
        if any(span.name in imported.tensors for span in spans):
            twice = next(span.name for span in spans if span.name in imported.tensors)
            raise InvalidInputError(f"{where}: tensor {twice!r:.80} is in two shards")
        total += sum(span.end - span.begin for span in spans)
        if total > limits.max_bytes:
            raise InvalidInputError(
                f"{where}: its tensors are larger than the limit of {limits.max_bytes} bytes"
            )
        _add_spans(imported, fd, spans, start, shard_where)
        if len(imported.tensors) > MAX_TENSORS:
            raise InvalidInputError(f"{where} holds more than {MAX_TENSORS} tensors")
    return total, file_metadata


def _entries(dir_fd: int, where: str) -> tuple[list[str], list[str], list[str], list[str]]:
    """The directory's shards, shard indexes, other files and skipped entries, sorted."""
    shards: list[str] = []
    indexes: list[str] = []
    others: list[str] = []
    skipped: list[str] = []
    with os.scandir(dir_fd) as entries:
        for count, entry in enumerate(entries):
            if count >= MAX_ENTRIES:
                raise InvalidInputError(f"{where} has more than {MAX_ENTRIES} entries")
            name = entry.name
            if name.startswith(".") or entry.is_dir(follow_symlinks=False):
                skipped.append(name)
            elif name.endswith(INDEX_SUFFIX):
                indexes.append(name)
            elif name.endswith(SHARD_SUFFIX):
                shards.append(name)
            else:
                others.append(name)
    return sorted(shards), sorted(indexes), sorted(others), sorted(skipped)[:64]


def _weight_map(
    dir_fd: int, index: str, where: str, limits: ImportLimits, check: FileCheck | None
) -> dict[str, str]:
    index_where = f"{where} index {index!r}"
    document = _json_object(_read_small(dir_fd, index, index_where, limits, check), index_where)
    weight_map = document.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InvalidInputError(f"{index_where}: weight_map must map tensor names to shard files")
    for shard in set(weight_map.values()):
        if "/" in shard or shard.startswith(".") or not shard.endswith(SHARD_SUFFIX):
            raise InvalidInputError(
                f"{index_where} names shard {shard!r:.80}: a shard must be a .safetensors "
                "file directly in the directory"
            )
    return weight_map


def _check_shard_set(present: list[str], named: set[str], index: str, where: str) -> None:
    missing = sorted(named - set(present))
    if missing:
        raise InvalidInputError(
            f"{where}: its index {index!r} names shard {missing[0]!r:.80}, which is missing"
        )
    extra = sorted(set(present) - named)
    if extra:
        raise InvalidInputError(
            f"{where}: shard {extra[0]!r:.80} is not named by its index {index!r}"
        )


def _extra_files(
    dir_fd: int, names: list[str], where: str, limits: ImportLimits, check: FileCheck | None
) -> dict[str, bytes]:
    if len(names) > limits.max_files:
        raise InvalidInputError(
            f"{where} holds {len(names)} files besides its weights, more than the limit of "
            f"{limits.max_files}"
        )
    files: dict[str, bytes] = {}
    total, most = 0, TOTAL_FILE_BYTES_FACTOR * limits.max_file_bytes
    for name in names:
        file_where = f"{where} file {name!r:.80}"
        try:
            check_file_name(name)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{file_where}: {exc}") from None
        files[name] = _read_small(dir_fd, name, file_where, limits, check)
        total += len(files[name])
        if total > most:  # they are held in memory until the commit
            raise InvalidInputError(
                f"{where}: its files besides the weights are larger than the limit of {most} "
                f"bytes together ({TOTAL_FILE_BYTES_FACTOR} x max_file_bytes)"
            )
    return files


def _read_small(
    dir_fd: int, name: str, where: str, limits: ImportLimits, check: FileCheck | None
) -> bytes:
    """A whole small file of the directory, refused when over ``max_file_bytes``."""
    fd = open_checked(name, dir_fd, where, check)
    with os.fdopen(fd, "rb") as f:
        if os.fstat(fd).st_size > limits.max_file_bytes:
            raise InvalidInputError(
                f"{where} is larger than the limit of {limits.max_file_bytes} bytes for a "
                "file that travels with a version"
            )
        data = f.read(limits.max_file_bytes + 1)
    if len(data) > limits.max_file_bytes:
        raise InvalidInputError(f"{where} grew past the limit while it was read")
    return data


def _json_object(data: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        raise InvalidInputError(f"{where} is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{where} is not a JSON object")
    return value
