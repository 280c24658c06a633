"""Commands that move contexts in and out: ``publish`` and ``build`` (through the daemon)
and ``export`` (a version written out as a checkpoint directory)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from .common import Commands, open_store, slot_arg, socket_path


def cmd_publish(args: argparse.Namespace) -> int:
    from ctxstore.client import publish
    from ctxstore.progress import ProgressLine

    line = ProgressLine(sys.stderr, f"slot {args.slot}")
    try:
        version = publish(
            args.slot, args.file, socket=socket_path(args), model_type=args.type,
            alias=args.alias, key=args.key, progress=line,
        )  # fmt: skip
    finally:
        line.finish()
    print(f"slot {args.slot}: published version {version}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a version as a Hugging Face checkpoint directory (docs/huggingface.md)."""
    from ctxstore.export import export_version

    version, directory = (None, args.first) if args.second is None else (args.first, args.second)
    with open_store(args) as store:
        written = export_version(
            store, args.slot, version, directory, max_shard_bytes=args.max_shard_size
        )
    print(f"slot {args.slot}: wrote {len(written)} files to {directory}")
    return 0


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def byte_size(text: str) -> int:
    """A size in bytes from ``5GB``, ``500MiB`` or a plain number (what save_pretrained takes)."""
    number = text.strip().upper().rstrip("BIKMGT")
    unit = text.strip().upper()[len(number) :]
    try:
        value = int(float(number) * _SIZE_UNITS[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (a number of bytes, or with a unit: 500MB, 2GiB)"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be at least 1 byte")
    return value


def parse_setting(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as JSON when it parses (numbers, bools), else text.

    ``NaN`` and ``Infinity`` are not JSON (Python's reader takes them): they stay text,
    so the node type says what it expected instead of a non-finite number reaching it.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw, parse_constant=_not_json)
    except ValueError:
        return key, raw


def _not_json(constant: str) -> NoReturn:
    raise ValueError(f"{constant} is not JSON")


def cmd_build(args: argparse.Namespace) -> int:
    from ctxstore.client import build

    version = build(
        args.slot, args.type, dict(args.set), socket=socket_path(args), alias=args.alias
    )
    print(f"slot {args.slot}: built and published version {version}")
    return 0


def register(commands: Commands) -> None:
    p = commands.add(
        "publish", cmd_publish,
        "commit a .npy/.npz/.safetensors file or a Hugging Face checkpoint directory "
        "through the daemon",
    )  # fmt: skip
    p.add_argument("slot", type=slot_arg)
    p.add_argument("file", type=Path, help="weights file or checkpoint directory")
    p.add_argument("--type", default=None, help="model type of the slot")
    p.add_argument("--alias", default=None, help="point this alias at the new version")
    p.add_argument(
        "--key",
        default=None,
        help="idempotency key (8-128 of A-Z a-z 0-9 _ -; default: random): a publish "
        "retried with the key of one that was committed is not committed again",
    )

    p = commands.add("export", cmd_export, "write a version as a Hugging Face checkpoint directory")
    p.add_argument("slot", type=slot_arg)
    p.add_argument("first", metavar="[VERSION] DIR", help="version or alias (default current)")
    p.add_argument("second", nargs="?", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--max-shard-size", type=byte_size, default="5GB",
        help="cut model.safetensors into shards above this size (default 5GB)",
    )  # fmt: skip

    p = commands.add("build", cmd_build, "build a context with a node type and commit it")
    p.add_argument("slot", type=slot_arg)
    p.add_argument("--type", required=True, help="node type: llm, cnn, file or a plugin's")
    p.add_argument(
        "--set",
        type=parse_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config value (repeat)",
    )
    p.add_argument("--alias", default=None)
