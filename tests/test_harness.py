"""The test harness's own guarantees: what the suite starts does not outlive it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

TESTS = Path(__file__).parent

PARENT = f"""
import subprocess, sys, time
sys.path.insert(0, {str(TESTS)!r})
from support.procs import dies_with_pytest
program = "import time; print('running', flush=True); time.sleep(120)"
child = subprocess.Popen(dies_with_pytest([sys.executable, "-c", program]),
                         stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "running"  # past the wrapper, in the program
print(child.pid, flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_child_started_through_dies_with_pytest_dies_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert not _gone(child)
        parent.kill()  # as a CI timeout or a crash would: no clean-up runs in the parent
        parent.wait(30)
        deadline = time.monotonic() + 30
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _gone(child), "the child outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(30)
        parent.stdout.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
