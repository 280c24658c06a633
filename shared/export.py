"""Export a stored version as a standard Hugging Face checkpoint directory.

Users are never locked in: ``ctxstore export SLOT [VERSION] DIR`` writes what
``save_pretrained`` would, which ``AutoModelForCausalLM.from_pretrained(DIR)``
loads: ``model.safetensors`` (or shards of at most ``max_shard_bytes`` with a
``model.safetensors.index.json``), written with the safetensors library, plus
every extra file of the version byte-exact (``config.json`` among them; when a
version has no ``config.json`` file but a config, that is written as one).

The directory is assembled beside its destination and renamed into place at
the end, so a failed export leaves nothing half-written; an existing
destination is never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .context import Array
from .errors import ConflictError, InvalidInputError, StorageError
from .store import StoreView, VersionRef
from .store.durable import remove_tree
from .validation import thaw_json

#: shards are cut above this many bytes (``save_pretrained``'s default, "5GB")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


def shard_groups(weights: Mapping[str, Array], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names in stored order, cut into shards of at most ``max_shard_bytes``
    (a larger tensor gets a shard of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, array in weights.items():
        if groups[-1] and size + array.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += int(array.nbytes)
    return groups


def export_version(
    store: StoreView,
    slot: int,
    version: VersionRef,
    directory: str | os.PathLike[str],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write ``slot``'s ``version`` (None: current) to the new ``directory``; returns the
    names written. The tensors are re-hashed against their checksums on the way."""
    import safetensors.numpy  # only the export needs it

    if max_shard_bytes < 1:
        raise InvalidInputError(f"max shard size must be at least 1 byte, got {max_shard_bytes}")
    target = Path(directory)
    if target.exists() or target.is_symlink():
        raise ConflictError(f"{target} already exists; export writes a new directory")
    context = store.load_context(slot, version, verify=True)
    number = context.version
    files = {info.name: store.read_file(slot, number, info.name) for info in
             store.list_files(slot, number)}  # fmt: skip
    groups = shard_groups(context.weights, max_shard_bytes)
    names = (
        [SINGLE_NAME]
        if len(groups) == 1
        else [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    )
    with _staging(target) as staging:
        for shard, group in zip(names, groups, strict=True):
            tensors = {name: context[name] for name in group}
            path = str(staging / shard)
            try:
                safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
            except (ValueError, TypeError) as exc:  # a dtype safetensors has no name for
                raise InvalidInputError(
                    f"slot {slot} version {number} cannot be written as safetensors: {exc}"
                ) from None
        written = list(names)
        if len(groups) > 1:
            index = {
                "metadata": {"total_size": context.nbytes},
                "weight_map": {t: s for s, g in zip(names, groups, strict=True) for t in g},
            }
            (staging / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            written.append(INDEX_NAME)
        if CONFIG_NAME not in files and context.config:
            files[CONFIG_NAME] = _config_json(thaw_json(context.config))
        for name, data in files.items():
            if name in written:
                continue  # a stored file never shadows the weights written here
            (staging / name).write_bytes(data)
            written.append(name)
    return written


def _config_json(config: dict[str, Any]) -> bytes:
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A new directory beside ``target``, renamed to it when the block succeeds."""
    staging = target.parent / f".{target.name}.export-{secrets.token_hex(4)}"
    try:
        staging.mkdir(parents=False)
    except OSError as exc:
        raise StorageError(exc.errno, f"cannot create {staging}: {exc.strerror}") from exc
    try:
        yield staging
        try:
            os.rename(staging, target)  # an empty directory at target would be replaced
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot create {target}: {exc.strerror}") from exc
    except BaseException:
        remove_tree(staging)
        raise
