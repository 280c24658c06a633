"""End to end in real processes: a tiny bf16 Llama's sharded ``save_pretrained`` directory
published through a running daemon, four torch workers serving it from their Readers with
zero copies, bit-identical to what ``from_pretrained`` of that directory computes,
hot-swapped to the next version (published from Python as a state dict), and their
in-place writes kept private."""

from __future__ import annotations

import hashlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from support.daemon import running_daemon
from support.models import tiny_llama
from support.procs import dies_with_pytest

from ctxstore.client import publish
from ctxstore.store import PersistentStore

WORKER = Path(__file__).with_name("torch_worker.py")
SLOT = 3
WORKERS = 4


def reference_digest(model: torch.nn.Module) -> str:
    """The sha256 of the model's logits on the workers' fixed input, on one thread as they do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            logits = model(torch.arange(12).unsqueeze(0)).logits
    finally:
        torch.set_num_threads(threads)
    return hashlib.sha256(logits.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class Worker:
    """One forked worker's two pipes: commands in, JSON answers out."""

    def __init__(self, name: str, commands: IO[str], answers: IO[str]) -> None:
        self.name = name
        self.commands = commands
        self.answers = answers

    def send(self, command: str) -> None:
        self.commands.write(command + "\n")
        self.commands.flush()

    def answer(self, timeout: float = 120.0) -> dict[str, Any]:
        """The worker's next JSON line; fails (never hangs) if it dies or says nothing."""
        deadline = time.monotonic() + timeout
        while not select.select([self.answers], [], [], 0.5)[0]:
            assert time.monotonic() < deadline, f"{self.name} said nothing in {timeout} s"
        line = self.answers.readline()
        assert line, f"{self.name} exited (its stderr is in the test's output)"
        answer: dict[str, Any] = json.loads(line)
        return answer


@contextmanager
def workers(store: Path, socket: Path, count: int) -> Iterator[list[Worker]]:
    """``count`` workers forked from one process that imported torch (tests/torch_worker.py)."""
    pipes = [(os.pipe(), os.pipe()) for _ in range(count)]
    child_ends = [(commands[0], answers[1]) for commands, answers in pipes]
    argv = [sys.executable, str(WORKER), str(store), str(socket), str(SLOT)]
    argv += [f"{inp},{out}" for inp, out in child_ends]
    proc = subprocess.Popen(
        dies_with_pytest(argv), pass_fds=[fd for end in child_ends for fd in end]
    )
    fleet = []
    for i, (commands, answers) in enumerate(pipes):
        os.close(commands[0])
        os.close(answers[1])
        fleet.append(Worker(f"w{i}", open(commands[1], "w"), open(answers[0])))  # noqa: SIM115
    try:
        yield fleet
    finally:
        for worker in fleet:
            worker.commands.close()  # EOF: the worker closes its reader and exits
        try:
            assert proc.wait(30) == 0, "a worker failed (its traceback is in the test's output)"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            for worker in fleet:
                worker.answers.close()


def test_four_torch_workers_serve_a_llama_zero_copy_and_swap_versions(tmp_path: Path) -> None:
    first_model, _ = tiny_llama(0, tmp_path / "v1", torch.bfloat16)
    second_model, second = tiny_llama(1, tmp_path / "v2", torch.bfloat16)
    first_digest, second_digest = reference_digest(first_model), reference_digest(second_model)
    assert first_digest != second_digest
    first = tmp_path / "v1-sharded"  # version 1 as a user has it: a sharded checkpoint directory
    first_model.save_pretrained(first, max_shard_size="100KB")
    assert (first / "model.safetensors.index.json").exists()
    with running_daemon(tmp_path) as daemon:
        assert publish(SLOT, first, socket=daemon.socket) == 1
        with workers(daemon.store, daemon.socket, WORKERS) as fleet:
            built = [worker.answer() for worker in fleet]
            assert built == [{"version": 1, "shared": True, "logits": first_digest}] * WORKERS

            for worker in fleet:
                worker.send("follow 2")
            assert publish(SLOT, second, socket=daemon.socket) == 2
            swapped = [worker.answer() for worker in fleet]
            assert swapped == [{"version": 2, "shared": True, "logits": second_digest}] * WORKERS

            writer, *others = fleet
            writer.send("write")
            wrote = writer.answer()
            assert wrote["torch_delta"] == 1.0  # the write went through, in its own memory
            assert "read-only" in wrote["numpy_error"]  # numpy refused before writing
            assert wrote["shared"] and wrote["logits"] != second_digest
            for worker in others:
                worker.send("logits")
                assert worker.answer() == {"version": 2, "shared": True, "logits": second_digest}
        with PersistentStore(daemon.store, readonly=True) as store:
            unchanged = store.load_context(SLOT, 2, verify=True)  # checksums: files intact
            assert unchanged.equals(second)
