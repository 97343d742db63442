"""Progress of a sweep over runs: a rich bar with ETA on a terminal, plain lines every ~10% otherwise."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console

from mrplab.console import fmt_secs
from mrplab.sweep.spec import PlannedRun


def describe_run(run: PlannedRun) -> str:
    parts = [f"{k}={v}" for k, v in run.axes.items()] + [f"seed={run.seed}"]
    return " ".join(parts)


class SweepProgress:
    """Runner progress callbacks; a context manager that owns the rich bar."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console = console
        self.quiet = quiet
        self.tty = console.is_terminal
        self.total = 0
        self.todo = 0
        self.done = 0
        self.failed = 0
        self.next_line = 1
        self.t0 = time.perf_counter()
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> "SweepProgress":
        return self

    def __exit__(self, *exc: Any) -> bool:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None
        return False

    def start(self, total: int, done_before: int, todo: int, executor: str) -> None:
        self.total, self.todo, self.t0 = total, todo, time.perf_counter()
        if self.quiet:
            return
        self.console.print(f"sweep: {total} runs, {done_before} already done, {todo} to run; {executor}",
                           markup=False, soft_wrap=True)
        if self.tty:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console)
            self._bar.__enter__()
            self._task = self._bar.add_task("runs", total=todo)

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        eta = elapsed * (self.todo - self.done) / max(self.done, 1)
        return (f"{self.done}/{self.todo} runs ({100 * self.done // max(self.todo, 1)}%), {self.failed} failed"
                f"  elapsed {fmt_secs(elapsed)}  eta {fmt_secs(eta)}")

    def run_finished(self, run: PlannedRun, out: dict[str, Any]) -> None:
        self.done += 1
        ok = bool(out.get("ok"))
        self.failed += not ok
        if self.quiet:
            return
        if not ok:
            msg = f"run failed ({describe_run(run)}, key {run.key}): {' '.join(str(out.get('error')).split())[:300]}"
            self.console.print(msg, markup=False, soft_wrap=True, style="red" if self.tty else None)
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=f"runs ({self.failed} failed)" if self.failed else "runs")
            return
        if self.done * 10 >= self.next_line * self.todo or self.done == self.todo:
            self.next_line = self.done * 10 // max(self.todo, 1) + 1
            self.console.print(f"{self._line()}  last: {describe_run(run)}", markup=False, soft_wrap=True)

    def tick(self) -> None:
        pass
