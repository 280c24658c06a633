"""Pure path functions for the store layout; readers import these too.

<root>/index.db                 SQLite index (WAL)
<root>/slots/<slot>/<version>/  one .npy per tensor, named by position
<root>/slots/<slot>/<version>/files/<name>  the version's extra files (config.json ...)
<root>/wal/<txid>/              staging for a version being committed
<root>/wal/spare-<token>/       an empty staging directory prepared for the next commit
<root>/LOCK                     flock held by the one writer
"""

from __future__ import annotations

from pathlib import Path

INDEX_NAME = "index.db"
SLOTS_DIR = "slots"
WAL_DIR = "wal"
LOCK_NAME = "LOCK"


def index_path(root: Path) -> Path:
    return root / INDEX_NAME


def lock_path(root: Path) -> Path:
    return root / LOCK_NAME


def slots_dir(root: Path) -> Path:
    return root / SLOTS_DIR


def wal_dir(root: Path) -> Path:
    return root / WAL_DIR


SPARE_PREFIX = "spare-"


def spare_staging_dir(root: Path, token: str) -> Path:
    """An empty staging directory made ahead of the commit that will use it."""
    return root / WAL_DIR / f"{SPARE_PREFIX}{token}"


def slot_dir(root: Path, slot: int) -> Path:
    return root / SLOTS_DIR / str(slot)


def version_dir(root: Path, slot: int, version: int) -> Path:
    return root / SLOTS_DIR / str(slot) / str(version)


def slot_dir_str(root: str, slot: int) -> str:
    """:func:`slot_dir` in the commit path's form: a string, no Path objects."""
    return f"{root}/{SLOTS_DIR}/{slot}"


def version_dir_str(root: str, slot: int, version: int) -> str:
    """:func:`version_dir` in the commit path's form."""
    return f"{root}/{SLOTS_DIR}/{slot}/{version}"


def tensor_file_name(position: int) -> str:
    return f"{position}.npy"


FILES_DIR = "files"


def version_file_str(root: str, slot: int, version: int, name: str) -> str:
    """Where a version's extra file ``name`` (already validated) is stored."""
    return f"{root}/{SLOTS_DIR}/{slot}/{version}/{FILES_DIR}/{name}"


def tensor_path_str(root: str, slot: int, version: int, position: int) -> str:
    """The hot-path form: plain string formatting, no Path objects."""
    return f"{root}/{SLOTS_DIR}/{slot}/{version}/{position}.npy"


def version_prefix_str(root: str, slot: int, version: int) -> str:
    """What a version's tensor file names (``<position>.npy``) follow, as a string."""
    return f"{root}/{SLOTS_DIR}/{slot}/{version}/"


def parse_int_name(name: str) -> int | None:
    """The integer a slot or version directory is named by, or None for anything else."""
    if not name.isdigit() or (len(name) > 1 and name[0] == "0"):
        return None
    return int(name)
