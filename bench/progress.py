"""Progress bars on stderr while the benchmark runs (rich), or nothing at all.

A run has one overall bar (scenarios done) and one bar for the scenario in
progress, whose total the scenario announces with :meth:`Progress.expect` and
advances with :meth:`Progress.step`.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichProgress


class Progress:
    """Overall and per-scenario bars; ``enabled=False`` makes every call a no-op."""

    def __init__(self, total_scenarios: int, *, enabled: bool = True) -> None:
        self._bars: RichProgress | None = None
        self._overall: TaskID | None = None
        self._current: TaskID | None = None
        if enabled:
            self._bars = RichProgress(
                TextColumn("{task.description:<44}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._overall = self._bars.add_task("all scenarios", total=total_scenarios)

    def __enter__(self) -> Self:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bars is not None:
            self._bars.stop()

    def begin(self, scenario: str) -> None:
        """A scenario starts; its bar is indeterminate until it calls :meth:`expect`."""
        if self._bars is not None:
            self._current = self._bars.add_task(scenario, total=None)

    def expect(self, steps: int) -> None:
        if self._bars is not None and self._current is not None:
            self._bars.update(self._current, total=steps)

    def step(self, what: str = "") -> None:
        """One step of the current scenario done; ``what`` says what comes next."""
        if self._bars is not None and self._current is not None:
            self._bars.advance(self._current)
            if what:
                self._bars.update(self._current, description=what[:44])

    def end(self, scenario: str) -> None:
        if self._bars is not None and self._current is not None:
            task = self._bars.tasks[self._current]
            self._bars.update(
                self._current,
                description=scenario,
                total=task.completed or 1,
                completed=task.completed or 1,
            )
            if self._overall is not None:
                self._bars.advance(self._overall)
        self._current = None
