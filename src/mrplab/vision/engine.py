"""The vision engine: one training loop (``fit``) for pretraining, fine-tuning, SL from scratch and
linear probing, and the test evaluation.

Every stage is the same loop: a fresh permutation of the training images per epoch from the stage's
``order`` generator, random crop + flip from its ``augment`` generator, masks from its ``mask``
generator, AdamW with linear warmup and cosine decay, gradient clipping, optional bf16 autocast.

Data parallel: under torchrun (WORLD_SIZE > 1) every process draws the same global batch and masks and
takes its slice by rank; DistributedDataParallel averages the gradients, so the replicas stay identical.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from mrplab.divergence import Guard, weight_norm
from mrplab.errors import MrplabError
from mrplab.rng import generator, stream_seed
from mrplab.vision import checkpoints
from mrplab.vision.config import VisionConfig
from mrplab.vision.data import ImageSet, augment, normalize
from mrplab.vision.models import Encoder, Group, choose_attention, num_patches
from mrplab.vision.objectives import CollapseCheck, patch_mask
from mrplab.vision.run_folder import VisionRunFolder
from mrplab.vision.stages import Stage, hyper, section, stage_steps

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
        with autocast(device, precision):
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


def autocast(device: torch.device, precision: str):
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
    prov: checkpoints.Provenance
    resume: dict | None = None  # the resume state of this stage, if any
    emit: Callable[[dict], None] = lambda rec: None
    advance: Callable[[int], None] = lambda n: None
    on_step: Callable[[Stage, int], None] | None = None


def _rescale_lr(sched: torch.optim.lr_scheduler.LambdaLR, factor: float) -> None:
    """Every group's base lr times ``factor`` (layer decay's ratios kept), the current lr set from the schedule."""
    if factor == 1.0:
        return
    sched.base_lrs = [base * factor for base in sched.base_lrs]
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(sched.last_epoch)


def fit(loop: Loop, module: nn.Module, groups: list[dict], compute: Compute, mask_ratio: float | None = None,
        after_step: Callable[[int, int], None] | None = None, collapse: CollapseCheck | None = None) -> dict:
    """Train ``module`` for the stage's epochs (continuing from ``loop.resume`` if given); returns {steps}."""
    cfg, stage, data = loop.cfg, loop.stage, loop.train
    hp = hyper(cfg, stage)
    per_epoch, total, B = stage_steps(cfg, stage, len(data))
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
        state = checkpoints.load_resume(loop.resume, module)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gens.load_state_dict(state["gens"])
        if collapse is not None and state["collapse"] is not None:
            collapse.load_state_dict(state["collapse"])
        step, perm, window = state["step"], state["perm"], state["log_window"]
        _rescale_lr(sched, hp.lr / state.get("lr", hp.lr))  # an lr changed with --set at --resume
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
    guard = Guard(stage.key, f"{section(stage.kind)}.lr")  # after a resume, judged from the resumed weights
    trained = [p for p in module.parameters() if p.requires_grad]
    while step < total:
        epoch, i = divmod(step, per_epoch)
        if i == 0:
            perm = torch.randperm(len(data), generator=gens.order)  # [N_train] this epoch's order
        idx = perm[i * B:(i + 1) * B].to(data.images.device)
        x = normalize(augment(data.images[idx], gens.augment), loop.mean, loop.std)  # [B, 3, H, W]
        y = data.labels[idx]
        mask = patch_mask(B, n_patches, mask_ratio, gens.mask, x.device) if mask_ratio else None  # [B, N]
        x, y, mask = loop.dist.shard(x), loop.dist.shard(y), loop.dist.shard(mask)
        with autocast(loop.device, cfg.precision):
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
            guard.check(step, mean_loss, weight_norm(*trained))
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
            state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "gens": gens.state_dict(),
                     "perm": perm, "step": step, "lr": hp.lr, "collapse": collapse.state_dict() if collapse else None,
                     "log_window": [float(loss_sum), n_log]}
            checkpoints.save_resume(loop.folder, loop.prov, stage.key, module, state, epoch)
        if loop.on_step is not None:
            loop.on_step(stage, step)
    return {"steps": total, "batch": B}


