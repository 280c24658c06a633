"""A daemon whose pre-commit hook records what it saw and can hold a commit."""

from __future__ import annotations

import contextlib
import json
import os
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.daemon import DaemonProcess, running_daemon

BOUND = 30.0  # seconds; only a hung daemon gets near it


PAUSE_HOOK = '''
import hashlib, json, os, time

def make(dir):
    """Record what each commit's hook saw, then hold the commit while dir/paused exists
    (armed by dir/arm, one pause per arming)."""
    def hook(slot, context):
        seen = {name: hashlib.sha256(bytes(a.data) if a.size else b"").hexdigest()
                for name, a in context.weights.items()}
        with open(os.path.join(dir, f"seen-{slot}.json"), "w") as out:
            json.dump(seen, out)
        arm = os.path.join(dir, "arm")
        if not os.path.exists(arm):
            return
        os.unlink(arm)
        paused = os.path.join(dir, "paused")
        open(paused, "x").close()
        deadline = time.monotonic() + 60
        while os.path.exists(paused) and time.monotonic() < deadline:
            time.sleep(0.01)
    return hook
'''


class Pauser:
    """Arms the pause hook (or the daemon's pause point) and releases it."""

    def __init__(self, marker: Path, arm: Path | None) -> None:
        self.marker = marker
        self.arm_file = arm

    def arm(self) -> None:
        if self.arm_file is not None:
            self.arm_file.touch()

    def wait_paused(self, alive: Callable[[], bool]) -> None:
        deadline = time.monotonic() + BOUND
        while not self.marker.exists():
            assert alive(), "the daemon died before it paused"
            assert time.monotonic() < deadline, "the daemon never reached the pause"
            time.sleep(0.01)

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.marker.unlink()


@contextlib.contextmanager
def hooked_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str, settings: str = ""
) -> Iterator[tuple[DaemonProcess, Pauser]]:
    """A daemon whose pre-commit hook records what it saw and pauses when armed."""
    config, pauser = pause_hook_config(tmp_path, monkeypatch, settings)
    with running_daemon(tmp_path, "--config", str(config), *extra) as daemon:
        yield daemon, pauser


def pause_hook_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: str = ""
) -> tuple[Path, Pauser]:
    """A configuration file with ``settings`` and the pause hook (importable by daemons
    started from now on), and the Pauser that drives the hook."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "pausehook.py").write_text(textwrap.dedent(PAUSE_HOOK))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
    )
    config = tmp_path / "ctxstore.toml"
    config.write_text(
        settings + "\n[[hooks.pre_commit]]\n"
        f'target = "pausehook:make"\noptions = {{ dir = "{hooks}" }}\n'
    )
    return config, Pauser(hooks / "paused", hooks / "arm")


def seen_by_hook(tmp_path: Path, slot: int) -> dict[str, str]:
    seen: dict[str, str] = json.loads((tmp_path / "hooks" / f"seen-{slot}.json").read_text())
    return seen
