"""The ``mrplab`` command: parse, call, print.

    mrplab theory [--config FILE] [--set key=value ...] [--out DIR] [--quiet]

A user mistake (``MrplabError``) prints ``error: <what> (<how to fix>)`` on
stderr and exits 2; usage errors also exit 2.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mrplab import config as config_mod
from mrplab.console import ProgressDisplay, fail, fmt_secs, make_console, sigterm_as_exit
from mrplab.errors import MrplabError


@atexit.register  # registered first, so it runs after every other exit handler
def _skip_the_final_collection() -> None:
    """Leave the objects alive at exit to the OS instead of the interpreter's last garbage collection, which
    walks everything torch and matplotlib created (about 0.4 of the ~0.9 s a finished run took to exit).
    Exit handlers still run, and files are closed as their references drop."""
    gc.freeze()

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="mrplab: why mask-reconstruction pretraining helps, made runnable and measurable.",
)



def _print_version(value: bool) -> None:
    if value:
        import torch

        from mrplab import __version__

        typer.echo(f"mrplab {__version__} (torch {torch.__version__})")
        raise typer.Exit()


def _request_huge_pages() -> None:
    """Before torch is imported: ask torch to back CPU tensors of 2 MiB and more with transparent huge
    pages (its THP_MEM_ALLOC_ENABLE), which a kernel in THP mode "madvise" gives only on request. The
    engine's steps stream tens of MB through every matmul and kernel; fewer TLB misses measured the
    default theory run 0.5 s faster (median of 7 interleaved pairs, ~35 s runs). A value the user set
    is kept; mrplab.runtime.huge_pages says in the run folder what was in effect."""
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print mrplab's and torch's versions and exit"),
) -> None:
    """mrplab: why mask-reconstruction pretraining helps, made runnable and measurable."""
    _request_huge_pages()


# --------------------------------------------------------------------------- progress


class _Progress(ProgressDisplay):
    """Progress of one theory run in steps, over its phases. MRP and its control runs train in lockstep
    (train.pretrain_mrp_variants), so they show as one stage, "mrp + N controls", counted in MRP's steps,
    with MRP's own loss and captured count (a control's records do not stand for the stage). A stage that
    runs past its planned steps (SL with until_fit) moves the run's end by as much, so "overall" stays a
    share of what is known to be left; plain lines then come at least every ``EXTRA_LINE_S`` seconds."""

    EXTRA_LINE_S = 10.0

    def __init__(self, phase_total: dict[str, int], quiet: bool, console: Console):
        super().__init__(console, quiet)
        self.phase_total = phase_total
        self.total = max(sum(phase_total.values()), 1)
        self.units: dict[str, int] = {}  # stage -> phases it trains at once
        for stage in map(self._stage, phase_total):
            self.units[stage] = self.units.get(stage, 0) + 1
        self.phase = "data"
        self.phase_done = 0  # the stage's steps times its phases (what advance counts)
        self.last: dict = {}
        self.last_line = self.t0

    def _stage(self, phase: str) -> str:
        return "mrp" if phase.startswith("mrp_") and "mrp" in self.phase_total else phase

    def __enter__(self) -> "_Progress":
        if not self.quiet and self.tty:
            self.open_bar("[data] sampling", self.total)
        elif not self.quiet:
            self.console.print(f"theory run: {self.total} steps planned", markup=False)
        return self

    def __exit__(self, *exc) -> bool:
        self.close_bar()
        return False

    def _past_plan(self) -> int:
        """How far the stage has run past its planned steps (in advance's units), 0 within its plan."""
        planned = self.phase_total.get(self.phase)
        return 0 if planned is None else max(self.phase_done - planned * self.units.get(self.phase, 1), 0)

    def _status(self) -> str:
        units = self.units.get(self.phase, 1)
        label = self.phase if units == 1 else f"{self.phase} + {units - 1} control{'s' if units > 2 else ''}"
        step, planned = self.phase_done // units, self.phase_total.get(self.phase, "?")
        text = f"[{label}] step {step} (planned {planned}; until fit)" if self._past_plan() else f"[{label}] step {step}/{planned}"
        loss = self.last.get("loss")
        if loss:
            text += f"  loss {sum(loss) / len(loss):.4g}"
        n_cap = self.last.get("n_captured")
        phi = self.last.get("phi")
        if n_cap and phi:
            n_feat = len(phi[0]) * len(phi[0][0])
            text += f"  captured {sum(n_cap) / len(n_cap):.1f}/{n_feat}"
        return text

    def runtime(self, info: dict) -> None:
        """One line: the threads, precision and compilation the run uses, and why."""
        if self.quiet:
            return
        self.console.print(
            f"threads {info['threads']} ({info['threads_reason']}); precision {info['precision']} "
            f"({info['precision_reason']}); compile {'on' if info['compile'] else 'off'} ({info['compile_reason']})",
            markup=False, soft_wrap=True, style="dim",
        )

    def record(self, rec: dict) -> None:
        phase = rec.get("phase", "?")
        if self._stage(phase) != self.phase:
            self.phase, self.phase_done, self.last = self._stage(phase), 0, {}
        if phase == self.phase:
            self.last = rec
        if self._bar is not None:
            self._bar.update(self._task, description=self._status())

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.phase_done += n
        past = self._past_plan()
        self.total += min(n, past)  # the run ends later by the steps past the plan
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(self._task, advance=n, total=self.total, description=self._status())
            return
        now = time.perf_counter()
        if self.line_due() or (past and now - self.last_line >= self.EXTRA_LINE_S):
            self.last_line = now
            elapsed, eta = self.elapsed_eta()
            self.console.print(
                f"{self._status()}  overall {self.done}/{self.total} ({100 * self.done // self.total}%)"
                f"  elapsed {fmt_secs(elapsed)}  eta {fmt_secs(eta)}",
                markup=False, soft_wrap=True,
            )


# --------------------------------------------------------------------------- output


def _num(x) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _verdict_table(verdicts: list[dict]) -> Table:
    table = Table(title="claims", title_justify="left")
    for col in ("id", "statement", "mean ± std", "min", "rule", "verdict"):
        table.add_column(col, overflow="fold")
    for v in verdicts:
        style = {"PASS": "green", "FAIL": "red"}.get(v["verdict"], "yellow")
        label = v["verdict"] + (f" ({v['reason']})" if v.get("reason") and v["verdict"] == "N/A" else "")
        kind = v.get("kind", "claim")
        statement = v["statement"] + ("" if kind == "claim" else
                                      f" [derived from {v['derived_from']}]" if kind == "derived" else f" [{kind} check]")
        table.add_row(Text(v["id"]), Text(statement), Text(f"{_num(v['mean'])} ± {_num(v['std'])}"),
                      Text(_num(v["min"])), Text(v["rule"]), Text(label, style=style))
    return table


# --------------------------------------------------------------------------- commands


@app.command()
def theory(
    config: Optional[Path] = typer.Option(
        None, "--config", metavar="FILE", help="YAML config file or preset name (theory-default); without it the defaults (configs/theory-default.yaml)"
    ),
    set_: list[str] = typer.Option(
        [], "--set", metavar="KEY=VALUE", help="override one key, e.g. --set mrp.mask_ratio=0.6 (repeatable)"
    ),
    out: Path = typer.Option(Path("runs"), "--out", metavar="DIR", help="parent folder of the run folder"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress and no table; print only the run folder"),
) -> None:
    """Train SL from scratch and MRP -> fine-tuning on multi-view data, measure the claims, write a run folder."""
    console = make_console()
    try:
        cfg = config_mod.load(config, set_)
        # imported after the config is valid, so that a config mistake is reported without loading torch
        from mrplab.theory import run_folder
        from mrplab.theory import experiment
        from mrplab.theory.claims import tally_line
        from mrplab.theory.experiment import growth_drive

        with sigterm_as_exit(), _Progress(experiment.planned_phase_steps(cfg), quiet, console) as progress:
            result, path = run_folder.run_theory(cfg, out, on_record=progress.record, advance=progress.advance,
                                                 on_runtime=progress.runtime)
    except MrplabError as err:
        fail(err)
        return
    if quiet:
        typer.echo(str(path))
        return
    console.print(_verdict_table(result.verdicts))
    console.print(tally_line(result.verdicts))
    console.print(growth_drive(result.per_seed), soft_wrap=True, markup=False)
    console.print(f"run folder: {path}", soft_wrap=True, markup=False)


# --------------------------------------------------------------------------- sweeps


@app.command()
def sweep(
    sweep_file: Path = typer.Argument(..., metavar="SWEEP.yaml", help="sweep file (docs/sweeps.md) or the name of a shipped sweep, e.g. mask_ratio"),
    executor: str = typer.Option("local", "--executor", metavar="local|ray", help="where runs execute"),
    address: Optional[str] = typer.Option(
        None, "--address", metavar="ADDR", help="Ray cluster to attach to, e.g. HEAD:6379 (default: start Ray locally)"
    ),
    workers: Optional[int] = typer.Option(
        None, "--workers", metavar="N", help="runs at once (default: min(runs, cores)); threads per run = cores // N"
    ),
    out: Path = typer.Option(Path("sweeps"), "--out", metavar="DIR", help="parent of the sweep folder DIR/<name>"),
    set_: list[str] = typer.Option(
        [], "--set", metavar="KEY=VALUE", help="override a base key for every run, e.g. --set sl.steps=200 (repeatable)"
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress; print only the sweep folder"),
) -> None:
    """Run every config of a sweep file (grid x zip x seeds) into one results store; re-running resumes."""
    console = make_console()
    try:
        from mrplab.sweep import spec

        plan = spec.load_sweep(sweep_file, set_)
        # imported after the sweep file is valid, so that a mistake is reported without loading torch
        from mrplab.sweep import runner
        from mrplab.sweep.progress import SweepProgress

        with sigterm_as_exit(), SweepProgress(console, quiet) as progress:
            outcome = runner.run_sweep(plan, out, executor=executor, address=address, workers=workers,
                                       progress=progress)
    except MrplabError as err:
        fail(err)
        return
    except KeyboardInterrupt:
        typer.echo("interrupted: finished runs are in the store; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    if quiet:
        typer.echo(str(outcome.folder))
    else:
        done = outcome.planned - len(outcome.failed)
        console.print(f"{done}/{outcome.planned} runs done ({outcome.skipped} from earlier, {outcome.executed} run now)"
                      f", {len(outcome.failed)} failed", markup=False, soft_wrap=True)
        console.print(f"sweep folder: {outcome.folder}  (report: mrplab sweep-report {outcome.folder})",
                      markup=False, soft_wrap=True)
    if outcome.failed:
        typer.echo(f"{len(outcome.failed)} runs failed (errors in the store and in sweep-report); "
                   "run the same command again to retry them", err=True)
        raise typer.Exit(1)


@app.command("sweep-report")
def sweep_report(
    sweep_dir: Path = typer.Argument(..., metavar="SWEEP_DIR", help="the folder `mrplab sweep` wrote"),
) -> None:
    """Aggregate a sweep over seeds: report.md with tables and study sentences, line plots and phase diagrams."""
    try:
        from mrplab.sweep import report

        rep = report.write_report(sweep_dir)
    except MrplabError as err:
        fail(err)
        return
    typer.echo(str(rep.report))


# --------------------------------------------------------------------------- vision track and its evidence

from mrplab.vision.commands import app as _vision_app  # noqa: E402
from mrplab.vision.commands import evidence  # noqa: E402

app.add_typer(_vision_app, name="vision")
app.command()(evidence)


# --------------------------------------------------------------------------- entry point


def main() -> None:
    """The ``mrplab`` command (the console script and ``python -m mrplab``): the app, then ``exit_now``."""
    try:
        app(prog_name="mrplab")
    except SystemExit as done:
        exit_now(0 if done.code is None else done.code)
    exit_now(0)


def exit_now(code: int | str) -> None:
    """End the process with ``code`` once the command's work is done: exit handlers run and the standard
    streams are flushed as at a normal exit, then the process ends without the interpreter's teardown of
    every module torch and matplotlib loaded (~0.5 s of a finished theory run's exit, measured against
    0.03 s this way). Every file mrplab writes is closed before this (io.atomic_write_*). A message
    (non-int code) or another non-daemon thread still running takes the usual exit, which prints the
    message or waits for the thread."""
    if not isinstance(code, int) or any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        raise SystemExit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)
