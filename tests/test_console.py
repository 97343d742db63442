"""What every command shares at the terminal: the error line, the time format, the progress cadence."""

from __future__ import annotations

import io as _stdio

import pytest
import typer
from rich.console import Console

from mrplab.console import ProgressDisplay, fail, fmt_secs
from mrplab.errors import MrplabError


def test_fmt_secs():
    assert fmt_secs(0) == "0:00:00" and fmt_secs(-5) == "0:00:00"
    assert fmt_secs(3725.9) == "1:02:05"


def test_fail_prints_one_line_and_exits_2(capsys):
    with pytest.raises(typer.Exit) as exc:
        fail(MrplabError("bad   value\\nhere", "fix it"))
    assert exc.value.exit_code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\\n") == 1


def test_plain_lines_about_every_tenth_and_once_at_the_end():
    p = ProgressDisplay(Console(file=_stdio.StringIO(), force_terminal=False), quiet=False)
    p.total = 100
    due = []
    for _ in range(130):  # past the planned total, as SL until_fit can go
        p.done += 1
        due.append(p.line_due())
    steps = [i + 1 for i, d in enumerate(due) if d]
    assert steps == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130]
    elapsed, eta = p.elapsed_eta()
    assert elapsed >= 0 and eta == 0.0  # done past the total: nothing left
