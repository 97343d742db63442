"""``mrplab vision ...``: parse, call the engine, print.

    mrplab vision compare   [--config FILE] [--set key=value ...] [--out DIR] [--resume RUN_DIR] [--quiet]
    mrplab vision pretrain  (same options)
    mrplab vision scratch   (same options)
    mrplab vision finetune  --init PRETRAIN_RUN_DIR|ENCODER.safetensors|local-dir:DIR|timm:NAME=FILE (and the same options)
    mrplab vision linprobe  --init (as finetune) (and the same options)

    mrplab evidence MODEL ... [--data ROOT] [--images N] [--cam eigencam|gradcam|both] [--out DIR]
                            (mounted on the top-level app by cli.py)

Without --config every command uses the defaults of ``VisionConfig`` (the embedded comparison,
configs/vision/embedded-compare.yaml). A user mistake prints one ``error: ...`` line and exits 2.
Under torchrun (WORLD_SIZE > 1) only rank 0 prints and writes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mrplab.console import EXIT_INTERRUPTED, ProgressDisplay, fail, fmt_secs, make_console, sigterm_as_exit
from mrplab.errors import MrplabError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="The vision track: MAE / data2vec pretraining -> fine-tuning versus SL from scratch on images.",
)



class _Progress(ProgressDisplay):
    """Images trained over all stages, with images/s."""

    def __init__(self, console: Console, quiet: bool):
        super().__init__(console, quiet)
        self.stage, self.loss = "data", None

    def plan(self, total_images: int) -> None:
        self.total, self.t0 = max(total_images, 1), time.perf_counter()
        if self.quiet:
            return
        if self.tty:
            from rich.progress import TaskProgressColumn, TextColumn

            self.open_bar(self._status(), self.total, TaskProgressColumn(), TextColumn("{task.fields[speed]} img/s"),
                          speed="-")
        else:
            self.console.print(f"vision run: {self.total} training images planned", markup=False)

    def close(self) -> None:
        self.close_bar()

    def folder(self, path: Path) -> None:
        if not self.quiet:
            self.console.print(f"run folder (partial until the run completes): {path}", markup=False, soft_wrap=True)

    def _status(self) -> str:
        return f"[{self.stage}]" + (f" loss {self.loss:.4g}" if self.loss is not None else "")

    def record(self, rec: dict) -> None:
        if rec.get("stage", self.stage) != self.stage:
            self.stage, self.loss = rec["stage"], None
        self.loss = rec.get("loss", self.loss)

    def advance(self, n: int) -> None:
        self.done += n
        if self.quiet:
            return
        elapsed, eta = self.elapsed_eta()
        speed = self.done / max(elapsed, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, advance=n, description=self._status(), speed=f"{speed:.0f}")
            return
        if self.line_due():
            self.console.print(
                f"{self._status()}  {self.done}/{self.total} images ({100 * self.done // self.total}%)  "
                f"{speed:.0f} img/s  elapsed {fmt_secs(elapsed)}  eta {fmt_secs(eta)}", markup=False, soft_wrap=True)


def _table(rows: list[dict]) -> Table:
    from mrplab.vision.report import mean_rows, table_columns

    cols = table_columns(rows)
    table = Table(title="test accuracy (%)", title_justify="left")
    for c in ("approach", "seed", *(label for _, label in cols)):
        table.add_column(c)
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}"  # noqa: E731
    for r in rows:
        table.add_row(r["approach"], str(r["seed"]), *(pct(r[k]) for k, _ in cols))
    for m in mean_rows(rows):
        table.add_row(m["approach"], f"mean of {m['seeds']}",
                      *(f"{pct(m[k])} ± {pct(m[k + '_std'])}" for k, _ in cols), style="bold")
    return table


def _load(command: str, config: Optional[Path], set_: list[str], resume: Optional[Path],
          init: Optional[Path]):
    """(config, init) of a new run, or of the stopped run that --resume continues."""
    from mrplab import config as config_mod
    from mrplab.vision import config as vconfig
    from mrplab.vision.run_folder import check_resume_overrides, open_resume

    if resume is None:
        return vconfig.load(config, set_), init
    if config is not None or init is not None:
        raise MrplabError("--resume continues a run with its own config", "drop --config and --init")
    check_resume_overrides(set_)
    cfg, run_command, init = open_resume(resume)
    if run_command != command:
        raise MrplabError(f"{resume} is a '{run_command}' run", f"use mrplab vision {run_command} --resume")
    if set_:
        cfg = vconfig.validate(config_mod.apply_overrides(cfg.model_dump(mode="json"), set_))
    return cfg, init


def _execute(command: str, config: Optional[Path], set_: list[str], out: Path, resume: Optional[Path],
             init: Optional[Path], quiet: bool) -> None:
    from mrplab.io import command_line
    from mrplab.vision import train

    console = make_console()
    progress = _Progress(console, quiet or int(os.environ.get("RANK", "0")) != 0)
    try:
        cfg, init = _load(command, config, set_, resume, init)
        with sigterm_as_exit():
            try:
                result = train.run(cfg, command, out, init=init, resume=resume, on_record=progress.record,
                                   advance=progress.advance, on_plan=progress.plan, argv=command_line(),
                                   on_folder=progress.folder)
            finally:
                progress.close()
    except MrplabError as err:
        fail(err)
        return
    except train.RunInterrupted as stop:
        if stop.path is None:
            typer.echo(f"interrupted before the first checkpoint: nothing was kept (a run can be resumed once it has "
                       f"written one, every checkpoint_every = {cfg.checkpoint_every} steps, or finished a stage)",
                       err=True)
        else:
            typer.echo(f"interrupted; continue with: mrplab vision {command} --resume {stop.path}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if result.path is None:  # not rank 0
        return
    if quiet:
        typer.echo(str(result.path))
        return
    if result.table:
        console.print(_table(result.table))
    console.print(f"run folder: {result.path}", soft_wrap=True, markup=False)


_CONFIG = typer.Option(None, "--config", metavar="FILE",
                       help="YAML config file or preset name (cifar10, embedded-compare); without it the defaults "
                            "(configs/vision/embedded-compare.yaml)")
_SET = typer.Option([], "--set", metavar="KEY=VALUE",
                    help="override one key, e.g. --set pretrain.epochs=10 (repeatable)")
_OUT = typer.Option(Path("runs"), "--out", metavar="DIR", help="parent folder of the run folder")
_RESUME = typer.Option(None, "--resume", metavar="RUN_DIR",
                       help="continue a stopped run from its last checkpoint; --set may change only learning rates, "
                            "epochs, log_every, checkpoint_every and threads")
_QUIET = typer.Option(False, "--quiet", "-q", help="no progress and no table; print only the run folder")
_INIT = typer.Option(None, "--init", metavar="PATH",
                     help="pretrained encoder: a `vision pretrain` run folder, an .encoder.safetensors file, a timm "
                     "folder local-dir:DIR (`vision export`), or timm:NAME=FILE (a timm ViT / ResNet architecture and "
                     "a local weights file, e.g. a published MAE checkpoint; sets model.timm)")


_DOCS = {
    "compare": "Per seed: SL from scratch, and MRP pretraining -> fine-tuning with the same total epochs and "
               "augmentation; prints test accuracy on multi-view and single-view images.",
    "pretrain": "Mask-reconstruction pretraining (pretrain.method, or every entry of methods) on the training images.",
    "finetune": "Fine-tune a pretrained encoder with a new head (layer-wise lr decay), then test it.",
    "scratch": "Supervised learning from scratch for pretrain.epochs + finetune.epochs, then test.",
    "linprobe": "Train a linear head on a frozen pretrained encoder, then test it.",
}


def _register(command: str) -> None:
    """One ``mrplab vision`` subcommand; finetune and linprobe also take --init."""
    if command in ("finetune", "linprobe"):
        def run(init: Optional[Path] = _INIT, config: Optional[Path] = _CONFIG, set_: list[str] = _SET,
                out: Path = _OUT, resume: Optional[Path] = _RESUME, quiet: bool = _QUIET) -> None:
            _execute(command, config, set_, out, resume, init, quiet)
    else:
        def run(config: Optional[Path] = _CONFIG, set_: list[str] = _SET, out: Path = _OUT,
                resume: Optional[Path] = _RESUME, quiet: bool = _QUIET) -> None:
            _execute(command, config, set_, out, resume, None, quiet)
    run.__doc__ = _DOCS[command]
    app.command(command)(run)


for _command in _DOCS:
    _register(_command)


# --------------------------------------------------------------------------- mrplab vision export


@app.command("export")
def export(
    source: Path = typer.Argument(..., metavar="RUN_OR_CHECKPOINT",
                                  help="a `mrplab vision` run folder or one .safetensors checkpoint of it"),
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="the timm folder (a run folder: one per checkpoint)"),
) -> None:
    """Export ViT and timm-stem ResNet checkpoints as timm-native folders: timm.create_model("local-dir:OUT_DIR") loads them strictly."""
    console = make_console()
    try:
        from mrplab.vision.interop import export as export_run

        written = export_run(source, out_dir)
    except MrplabError as err:
        fail(err)
        return
    for path in written:
        console.print(f"timm folder: {path}  (timm.create_model(\"local-dir:{path}\"))", soft_wrap=True, markup=False)


# --------------------------------------------------------------------------- mrplab evidence


def evidence(
    models: list[str] = typer.Argument(
        ..., metavar="MODEL...",
        help="classifier checkpoints (.safetensors with their .json sidecar), `mrplab vision` run folders, or timm "
             "models: local-dir:DIR (a timm hub folder) or timm:NAME=FILE (a timm model name and a local weights file)",
    ),
    data_root: Optional[Path] = typer.Option(
        None, "--data", metavar="ROOT", help="ImageFolder root to explain on (default: the models' own data)"
    ),
    n_images: int = typer.Option(500, "--images", min=1, help="test images for the maps and the occlusion test"),
    cam: str = typer.Option("both", "--cam", help="eigencam, gradcam or both"),
    out: Path = typer.Option(Path("runs"), "--out", metavar="DIR", help="parent folder of the evidence folder"),
) -> None:
    """Class-activation maps (Eigen-CAM, Grad-CAM) and multi-view measures for SL vs MRP models, side by side."""
    console = make_console()
    try:
        if cam not in ("eigencam", "gradcam", "both"):
            raise MrplabError(f"--cam {cam} is not a CAM method", "use eigencam, gradcam or both")
        from mrplab.vision import evidence as ev_mod
        from mrplab.vision.checkpoints import classifier_files, load_classifier

        from mrplab.vision.config import VisionDataConfig
        from mrplab.vision.interop import is_timm_spec

        data = None
        if data_root is not None:
            own = [m for m in models if not is_timm_spec(m)]
            base = load_classifier(classifier_files(own)[0]).cfg.data if own else VisionDataConfig()
            data = base.model_copy(update={"source": "folder", "root": str(data_root)})
        methods = ev_mod.CAM_METHODS if cam == "both" else (cam,)
        path = ev_mod.run_evidence(models, data, out, n_images, methods,
                                   progress=lambda s: console.print(f"[dim]{s}[/dim]"))
    except MrplabError as err:
        fail(err)
        return
    console.print(f"evidence folder: {path}", soft_wrap=True, markup=False)
