"""Extra files of a version: small files that travel with the tensors, byte-exact.

A Hugging Face checkpoint is more than its weights: ``config.json``,
``generation_config.json``, the tokenizer files and a chat template are what
make it usable. They are stored beside the tensors in the version directory
(``files/<name>``), written into the staging directory before the rename and
recorded (size, xxh3-128) in the same transaction as the version, so they
share its atomicity, recovery, retention and verification. An identical file
already stored is hard-linked, like a tensor.

Names are plain file names (no directories, nothing hidden); count and size
are bounded (:data:`MAX_FILES`, :data:`MAX_FILE_BYTES`, and their settings).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .errors import InvalidInputError

#: default caps on a version's extra files: how many, and the bytes of each
MAX_FILES = 64
MAX_FILE_BYTES = 64 << 20
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}")


def check_file_name(name: object) -> str:
    """A valid extra file name, or InvalidInputError saying why not."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise InvalidInputError(
            f"file name {name!r:.80} is not allowed: a plain name of at most 255 letters, "
            "digits and ._+- that does not start with '.' or '-'"
        )
    return name


def check_files(
    files: Mapping[str, bytes] | None,
    *,
    max_files: int = MAX_FILES,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> dict[str, bytes]:
    """``files`` validated: allowed names, at most ``max_files`` of at most ``max_file_bytes``."""
    if not files:
        return {}
    if not isinstance(files, Mapping):
        raise InvalidInputError(f"files must map names to bytes, got {type(files).__name__}")
    if len(files) > max_files:
        raise InvalidInputError(f"{len(files)} extra files, more than the limit of {max_files}")
    out: dict[str, bytes] = {}
    for name, data in files.items():
        check_file_name(name)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidInputError(f"file {name!r} must be bytes, got {type(data).__name__}")
        if len(data) > max_file_bytes:
            raise InvalidInputError(
                f"file {name!r} is larger than the limit of {max_file_bytes} bytes"
            )
        out[name] = bytes(data)
    return out
