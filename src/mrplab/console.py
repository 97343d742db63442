"""What every command shares at the terminal: the one-line ``error:`` exit, SIGTERM as a clean exit,
and the stdout console. Imports nothing of mrplab but ``errors``."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Any, Iterator, NoReturn

import typer
from rich.console import Console

from mrplab.errors import MrplabError

EXIT_USER_ERROR = 2  # a bad config, data, checkpoint or command line
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM (128 + SIGINT)


def fmt_secs(s: float) -> str:
    """Seconds as h:mm:ss (negative values as 0)."""
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def fail(err: MrplabError) -> NoReturn:
    """Print ``error: <what> (<how to fix>)`` on one line of stderr and exit 2."""
    typer.echo(f"error: {' '.join(str(err).split())}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


def make_console() -> Console:
    """Stdout console; wider than rich's 80-column default when output goes to a file or pipe."""
    probe = Console()
    if probe.is_terminal or "COLUMNS" in os.environ:
        return Console(highlight=False)
    return Console(highlight=False, width=120)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while a run is in progress, so its partial folder is cleaned up."""
    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class ProgressDisplay:
    """What every progress display shares: a rich bar on a terminal, a plain line about every 10% of
    ``total`` otherwise, nothing when quiet. Subclasses count in their own unit (steps, runs, images)
    and say what a bar description and a plain line hold."""

    def __init__(self, console: Console, quiet: bool):
        self.console, self.quiet = console, quiet
        self.tty = console.is_terminal
        self.total, self.done, self.next_line = 1, 0, 1
        self.t0 = time.perf_counter()
        self._bar: Any = None
        self._task: Any = None

    def open_bar(self, description: str, total: int, *extra_columns: Any, **fields: Any) -> None:
        """Start the rich bar (call only on a terminal): description, bar, n/total, [extra], elapsed, eta."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                             *extra_columns, TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                             console=self.console)
        self._bar.start()
        self._task = self._bar.add_task(description, total=total, **fields)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def line_due(self) -> bool:
        """True when the count has passed the next tenth of the total (or reached it): time for a plain line."""
        if self.done * 10 >= self.next_line * self.total or self.done == self.total:
            self.next_line = self.done * 10 // max(self.total, 1) + 1
            return True
        return False

    def elapsed_eta(self, remaining: float | None = None) -> tuple[float, float]:
        """Seconds since the start and the estimated seconds left at the rate so far."""
        elapsed = time.perf_counter() - self.t0
        left = max(self.total - self.done if remaining is None else remaining, 0)
        return elapsed, elapsed * left / max(self.done, 1)
