"""The vision engine: one training loop for pretraining, fine-tuning, SL from scratch and linear probing.

A command is a list of *stages* run in order, e.g. ``compare`` with seeds [0, 1] and method mae:

    s0-scratch, s0-mae-pretrain, s0-mae-finetune, s1-scratch, s1-mae-pretrain, s1-mae-finetune

Every stage is the same loop (``fit``): a fresh permutation of the training images per epoch from the
stage's ``order`` generator, random crop + flip from its ``augment`` generator, masks from its ``mask``
generator, AdamW with linear warmup and cosine decay, gradient clipping, optional bf16 autocast.
Supervised stages end with the test accuracy on multi-view and single-view images.

Run folder (written by rank 0 only; built under a hidden ``.partial`` name and renamed when complete):

    runs/<name>-<command>-<YYYYmmdd-HHMMSS>/
      config.yaml, run.json         the resolved config; the subcommand, its --init and provenance
      metrics.jsonl                 one JSON record per logged step and per evaluation
      stages.json                   results of the finished stages (what --resume skips)
      checkpoints/<stage>.safetensors + <stage>.json     each finished stage's weights (+ sidecar)
      checkpoints/<stage>.encoder.safetensors            pretrain stages: the encoder alone
      figures/*.png, report.md, summary.json

Resuming: every ``checkpoint_every`` steps the running stage writes weights (safetensors), the optimizer,
scheduler, generator states and the epoch's data order (torch.save) and then ``resume.json``, the commit
point. A run stopped by Ctrl-C, SIGTERM or SIGKILL keeps its partial folder when it holds such a checkpoint;
``--resume`` that folder continues bit for bit. A run that fails with an error leaves nothing behind.

Data parallel: under torchrun (WORLD_SIZE > 1) every process draws the same global batch and masks and
takes its slice by rank; DistributedDataParallel averages the gradients, so the replicas stay identical.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mrplab import config as config_mod
from mrplab import runtime
from mrplab.errors import MrplabError
from mrplab.io import RunFolder, atomic_write_text, atomic_write_with, dumps, git_commit
from mrplab.rng import generator, stream_seed
from mrplab.runtime import resolve_device
from mrplab.vision import report
from mrplab.vision.config import VisionConfig
from mrplab.vision.data import ImageSet, augment, channel_stats, load_split, normalize
from mrplab.vision.models import Encoder, Group, build_encoder, choose_attention, matmul_shapes, num_patches
from mrplab.vision.objectives import MAE, CollapseCheck, Data2Vec, Pretrainer, check_mask_ratio, momentum_at, patch_mask

Command = Literal["pretrain", "finetune", "scratch", "linprobe", "compare"]
COMMANDS: tuple[str, ...] = ("pretrain", "finetune", "scratch", "linprobe", "compare")
Kind = Literal["pretrain", "finetune", "scratch", "linprobe"]


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    kind: Kind
    seed: int
    method: str | None = None  # pretraining method; for finetune/linprobe the one that made the encoder
    init: str | None = None  # finetune/linprobe: encoder checkpoint file, or the key of an earlier stage

    @property
    def key(self) -> str:
        return "-".join(p for p in (f"s{self.seed}", self.method, self.kind) if p)


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


def hyper(cfg: VisionConfig, kind: Kind) -> Hyper:
    if kind == "pretrain":
        s = cfg.pretrain
        return Hyper(s.epochs, s.batch, s.lr, s.weight_decay, s.warmup_epochs)
    if kind == "linprobe":
        s = cfg.linprobe
        return Hyper(s.epochs, s.batch, s.lr, s.weight_decay, s.warmup_epochs)
    f = cfg.finetune
    epochs = cfg.scratch_epochs if kind == "scratch" else f.epochs
    return Hyper(epochs, f.batch, f.lr, f.weight_decay, f.warmup_epochs)


def _encoder_files(init: Path, seed: int) -> list[tuple[str, Path]]:
    """(method, encoder checkpoint) for one seed from --init: a pretrain run folder or one .safetensors file."""
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
    stages: list[Stage] = []
    for seed in cfg.seeds:
        if command == "pretrain":
            stages += [Stage("pretrain", seed, m) for m in cfg.compare_methods]
        elif command == "scratch":
            stages.append(Stage("scratch", seed))
        elif command in ("finetune", "linprobe"):
            if init is None:
                raise MrplabError(f"{command} needs a pretrained encoder", "pass --init PRETRAIN_RUN_FOLDER")
            stages += [Stage(command, seed, m, str(p)) for m, p in _encoder_files(init, seed)]
        else:  # compare
            stages.append(Stage("scratch", seed))
            for m in cfg.compare_methods:
                pre = Stage("pretrain", seed, m)
                stages += [pre, Stage("finetune", seed, m, pre.key)]
    return stages


def stage_steps(cfg: VisionConfig, stage: Stage, n_train: int) -> tuple[int, int]:
    """(steps per epoch, total steps); the last incomplete batch of an epoch is dropped."""
    h = hyper(cfg, stage.kind)
    per_epoch = n_train // h.batch
    if per_epoch < 1:
        raise MrplabError(
            f"batch {h.batch} is larger than the {n_train} training images",
            f"lower {section(stage.kind)}.batch",
        )
    return per_epoch, per_epoch * h.epochs


# --------------------------------------------------------------------------- optimisation pieces


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """lr multiplier: linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


_NO_DECAY = ("pos_embed", "mask_token")


def param_groups(groups: list[Group], lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: group i of n gets lr * layer_decay^(n-1-i); biases, norms and embeddings get no decay."""
    out = []
    n = len(groups)
    for i, group in enumerate(groups):
        scale = layer_decay ** (n - 1 - i)
        trainable = [(name, p) for name, p in group if p.requires_grad]
        decay = [p for name, p in trainable if p.ndim > 1 and not name.endswith(_NO_DECAY)]
        no_decay = [p for name, p in trainable if p.ndim <= 1 or name.endswith(_NO_DECAY)]
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                out.append({"params": params, "lr": lr * scale, "weight_decay": wd})
    return out


@dataclass
class Gens:
    """The stochastic parts of one stage, each its own stream: data order, augmentation, masks."""

    order: torch.Generator
    augment: torch.Generator
    mask: torch.Generator

    @classmethod
    def for_stage(cls, stage: Stage) -> "Gens":
        return cls(*(generator(stage.seed, f"vision/{stage.key}/{s}") for s in ("order", "augment", "mask")))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).get_state() for k in ("order", "augment", "mask")}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            getattr(self, k).set_state(v)


@contextlib.contextmanager
def seeded_init(seed: int, stream: str):
    """Module initialisation (timm draws from torch's global RNG) that depends only on seed and stream;
    the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, stream))
        yield


class LinearProbe(nn.Module):
    """A linear head on the frozen encoder's pooled features."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        encoder.head.requires_grad_(True)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()  # frozen BatchNorm statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.encoder.pool(self.encoder.features(x))  # [B, D]
        return self.encoder.head(z.float())  # [B, C]


# --------------------------------------------------------------------------- checkpoints


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def save_weights(path: Path, module: nn.Module, meta: dict[str, str] | None = None) -> None:
    state = _cpu_state(module)
    atomic_write_with(path, lambda p: save_file(state, str(p), metadata=meta or {}))


def _read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # unreadable, truncated or not safetensors
        raise MrplabError(f"cannot read {what} {path}: {' '.join(str(err).split())}", "check the path") from None


def load_weights(path: Path, module: nn.Module, what: str) -> None:
    state = _read_safetensors(path, what)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError:
        raise MrplabError(
            f"{what} {path} does not fit the configured model", "use the model section the checkpoint was made with"
        ) from None


def load_encoder(source: Path | dict[str, torch.Tensor], encoder: Encoder) -> None:
    """Pretrained encoder weights into ``encoder``, all but the classification head (which fine-tuning resets)."""
    state = source if isinstance(source, dict) else _read_safetensors(source, "encoder checkpoint")
    head = {f"{encoder.head_prefix}{n}" for n, _ in encoder.head.named_parameters()}
    try:
        missing, unexpected = encoder.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
    except RuntimeError:  # a tensor of another shape
        missing, unexpected = [], ["(shape)"]
    if unexpected or set(missing) - head:
        where = "" if isinstance(source, dict) else f" {source}"
        raise MrplabError(f"encoder checkpoint{where} does not fit the configured model",
                          "use the model section and data.image_size the checkpoint was made with")


@dataclass
class Provenance:
    cfg: VisionConfig
    git_commit: str | None

    def sidecar(self, **fields) -> str:
        return dumps({**fields, "config": self.cfg.model_dump(mode="json"), "config_hash": self.cfg.hash(),
                      "git_commit": self.git_commit}, indent=2) + "\n"


# --------------------------------------------------------------------------- run folder


class VisionRunFolder(RunFolder):
    """RunFolder named ``<name>-<command>-<ts>`` that keeps its partial folder when the run is interrupted
    (Ctrl-C, SIGTERM) after a resumable checkpoint or a finished stage, and reopens such a folder for
    ``--resume``."""

    def __init__(self, out_dir: str | Path, cfg: VisionConfig, command_name: str, init: Path | None = None,
                 resume_dir: Path | None = None, command: str | None = None):
        super().__init__(out_dir, cfg, command=command, label=command_name)
        self.command_name, self.init, self.resume_dir = command_name, init, resume_dir
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
            self.name = json.loads((self.partial / "run.json").read_text())["name"]
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


def open_resume(run_dir: Path) -> tuple[VisionConfig, str, Path | None]:
    """(config, command, init) of a stopped run folder for ``--resume``."""
    run_dir = Path(run_dir)
    if (run_dir / "summary.json").exists() or (run_dir / "metrics.jsonl").exists():
        raise MrplabError(f"run folder {run_dir} is complete", "start a new run instead of --resume")
    if not (run_dir / "run.json").is_file() or not (run_dir / "config.yaml").is_file():
        raise MrplabError(f"{run_dir} is not a stopped vision run folder", "pass the .partial folder the run printed")
    from mrplab.vision import config as vconfig

    cfg = vconfig.validate(config_mod.read_yaml(run_dir / "config.yaml"))
    run = json.loads((run_dir / "run.json").read_text())
    return cfg, run["subcommand"], Path(run["init"]) if run.get("init") else None


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
             precision: str, batch: int = 500) -> dict[str, float]:
    """Test accuracy on all images, and on multi-view and single-view images separately (embedded data)."""
    was = model.training
    model.eval()
    correct = []
    for a in range(0, len(data), batch):
        x = normalize(data.images[a:a + batch].to(device).float() / 255.0, mean, std)  # [b, 3, H, W]
        with _autocast(device, precision):
            logits = model(x)
        correct.append(logits.argmax(-1).cpu() == data.labels[a:a + batch])
    model.train(was)
    ok = torch.cat(correct).float()  # [N]
    out = {"acc": ok.mean().item()}
    if data.view is not None:
        for name, v in (("multi", 0), ("single", 1)):
            sel = data.view == v
            out[f"acc_{name}"] = ok[sel].mean().item() if sel.any() else float("nan")
    return out


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# --------------------------------------------------------------------------- the loop


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    def shard(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or self.world == 1:
            return t
        n = t.shape[0] // self.world
        return t[self.rank * n:(self.rank + 1) * n]


Compute = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, dict]]


@dataclass
class Loop:
    """What one call of ``fit`` needs besides the module."""

    cfg: VisionConfig
    stage: Stage
    train: ImageSet  # images already on the device
    mean: torch.Tensor
    std: torch.Tensor
    device: torch.device
    dist: Dist
    folder: VisionRunFolder | None  # rank 0 only
    prov: Provenance
    resume: dict | None = None  # the resume state of this stage, if any
    emit: Callable[[dict], None] = lambda rec: None
    advance: Callable[[int], None] = lambda n: None
    on_step: Callable[[Stage, int], None] | None = None


def fit(loop: Loop, module: nn.Module, groups: list[dict], compute: Compute, mask_ratio: float | None = None,
        after_step: Callable[[int, int], None] | None = None, collapse: CollapseCheck | None = None) -> dict:
    """Train ``module`` for the stage's epochs (continuing from ``loop.resume`` if given); returns {steps}."""
    cfg, stage, data = loop.cfg, loop.stage, loop.train
    hp = hyper(cfg, stage.kind)
    per_epoch, total = stage_steps(cfg, stage, len(data))
    B = hp.batch
    if B % loop.dist.world:
        raise MrplabError(f"batch {B} does not split over {loop.dist.world} processes", "use a batch divisible by it")
    opt = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(warmup_cosine, warmup=round(hp.warmup_epochs * per_epoch), total=total)
    )
    gens = Gens.for_stage(stage)
    n_patches = num_patches(getattr(module, "encoder", module))
    step, perm, window = 0, None, [0.0, 0]  # window: loss sum and steps since the last log
    if loop.resume is not None:
        step, perm, window = _load_resume(loop, module, opt, sched, gens, collapse)
    choose_attention(module, loop.device, cfg.precision)
    net = module
    if loop.dist.world > 1:
        net = nn.parallel.DistributedDataParallel(
            module, device_ids=[loop.device.index] if loop.device.type == "cuda" else None
        )
    module.train()
    loop.emit({"stage": stage.key, "kind": stage.kind, "seed": stage.seed, "method": stage.method,
               "event": "resume" if step else "start", "step": step, "steps": total, "world_size": loop.dist.world})
    t_log, (loss_sum, n_log) = time.perf_counter(), window
    while step < total:
        epoch, i = divmod(step, per_epoch)
        if i == 0:
            perm = torch.randperm(len(data), generator=gens.order)  # [N_train] this epoch's order
        idx = perm[i * B:(i + 1) * B].to(data.images.device)
        x = normalize(augment(data.images[idx], gens.augment), loop.mean, loop.std)  # [B, 3, H, W]
        y = data.labels[idx]
        mask = patch_mask(B, n_patches, mask_ratio, gens.mask, x.device) if mask_ratio else None  # [B, N]
        x, y, mask = loop.dist.shard(x), loop.dist.shard(y), loop.dist.shard(mask)
        with _autocast(loop.device, cfg.precision):
            loss, stats = compute(net, x, y, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        if after_step is not None:
            after_step(step, total)
        loss_sum = loss_sum + loss.detach().float()  # a tensor: no device sync until the log
        n_log += 1
        loop.advance(B)
        if step % cfg.log_every == 0 or step == total:
            mean_loss = float(loss_sum) / n_log
            if not math.isfinite(mean_loss):
                raise MrplabError(f"{stage.key} diverged at step {step} (loss {mean_loss})",
                                  f"lower {section(stage.kind)}.lr")
            now = time.perf_counter()
            rec = {"stage": stage.key, "kind": stage.kind, "seed": stage.seed, "method": stage.method,
                   "step": step, "epoch": epoch, "loss": mean_loss, "lr": sched.get_last_lr()[-1],
                   "images_per_s": n_log * B / (now - t_log)}
            rec.update({k: float(v) for k, v in stats.items()})
            loop.emit(rec)
            if collapse is not None and "target_var" in rec:
                collapse.update(rec["target_var"], step)
            t_log, n_log, loss_sum = now, 0, 0.0
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total and loop.folder is not None:
            _save_resume(loop, module, opt, sched, gens, perm, step, epoch, collapse, [float(loss_sum), n_log])
        if loop.on_step is not None:
            loop.on_step(stage, step)
    return {"steps": total}


def _save_resume(loop: Loop, module: nn.Module, opt, sched, gens: Gens, perm: torch.Tensor, step: int,
                 epoch: int, collapse: CollapseCheck | None, window: list) -> None:
    folder = loop.folder
    tag = f"resume-{loop.stage.key}-{step:07d}"
    save_weights(folder.ckpt / f"{tag}.safetensors", module)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "gens": gens.state_dict(),
             "perm": perm, "step": step, "collapse": collapse.state_dict() if collapse else None,
             "log_window": window}
    atomic_write_with(folder.ckpt / f"{tag}.pt", lambda p: torch.save(state, p))
    sidecar = loop.prov.sidecar(stage=loop.stage.key, step=step, epoch=epoch, weights=f"{tag}.safetensors",
                                state=f"{tag}.pt", metrics_lines=len(folder.records))
    atomic_write_text(folder.ckpt / "resume.json", sidecar)  # the commit point
    for old in folder.ckpt.glob("resume-*"):
        if not old.name.startswith(tag):
            old.unlink()


def _load_resume(loop: Loop, module: nn.Module, opt, sched, gens: Gens,
                 collapse: CollapseCheck | None) -> tuple[int, torch.Tensor, list]:
    r, ckpt = loop.resume, Path(loop.resume["dir"]) / "checkpoints"
    load_weights(ckpt / r["weights"], module, "resume checkpoint")
    state = torch.load(ckpt / r["state"], map_location="cpu", weights_only=True)
    if state["step"] != r["step"]:
        raise MrplabError(f"resume checkpoint in {ckpt} is torn", "resume from an earlier copy or start again")
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gens.load_state_dict(state["gens"])
    if collapse is not None and state["collapse"] is not None:
        collapse.load_state_dict(state["collapse"])
    return state["step"], state["perm"], state["log_window"]


# --------------------------------------------------------------------------- stages


def _new_encoder(cfg: VisionConfig, seed: int, num_classes: int) -> Encoder:
    m = cfg.model
    with seeded_init(seed, "vision/encoder-init"):
        return build_encoder(m.name, cfg.data.image_size, m.patch_size, num_classes)


def _pretrainer(cfg: VisionConfig, stage: Stage, encoder: Encoder) -> Pretrainer:
    p, m = cfg.pretrain, cfg.model
    check_mask_ratio(encoder, p.mask_ratio)

    with seeded_init(stage.seed, f"vision/{stage.key}/decoder-init"):
        if stage.method == "mae":
            return MAE(encoder, p.mask_ratio, p.norm_pix, m.decoder_dim, m.decoder_depth)
        return Data2Vec(encoder, p.mask_ratio, p.top_k, m.decoder_dim, m.decoder_depth)


def _sl_compute(label_smoothing: float) -> Compute:
    def compute(net, x, y, mask):
        logits = net(x)  # [B, C]
        return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing), {}

    return compute


def _pretrain_compute(net, x, y, mask):
    return net(x, mask)


@dataclass
class StageResult:
    stage: Stage
    steps: int
    wall_s: float
    test: dict[str, float] = field(default_factory=dict)
    module: nn.Module | None = None

    def record(self) -> dict:
        s = self.stage
        return {"stage": s.key, "kind": s.kind, "seed": s.seed, "method": s.method, "steps": self.steps,
                "wall_s": self.wall_s, **{f"test_{k}": v for k, v in self.test.items()}}


def run_stage(loop: Loop, encoders: dict[str, dict[str, torch.Tensor]], test: ImageSet) -> StageResult:
    """Train one stage and write its checkpoint; pretrain stages leave their encoder in ``encoders``."""
    cfg, stage = loop.cfg, loop.stage
    t0 = time.perf_counter()
    k = loop.train.num_classes
    encoder = _new_encoder(cfg, stage.seed, k)
    if stage.kind in ("finetune", "linprobe"):
        state = encoders.get(stage.init)
        load_encoder(Path(stage.init) if state is None else state, encoder)
        with seeded_init(stage.seed, f"vision/{stage.key}/head-init"):
            encoder.reset_head(k)
    if stage.kind == "pretrain":
        pre = _pretrainer(cfg, stage, encoder).to(loop.device)
        groups = param_groups([list(pre.named_parameters())], cfg.pretrain.lr, cfg.pretrain.weight_decay)
        p = cfg.pretrain

        def ema(step: int, total: int) -> None:
            pre.update_teacher(momentum_at(step, total, p.momentum, p.momentum_end))

        d2v = isinstance(pre, Data2Vec)
        collapse = CollapseCheck(p.min_target_var, p.collapse_patience) if d2v else None
        info = fit(loop, pre, groups, _pretrain_compute, pre.mask_ratio, ema if d2v else None, collapse)
        module, test_acc = pre, {}
        encoders[stage.key] = _cpu_state(pre.encoder)
    else:
        if stage.kind == "linprobe":
            module = LinearProbe(encoder).to(loop.device)
            groups = param_groups([list(module.encoder.head.named_parameters())], cfg.linprobe.lr,
                                  cfg.linprobe.weight_decay)
        else:
            module = encoder.to(loop.device)
            decay = cfg.finetune.layer_decay if stage.kind == "finetune" else 1.0
            groups = param_groups(encoder.layer_groups(), cfg.finetune.lr, cfg.finetune.weight_decay, decay)
        info = fit(loop, module, groups, _sl_compute(cfg.finetune.label_smoothing))
        test_acc = evaluate(module, test, loop.mean, loop.std, loop.device, cfg.precision)
        loop.emit({"stage": stage.key, "kind": stage.kind, "seed": stage.seed, "method": stage.method,
                   "event": "test", "step": info["steps"], **{f"test_{k}": v for k, v in test_acc.items()}})
    result = StageResult(stage, info["steps"], time.perf_counter() - t0, test_acc, module)
    if loop.folder is not None:
        _save_stage(loop, result)
    return result


def _save_stage(loop: Loop, result: StageResult) -> None:
    folder, stage = loop.folder, result.stage
    meta = {"stage": stage.key, "config_hash": loop.cfg.hash()}
    save_weights(folder.ckpt / f"{stage.key}.safetensors", result.module, meta)
    what = {"pretrain": f"{stage.method} pretrainer: encoder, decoder"
                        + (", EMA teacher" if stage.method == "data2vec" else ""),
            "finetune": "fine-tuned encoder with its head", "scratch": "encoder with its head, trained from scratch",
            "linprobe": "frozen encoder with a trained linear head"}[stage.kind]
    fields = {"stage": stage.key, "kind": stage.kind, "seed": stage.seed, "method": stage.method, "what": what,
              "init": stage.init, "step": result.steps, "epoch": hyper(loop.cfg, stage.kind).epochs,
              "test": result.test}
    if stage.kind == "pretrain":
        save_weights(folder.ckpt / f"{stage.key}.encoder.safetensors", result.module.encoder, meta)
        fields["encoder"] = f"{stage.key}.encoder.safetensors"
    atomic_write_text(folder.ckpt / f"{stage.key}.json", loop.prov.sidecar(**fields))
    done = read_stages(folder.partial)
    done["done"][stage.key] = result.record()
    done["metrics_lines"] = len(folder.records)
    atomic_write_text(folder.partial / "stages.json", dumps(done, indent=2) + "\n")
    for p in folder.ckpt.glob("resume*"):  # the finished stage's resume state is no longer needed
        p.unlink()


# --------------------------------------------------------------------------- a whole command


class RunInterrupted(Exception):
    """The run was stopped (Ctrl-C, SIGTERM) and its partial folder kept for ``--resume``."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__(f"interrupted; resume with --resume {path}")


@dataclass
class VisionResult:
    cfg: VisionConfig
    command: str
    stages: list[dict]  # StageResult.record() of every stage, in order
    modules: dict[str, nn.Module]  # trained modules of the stages run in this process
    table: list[dict]  # per approach and seed: test accuracies (supervised stages)
    wall_s: float
    path: Path | None = None
    runtime: dict = field(default_factory=dict)  # threads and precision used, and why


def _dist_setup(cfg: VisionConfig) -> tuple[Dist, torch.device, bool]:
    """(rank and world, device, whether this call started the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.device)
    if world == 1:
        return Dist(), device, False
    started = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size()), device, started


def planned_images(cfg: VisionConfig, stages: list[Stage], n_train: int) -> int:
    return sum(stage_steps(cfg, s, n_train)[1] * hyper(cfg, s.kind).batch for s in stages)


def load_data(cfg: VisionConfig) -> tuple[ImageSet, ImageSet]:
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    if train.num_classes < 2:
        raise MrplabError(f"the training data has {train.num_classes} class", "give at least two classes")
    return train, test


def run(cfg: VisionConfig, command: str, out_dir: str | Path = "runs", init: Path | None = None,
        resume: Path | None = None, on_record: Callable[[dict], None] | None = None,
        advance: Callable[[int], None] | None = None, on_plan: Callable[[int], None] | None = None,
        on_step: Callable[[Stage, int], None] | None = None, argv: str | None = None) -> VisionResult:
    """Run one ``mrplab vision`` command and write its run folder (rank 0).

    ``on_plan(images)`` is told how many training images the stages still to run will pass;
    ``advance(n)`` is called after every step with its global batch; ``on_record`` sees every
    logged record; ``on_step(stage, step)`` runs after every step (tests stop runs with it).
    """
    t0 = time.perf_counter()
    share = runtime.CoreShare(cfg.threads)
    try:
        return _run(cfg, command, out_dir, init, resume, on_record, advance, on_plan, on_step, argv, t0, share)
    finally:
        share.close()


def resolve_precision(cfg: VisionConfig, device: torch.device) -> tuple[VisionConfig, str]:
    """precision auto -> fp32 or bf16 (runtime.choose_precision at the model's matmul shapes), and why."""
    if cfg.precision != "auto":
        return cfg, "set by the config (precision)"
    shapes = matmul_shapes(cfg.model.name, cfg.data.image_size, cfg.model.patch_size, cfg.finetune.batch)
    precision, why, _ = runtime.choose_precision("auto", device, shapes)
    return cfg.model_copy(update={"precision": precision}), why


def _run(cfg, command, out_dir, init, resume, on_record, advance, on_plan, on_step, argv, t0,
         share: runtime.CoreShare) -> VisionResult:
    user_advance = advance or (lambda n: None)

    def advance(n: int) -> None:
        share.refresh()  # another mrplab process may have started or ended: re-divide the cores
        user_advance(n)

    stages = plan(cfg, command, init)
    if cfg.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")
        except ImportError:
            raise MrplabError("tensorboard=true needs the tensorboard package", "pip install tensorboard") from None
    dst, device, started = _dist_setup(cfg)
    try:
        given = cfg  # what the run folder records (precision may be auto); cfg: what the run computes with
        cfg, precision_reason = resolve_precision(cfg, device)
        train, test = load_data(cfg)
        done = read_stages(resume)["done"] if resume else {}
        resume_state = _resume_pointer(resume, done)
        if on_plan is not None:
            todo = [s for s in stages if s.key not in done]
            skip = resume_state["step"] * hyper(cfg, _stage_of(todo, resume_state).kind).batch if resume_state else 0
            on_plan(planned_images(cfg, todo, len(train)) - skip)
        mean, std = channel_stats(train.images)
        train_dev = ImageSet(train.images.to(device), train.labels.to(device), train.classes)
        prov = Provenance(given, git_commit())
        folder = VisionRunFolder(out_dir, given, command, init, resume, command=argv) if dst.rank == 0 else None
        modules: dict[str, nn.Module] = {}
        encoders: dict[str, dict[str, torch.Tensor]] = {}  # pretrained encoder weights by stage key
        records: dict[str, dict] = dict(done)

        def emit(rec: dict) -> None:
            if folder is not None:
                folder.emit(rec)
            if on_record is not None:
                on_record(rec)

        try:
            with folder if folder is not None else contextlib.nullcontext():
                for stage in stages:
                    if stage.key in done:
                        if stage.kind == "pretrain":
                            encoders[stage.key] = _read_safetensors(
                                resume / "checkpoints" / f"{stage.key}.encoder.safetensors", "encoder checkpoint")
                        continue
                    pointer = resume_state if resume_state and resume_state["stage"] == stage.key else None
                    loop = Loop(cfg, stage, train_dev, mean.to(device), std.to(device), device, dst, folder, prov,
                                pointer, emit, advance, on_step)
                    res = run_stage(loop, encoders, test)
                    modules[stage.key] = res.module
                    records[stage.key] = res.record()
                ordered = [records[s.key] for s in stages]
                result = VisionResult(given, command, ordered, modules, report.accuracy_table(ordered),
                                      time.perf_counter() - t0,
                                      runtime={**share.record(), "precision": cfg.precision,
                                               "precision_reason": precision_reason})
                if folder is not None:
                    figure_files = report.write_figures(folder.partial / "figures", folder.records, modules, test,
                                                        mean, std, cfg, device)
                    summary = report.summary(result, folder.name, prov, figure_files)
                    result.path = folder.complete(summary, report.render(summary, given, figure_files))
        except (KeyboardInterrupt, SystemExit):
            if folder is not None and folder.interrupted:
                raise RunInterrupted(folder.partial) from None
            raise
        return result
    finally:
        if started:
            dist.destroy_process_group()


def _stage_of(stages: list[Stage], pointer: dict) -> Stage:
    return next(s for s in stages if s.key == pointer["stage"])


def _resume_pointer(resume: Path | None, done: dict) -> dict | None:
    if resume is None:
        return None
    path = resume / "checkpoints" / "resume.json"
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    if r["stage"] in done:
        return None
    return {**r, "dir": str(resume)}
