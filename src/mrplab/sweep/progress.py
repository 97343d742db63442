"""Progress of a sweep over runs: a rich bar with ETA on a terminal, plain lines every ~10% otherwise."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console

from mrplab.console import ProgressDisplay, fmt_secs
from mrplab.sweep.spec import PlannedRun


def describe_run(run: PlannedRun) -> str:
    parts = [f"{k}={v}" for k, v in run.axes.items()] + [f"seed={run.seed}"]
    return " ".join(parts)


class SweepProgress(ProgressDisplay):
    """Runner progress callbacks, counted in runs; a context manager that owns the rich bar."""

    def __init__(self, console: Console, quiet: bool = False):
        super().__init__(console, quiet)
        self.todo = 0
        self.failed = 0

    def __enter__(self) -> "SweepProgress":
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.close_bar()
        return False

    def start(self, total: int, done_before: int, todo: int, executor: str) -> None:
        self.todo, self.t0 = todo, time.perf_counter()
        self.total = max(todo, 1)
        if self.quiet:
            return
        self.console.print(f"sweep: {total} runs, {done_before} already done, {todo} to run; {executor}",
                           markup=False, soft_wrap=True)
        if self.tty:
            self.open_bar("runs", todo)

    def _line(self) -> str:
        elapsed, eta = self.elapsed_eta(self.todo - self.done)
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
        if self.line_due():
            self.console.print(f"{self._line()}  last: {describe_run(run)}", markup=False, soft_wrap=True)

    def tick(self) -> None:
        pass
