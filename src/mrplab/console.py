"""What every command shares at the terminal: the one-line ``error:`` exit, SIGTERM as a clean exit,
and the stdout console. Imports nothing of mrplab but ``errors``."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Iterator, NoReturn

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
