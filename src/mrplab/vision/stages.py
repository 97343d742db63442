"""A vision command as a list of stages, and each stage's recipe (epochs, batch, lr) and step count.

``compare`` with seeds [0, 1] and method mae runs, in this order:

    s0-scratch, s0-mae-pretrain, s0-mae-finetune, s1-scratch, s1-mae-pretrain, s1-mae-finetune
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from torch import nn

from mrplab.errors import MrplabError
from mrplab.vision.config import VisionConfig

COMMANDS: tuple[str, ...] = ("pretrain", "finetune", "scratch", "linprobe", "compare")
Kind = Literal["pretrain", "finetune", "scratch", "linprobe"]


@dataclass(frozen=True)
class Stage:
    kind: Kind
    seed: int
    method: str | None = None  # pretraining method; for finetune/linprobe the one that made the encoder
    init: str | None = None  # finetune/linprobe: encoder checkpoint file, or the key of an earlier stage
    epochs: int | None = None  # one entry of finetune.epochs_menu; None: the recipe's epochs

    @property
    def key(self) -> str:
        menu = f"e{self.epochs}" if self.epochs is not None else None
        return "-".join(p for p in (f"s{self.seed}", self.method, self.kind, menu) if p)


@dataclass(frozen=True)
class Hyper:
    epochs: int
    batch: int
    lr: float
    weight_decay: float
    warmup_epochs: float


def section(kind: Kind) -> str:
    """The config section that holds a stage kind's recipe (SL from scratch uses fine-tuning's)."""
    return {"pretrain": "pretrain", "linprobe": "linprobe"}.get(kind, "finetune")


def hyper(cfg: VisionConfig, stage: Stage) -> Hyper:
    """A stage's recipe; a stage of the epochs menu trains its own number of epochs."""
    kind = stage.kind
    if kind == "pretrain":
        s = cfg.pretrain
        return Hyper(s.epochs, s.batch, s.lr, s.weight_decay, s.warmup_epochs)
    if kind == "linprobe":
        s = cfg.linprobe
        return Hyper(s.epochs, s.batch, s.lr, s.weight_decay, s.warmup_epochs)
    f = cfg.finetune
    epochs = stage.epochs if stage.epochs is not None else cfg.scratch_epochs if kind == "scratch" else f.epochs
    return Hyper(epochs, f.batch, f.lr, f.weight_decay, f.warmup_epochs)


def _encoder_files(init: Path, seed: int) -> list[tuple[str, Path]]:
    """(method, encoder checkpoint) for one seed from --init: a pretrain run folder, one .safetensors file, or a
    timm folder ``local-dir:DIR`` of the configured model, or ``timm:NAME=FILE`` (vision/interop.py)."""
    if str(init).startswith(("local-dir:", "timm:")):
        return [("timm", init)]
    if init.is_file():
        sidecar = init.with_name(init.name.replace(".encoder.safetensors", ".json"))
        method = None
        if sidecar.is_file():
            with contextlib.suppress(ValueError, OSError):
                method = json.loads(sidecar.read_text()).get("method")
        return [(method or "init", init)]
    if not init.is_dir():
        raise MrplabError(f"--init {init} does not exist", "give a pretrain run folder or an .encoder.safetensors file")
    found = sorted((init / "checkpoints").glob(f"s{seed}-*-pretrain.encoder.safetensors"))
    if not found:
        raise MrplabError(
            f"--init {init} holds no pretrained encoder for seed {seed}",
            "run `mrplab vision pretrain` with the same seeds first, or pass an .encoder.safetensors file",
        )
    return [(p.name.split("-")[1], p) for p in found]


def plan(cfg: VisionConfig, command: str, init: Path | None = None) -> list[Stage]:
    """The stages of a command, in the order they run."""
    if command not in COMMANDS:
        raise MrplabError(f"unknown vision command '{command}'", f"use one of {', '.join(COMMANDS)}")
    menu = cfg.finetune.epochs_menu or [None]  # SL from scratch and fine-tuning: one stage per menu entry

    def supervised(kind: Kind, seed: int, method: str | None = None, init: str | None = None) -> list[Stage]:
        return [Stage(kind, seed, method, init, e) for e in menu]

    stages: list[Stage] = []
    for seed in cfg.seeds:
        if command == "pretrain":
            stages += [Stage("pretrain", seed, m) for m in cfg.compare_methods]
        elif command == "scratch":
            stages += supervised("scratch", seed)
        elif command in ("finetune", "linprobe"):
            if init is None:
                raise MrplabError(f"{command} needs a pretrained encoder", "pass --init PRETRAIN_RUN_FOLDER")
            for m, p in _encoder_files(init, seed):
                stages += supervised(command, seed, m, str(p)) if command == "finetune" else [
                    Stage(command, seed, m, str(p))]
        else:  # compare
            stages += supervised("scratch", seed)
            for m in cfg.compare_methods:
                pre = Stage("pretrain", seed, m)
                stages += [pre, *supervised("finetune", seed, m, pre.key)]
    return stages


def stage_steps(cfg: VisionConfig, stage: Stage, n_images: int) -> tuple[int, int, int]:
    """(steps per epoch, total steps, batch) on ``n_images`` training images: the batch is the recipe's,
    at most the images (a small labelled set trains full-batch); an epoch's incomplete last batch is dropped."""
    h = hyper(cfg, stage)
    if n_images < 1:
        raise MrplabError(f"stage {stage.key} has no training images", "check the data and labels sections")
    batch = min(h.batch, n_images)
    return n_images // batch, n_images // batch * h.epochs, batch


def planned_images(cfg: VisionConfig, stages: list[Stage], n_images: Callable[[Stage], int]) -> int:
    """Training images the stages pass, each stage on its own image count ``n_images(stage)``."""
    total = 0
    for s in stages:
        _, steps, batch = stage_steps(cfg, s, n_images(s))
        total += steps * batch
    return total


@dataclass
class StageResult:
    stage: Stage
    steps: int
    wall_s: float
    test: dict[str, float] = field(default_factory=dict)
    module: nn.Module | None = None
    val: dict[str, float] = field(default_factory=dict)  # accuracy on the validation images, if any
    images: int | None = None  # training images of the stage
    batch: int | None = None  # the batch it trained with (the recipe's, at most the images)
    reused: bool = False  # a pretrain stage loaded from the shared cache (config pretrain_cache), not trained

    def record(self) -> dict:
        s = self.stage
        return {"stage": s.key, "kind": s.kind, "seed": s.seed, "method": s.method, "epochs": s.epochs,
                "steps": self.steps,
                "images": self.images, "batch": self.batch, "reused": self.reused, "wall_s": self.wall_s,
                **{f"test_{k}": v for k, v in self.test.items()}, **{f"val_{k}": v for k, v in self.val.items()}}


