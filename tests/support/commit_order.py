"""The commit protocol's order (docs/reliability.md), checked over the calls a commit made:
a recorder of fsync, rename and link, and the check of what it recorded."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest


@dataclass
class Recorder:
    events: list[tuple[str, str]] = field(default_factory=list)

    def add(self, kind: str, what: str) -> None:
        self.events.append((kind, what))


def record_commit_calls(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """A Recorder of every fsync, rename and link made until ``monkeypatch`` undoes it (the
    caller adds SQLite's statements and the announcements)."""
    rec = Recorder()
    real_fsync, real_rename, real_link = os.fsync, os.rename, os.link

    def rec_fsync(fd: int) -> None:
        real_fsync(fd)
        rec.add("fsync", os.readlink(f"/proc/self/fd/{fd}"))

    def rec_rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        real_rename(src, dst)
        rec.add("rename", f"{os.fspath(src)} -> {os.fspath(dst)}")

    def rec_link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        real_link(src, dst)  # a link to an already durable file needs no fsync of its own
        rec.add("linked", os.fspath(dst))

    monkeypatch.setattr(os, "fsync", rec_fsync)
    monkeypatch.setattr(os, "rename", rec_rename)
    monkeypatch.setattr(os, "link", rec_link)
    return rec


def check_commit_order(events: list[tuple[str, str]]) -> list[str]:
    """Every way ``events`` (one commit) breaks the protocol; empty when it is followed."""
    problems: list[str] = []
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    commits = [i for i, (kind, what) in enumerate(events) if kind == "sql" and what == "COMMIT"]
    announces = [i for i, (kind, _) in enumerate(events) if kind == "announce"]
    if len(renames) != 1:
        return [f"expected one rename of the staged version, saw {len(renames)}"]
    rename = renames[0]
    staging, target = events[rename][1].split(" -> ")
    version_commit = next((i for i in commits if i > rename), None)
    if version_commit is None:
        return ["no COMMIT after the rename"]
    fsynced_before = {what for kind, what in events[:rename] if kind == "fsync"}
    linked = {what for kind, what in events[:rename] if kind == "linked"}
    for name in sorted(os.listdir(target)):  # every file the committed version holds
        staged = f"{staging}/{name}"
        if staged not in linked and staged not in fsynced_before:
            problems.append(f"{staged} was not fsynced before the rename")
    slot_dir = os.path.dirname(target)
    between = {what for kind, what in events[rename:version_commit] if kind == "fsync"}
    entries_made = [
        i
        for i, (kind, what) in enumerate(events[:rename])
        if kind in ("fsync", "linked") and os.path.dirname(what) == staging
    ]  # a directory fsynced before its last entry was made does not make that entry durable
    staging_synced = any(
        kind == "fsync" and what == staging
        for kind, what in events[max(entries_made, default=0) : rename]
    )
    if not staging_synced and target not in between:
        problems.append(
            f"version directory {target} was fsynced neither as {staging} after its entries "
            "and before the rename, nor between rename and COMMIT"
        )
    if slot_dir not in between:
        problems.append(f"slot directory {slot_dir} was not fsynced between rename and COMMIT")
    if any(i < version_commit for i in announces):
        problems.append("announced before COMMIT")
    if not announces:
        problems.append("never announced")
    return problems
