"""The vision run folder: built under a hidden ``.partial`` name and renamed when complete (rank 0 only).

    runs/<name>-<command>-<YYYYmmdd-HHMMSS>/
      config.yaml, run.json         the resolved config; the subcommand, its --init and provenance
      metrics.jsonl                 one JSON record per logged step and per evaluation
      stages.json                   results of the finished stages (what --resume skips)
      checkpoints/                  see vision/checkpoints.py
      figures/*.png, report.md, summary.json

A run stopped by Ctrl-C, SIGTERM or SIGKILL keeps its partial folder when it holds a resumable
checkpoint or a finished stage; ``--resume`` that folder continues bit for bit. A run that fails with
an error leaves nothing behind, unless other stages had finished (they are kept, and the error says where).
"""

from __future__ import annotations

import json
from pathlib import Path

from mrplab import config as config_mod
from mrplab.errors import MrplabError
from mrplab.io import RunFolder, atomic_write_text, dumps, read_json, write_failure
from mrplab.vision.config import VisionConfig

class VisionRunFolder(RunFolder):
    """RunFolder named ``<name>-<command>-<ts>`` that keeps its partial folder when the run is interrupted
    (Ctrl-C, SIGTERM) after a resumable checkpoint or a finished stage, and reopens such a folder for
    ``--resume``."""

    def __init__(self, out_dir: str | Path, cfg: VisionConfig, command_name: str, init: Path | None = None,
                 resume_dir: Path | None = None, command: str | None = None, changes: dict | None = None):
        super().__init__(out_dir, cfg, command=command, label=command_name)
        self.command_name, self.init, self.resume_dir = command_name, init, resume_dir
        self.changes = changes  # resume only: {"keys": {key: [old, new]}, "stage": ..., "step": ...}
        self.records: list[dict] = []
        self.interrupted = False
        self.tb = None

    @property
    def ckpt(self) -> Path:
        return self.partial / "checkpoints"

    def __enter__(self) -> "VisionRunFolder":
        if self.resume_dir is None:
            super().__enter__()
            run = {**self.provenance, "name": self.name, "subcommand": self.command_name, "init": self.init}
            atomic_write_text(self.partial / "run.json", dumps(run, indent=2) + "\n")
        else:
            self.partial, self.parent = self.resume_dir, self.resume_dir.parent
            run = json.loads((self.partial / "run.json").read_text())
            self.name = run["name"]
            if self.changes:  # the config the run goes on with, and where each change took effect
                run["changes"] = [*run.get("changes", []), {**self.changes, "command": self.command}]
                run["config_hash"] = self.cfg.hash()
                atomic_write_text(self.partial / "config.yaml", config_mod.dump_yaml(self.cfg))
                atomic_write_text(self.partial / "run.json", dumps(run, indent=2) + "\n")
            keep = resume_metrics_lines(self.partial)
            path = self.partial / "metrics.jsonl.tmp"
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)[:keep] if path.exists() else []
            atomic_write_text(path, "".join(lines))
            self.records = [json.loads(line) for line in lines]
            self._metrics = open(path, "a", encoding="utf-8")
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.partial / "tensorboard"))
        return self

    def emit(self, record: dict) -> None:
        super().emit(record)
        self.records.append(json.loads(dumps(record)))
        if self.tb is not None and record.get("event") in (None, "test"):
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch", "seed"):
                    self.tb.add_scalar(f"{record.get('stage', 'run')}/{k}", v, record["step"])

    def _close_metrics(self) -> None:
        super()._close_metrics()
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        stopped = exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, SystemExit))
        resumable = (self.ckpt / "resume.json").exists() or (self.partial / "stages.json").exists()
        if exc_type is not None and issubclass(exc_type, OSError) and (resumable or self.resume_dir is not None):
            self._close_metrics()  # a write failed (disk full): keep what can be resumed once there is space
            raise write_failure(exc, self.parent, self.partial, f"mrplab vision {self.command_name} --resume") from None
        if (exc_type is not None and issubclass(exc_type, MrplabError) and self.resume_dir is None
                and (self.partial / "stages.json").exists()):
            # a stage failed (diverged, collapsed) after others finished: keep them, say where
            self._close_metrics()
            exc.fix = f"{exc.fix}; the finished stages are kept in {self.partial}" if exc.fix else (
                f"the finished stages are kept in {self.partial}")
            exc.args = (exc.line(),)
            return False
        if exc_type is not None and (self.resume_dir is not None or (stopped and resumable)):
            # keep what a stopped run made (and never delete a folder this process did not create)
            self._close_metrics()
            self.interrupted = stopped
            return False
        return super().__exit__(exc_type, exc, tb)

    def complete(self, summary: dict, report_md: str) -> Path:
        """Write summary.json and report.md, move the folder into place."""
        self.close_metrics()
        atomic_write_text(self.partial / "report.md", report_md)
        atomic_write_text(self.partial / "summary.json", dumps(summary, indent=2) + "\n")
        self.final = self.rename_into_place()
        return self.final


def read_stages(run_dir: Path) -> dict:
    path = run_dir / "stages.json"
    return json.loads(path.read_text()) if path.exists() else {"done": {}, "metrics_lines": 0}


def resume_metrics_lines(run_dir: Path) -> int:
    """Metric lines that belong to the state a resume starts from."""
    stages = read_stages(run_dir)
    path = run_dir / "checkpoints" / "resume.json"
    if path.exists():
        r = json.loads(path.read_text())
        if r["stage"] not in stages["done"]:
            return int(r["metrics_lines"])
    return int(stages["metrics_lines"])


RESUMABLE_KEYS = ("pretrain.lr", "finetune.lr", "linprobe.lr", "pretrain.epochs", "finetune.epochs",
                  "linprobe.epochs", "log_every", "checkpoint_every", "threads")
"""The keys ``--resume`` may change with ``--set`` (a diverged stage resumed at a lower lr, a longer schedule,
another cadence): everything else would make the finished stages and the rest disagree on what was run. A
change takes effect at the resume point (the stage and step the run records in run.json ``changes``)."""


def open_resume(run_dir: Path) -> tuple[VisionConfig, str, Path | None]:
    """(config, command, init) of a stopped run folder for ``--resume``; refuses a config.yaml edited by hand."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MrplabError(f"run folder {run_dir} does not exist", "pass the .partial folder the run printed")
    if (run_dir / "summary.json").exists() or (run_dir / "metrics.jsonl").exists():
        raise MrplabError(f"run folder {run_dir} is complete", "start a new run instead of --resume")
    if not (run_dir / "run.json").is_file() or not (run_dir / "config.yaml").is_file():
        raise MrplabError(f"{run_dir} is not a stopped vision run folder", "pass the .partial folder the run printed")
    from mrplab.vision import config as vconfig

    cfg = vconfig.validate(config_mod.read_yaml(run_dir / "config.yaml"))
    run = read_json(run_dir / "run.json", "run record", "pass the .partial folder the run printed")
    if cfg.hash() != run.get("config_hash"):
        raise MrplabError(
            f"{run_dir / 'config.yaml'} was changed after the run started (config hash {cfg.hash()}, the run's "
            f"{run.get('config_hash')})",
            f"restore it; only {', '.join(RESUMABLE_KEYS)} may change on resume, given with --set")
    return cfg, run["subcommand"], Path(run["init"]) if run.get("init") else None


def check_resume_overrides(overrides: list[str]) -> None:
    """``--set`` at ``--resume``: only RESUMABLE_KEYS."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in RESUMABLE_KEYS:
            raise MrplabError(f"--set {key} cannot change on --resume",
                              f"only {', '.join(RESUMABLE_KEYS)} may; start a new run to change {key}")


def resume_changes(run_dir: Path, cfg: VisionConfig) -> dict[str, list]:
    """{key: [old, new]} between the stopped run's config and ``cfg``; a key outside RESUMABLE_KEYS is an error."""
    from mrplab.vision import config as vconfig

    old = config_mod.flatten(vconfig.validate(config_mod.read_yaml(run_dir / "config.yaml")).model_dump(mode="json"))
    new = config_mod.flatten(cfg.model_dump(mode="json"))
    changed = {k: [old.get(k), new.get(k)] for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
    check_resume_overrides(list(changed))
    return changed



def resume_pointer(resume: Path | None, done: dict) -> dict | None:
    """resume.json of a stopped run (plus its ``dir``) when it points into an unfinished stage, else None."""
    if resume is None:
        return None
    path = resume / "checkpoints" / "resume.json"
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    if r["stage"] in done:
        return None
    return {**r, "dir": str(resume)}
