"""One ``mrplab vision`` command from start to end.

A command's stages (vision/stages.py) run in order; each is trained by the engine's loop
(vision/engine.py), writes its checkpoint (vision/checkpoints.py) and its row in the run folder
(vision/run_folder.py). Supervised stages end with the test accuracy on multi-view and single-view
images. ``run`` also sets up data parallelism under torchrun, the precision and the core share.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mrplab import memory, runtime
from mrplab.errors import MrplabError
from mrplab.io import atomic_write_text, dumps, git_commit
from mrplab.runtime import resolve_device
from mrplab.vision import checkpoints, report, splits
from mrplab.vision.checkpoints import Provenance, cpu_state, load_encoder, load_weights, read_safetensors, save_stage
from mrplab.vision.config import VisionConfig
from mrplab.vision.data import ImageSet, channel_stats, load_split
from mrplab.vision.engine import Compute, Dist, LinearProbe, Loop, evaluate, fit, param_groups, seeded_init
from mrplab.vision.models import Encoder, build_encoder, encoder_sizes, matmul_shapes
from mrplab.vision.objectives import MAE, CollapseCheck, Data2Vec, Pretrainer, check_mask_ratio, momentum_at
from mrplab.vision.run_folder import VisionRunFolder, read_stages, resume_changes, resume_pointer
from mrplab.vision.stages import Stage, StageResult, hyper, plan, planned_images, stage_steps

# --------------------------------------------------------------------------- stages


def _new_encoder(cfg: VisionConfig, seed: int, num_classes: int) -> Encoder:
    m = cfg.model
    with seeded_init(seed, "vision/encoder-init"):
        return build_encoder(m.name, cfg.data.image_size, m.patch_size, num_classes, m.stem, m.timm)


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



def run_stage(loop: Loop, encoders: dict[str, dict[str, torch.Tensor]], test: ImageSet,
              val: ImageSet | None = None) -> StageResult:
    """Train one stage on ``loop.train`` and write its checkpoint; pretrain stages leave their encoder in
    ``encoders``; supervised stages are tested on ``test`` and, when given, on the validation images ``val``."""
    cfg, stage = loop.cfg, loop.stage
    t0 = time.perf_counter()
    k = loop.train.num_classes
    encoder = _new_encoder(cfg, stage.seed, k)
    if stage.kind in ("finetune", "linprobe"):
        state = encoders.get(stage.init)
        if state is None and stage.init.startswith(("local-dir:", "timm:")):
            from mrplab.vision.interop import timm_encoder_state

            state = timm_encoder_state(stage.init, cfg)
        load_encoder(Path(stage.init) if state is None else state, encoder)
        with seeded_init(stage.seed, f"vision/{stage.key}/head-init"):
            encoder.reset_head(k)
    # pretraining and SL from scratch are shared through the cache by runs that agree on what they depend on
    shared = stage.kind in ("pretrain", "scratch") and bool(cfg.pretrain_cache)
    key = (checkpoints.pretrain_key(cfg, stage) if stage.kind == "pretrain" else
           checkpoints.scratch_key(cfg, stage, hyper(cfg, stage).epochs)) if shared else None
    cached = checkpoints.cached_stage(Path(cfg.pretrain_cache), key, stage.kind) if shared else None
    if cached is not None:  # trained by an earlier run with the same recipe and data: load it
        record = cached[1]
        info = {"steps": record["steps"], "batch": record.get("batch")}
        loop.emit({"stage": stage.key, "kind": stage.kind, "seed": stage.seed, "method": stage.method,
                   "event": "reused", "step": info["steps"], "from": str(cached[0].parent)})
        if stage.kind == "pretrain":
            module = _pretrainer(cfg, stage, encoder).to(loop.device)
            load_weights(cached[0], module, "cached pretrained model")
            test_acc, val_acc = {}, {}
            encoders[stage.key] = cpu_state(module.encoder)
        else:  # its accuracies as measured when it was trained (the same model on the same images)
            module = encoder.to(loop.device)
            load_weights(cached[0], module, "cached SL model")
            test_acc = {k[len("test_"):]: v for k, v in record.items() if k.startswith("test_")}
            val_acc = {k[len("val_"):]: v for k, v in record.items() if k.startswith("val_")}
    elif stage.kind == "pretrain":
        pre = _pretrainer(cfg, stage, encoder).to(loop.device)
        groups = param_groups([list(pre.named_parameters())], cfg.pretrain.lr, cfg.pretrain.weight_decay)
        p = cfg.pretrain

        def ema(step: int, total: int) -> None:
            pre.update_teacher(momentum_at(step, total, p.momentum, p.momentum_end))

        d2v = isinstance(pre, Data2Vec)
        collapse = CollapseCheck(p.min_target_var, p.collapse_patience) if d2v else None
        info = fit(loop, pre, groups, _pretrain_compute, pre.mask_ratio, ema if d2v else None, collapse)
        module, test_acc, val_acc = pre, {}, {}
        encoders[stage.key] = cpu_state(pre.encoder)
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
        val_acc = evaluate(module, val, loop.mean, loop.std, loop.device, cfg.precision) if val is not None else {}
    if stage.kind != "pretrain":  # measured now, or when the cached model was trained
        loop.emit({"stage": stage.key, "kind": stage.kind, "seed": stage.seed, "method": stage.method,
                   "event": "test", "step": info["steps"], **{f"test_{k}": v for k, v in test_acc.items()},
                   **{f"val_{k}": v for k, v in val_acc.items()}})
    result = StageResult(stage, info["steps"], time.perf_counter() - t0, test_acc, module, val_acc,
                         len(loop.train), info["batch"], reused=cached is not None)
    if shared and cached is None and loop.dist.rank == 0:
        checkpoints.store_stage(Path(cfg.pretrain_cache), key, stage.kind, module, result.record(), loop.prov)
    if loop.folder is not None:
        save_stage(loop.folder, loop.prov, cfg, result)
    return result



# --------------------------------------------------------------------------- a whole command


class RunInterrupted(Exception):
    """The run was stopped (Ctrl-C, SIGTERM): ``path`` is the partial folder kept for ``--resume``, or None when
    nothing resumable had been written yet (the folder was removed)."""

    def __init__(self, path: Path | None):
        self.path = path
        super().__init__(f"interrupted; resume with --resume {path}" if path else "interrupted; nothing was kept")


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
    menu: list[dict] = field(default_factory=list)  # with finetune.epochs_menu: a row per menu stage


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



class StageData:
    """The images of every stage, on the device: the pretraining set for pretrain stages, the seed's labelled
    subset (and its validation images) for supervised ones (vision/splits.py)."""

    def __init__(self, cfg: VisionConfig, stages: list[Stage], pool: ImageSet, device: torch.device):
        self.pool, self.device = pool, device
        self.labelled = {seed: splits.labelled_subset(pool, cfg.labels, seed) for seed in sorted({s.seed for s in stages})}
        needs_pretrain = any(s.kind == "pretrain" for s in stages)
        self.pretrain = splits.pretrain_images(cfg, pool) if needs_pretrain else None
        self._on_device: dict[tuple, ImageSet] = {}

    def _dev(self, key: tuple, data: ImageSet) -> ImageSet:
        if key not in self._on_device:
            self._on_device[key] = ImageSet(data.images.to(self.device), data.labels.to(self.device), data.classes)
        return self._on_device[key]

    def count(self, stage: Stage) -> int:
        return len(self.pretrain) if stage.kind == "pretrain" else len(self.labelled[stage.seed].train)

    def train(self, stage: Stage) -> ImageSet:
        if stage.kind == "pretrain":
            return self._dev(("pretrain",), self.pretrain)
        return self._dev(("train", stage.seed), splits.subset(self.pool, self.labelled[stage.seed].train))

    def val(self, stage: Stage) -> ImageSet | None:
        idx = self.labelled[stage.seed].val
        return splits.subset(self.pool, idx) if stage.kind != "pretrain" and len(idx) else None

    def write_index(self, folder: Path) -> None:
        """labels/s<seed>.json: the training-split indices of each seed's labelled and validation images."""
        folder.mkdir(parents=True, exist_ok=True)
        for seed, lab in self.labelled.items():
            atomic_write_text(folder / f"s{seed}.json", dumps(lab.record(self.pool.classes, self.pool.labels)) + "\n")


def memory_parts(cfg: VisionConfig, stages: list[Stage]) -> dict[str, float]:
    """Upper-end bytes of the rendered images (embedded source; a folder is checked when listed) and of one
    training step's activations (mrplab/memory.py checks them against free memory)."""
    S, parts = cfg.data.image_size, {}
    if cfg.data.source == "embedded":
        n = cfg.data.n_train + cfg.data.n_test
        if any(s.kind == "pretrain" for s in stages) and splits.pretrain_source(cfg) == "embedded":
            n += cfg.pretrain.data.n_images or 10 * cfg.data.n_train
        parts["images"] = 2.0 * n * 3 * S * S  # uint8 images and the labelled / pretraining subsets taken of them
    batch = max(cfg.pretrain.batch, cfg.finetune.batch, cfg.linprobe.batch)
    z = sizes_of(cfg)
    if "dim" in z:
        parts["activations"] = 4.0 * batch * (z["tokens"] + 1) * z["dim"] * z["depth"] * (12 + 2 * z["mlp_ratio"])
    else:  # 64 channels x 24 maps at the first stage's resolution, an upper end for the stages after it
        parts["activations"] = 4.0 * batch * z["side"] ** 2 * max(64.0, z["width"]) * 24
    # fp32 weights, gradients and AdamW's two moments, plus data2vec's EMA teacher (decoders are small)
    parts["weights and optimiser"] = 4.0 * z["params"] * 5
    return parts


HOST_PARTS = ("images",)  # decoded or rendered on the host
DEVICE_PARTS = ("images", "activations", "weights and optimiser")  # StageData moves the images to the device


def check_memory(cfg: VisionConfig, stages: list[Stage], device: torch.device,
                 available: dict[str, int] | None = None) -> None:
    """memory_parts against free memory: all on the CPU; on CUDA the images also against host memory (decoded
    there) and every part against the device's."""
    parts = memory_parts(cfg, stages)
    memory.check_run({k: parts[k] for k in HOST_PARTS if k in parts}, {k: parts[k] for k in DEVICE_PARTS if k in parts},
                     "data.n_train / n_test, pretrain.data.n_images, data.image_size, the model or the batch sizes",
                     device, available)


def sizes_of(cfg: VisionConfig) -> dict[str, float]:
    m = cfg.model
    return encoder_sizes(m.name, cfg.data.image_size, m.patch_size, m.stem, m.timm)


def load_data(cfg: VisionConfig) -> tuple[ImageSet, ImageSet]:
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    if train.num_classes < 2:
        raise MrplabError(f"the training data has {train.num_classes} class", "give at least two classes")
    return train, test


def run(cfg: VisionConfig, command: str, out_dir: str | Path = "runs", init: Path | None = None,
        resume: Path | None = None, on_record: Callable[[dict], None] | None = None,
        advance: Callable[[int], None] | None = None, on_plan: Callable[[int], None] | None = None,
        on_step: Callable[[Stage, int], None] | None = None, argv: str | None = None,
        on_folder: Callable[[Path], None] | None = None) -> VisionResult:
    """Run one ``mrplab vision`` command and write its run folder (rank 0).

    ``on_plan(images)`` is told how many training images the stages still to run will pass;
    ``advance(n)`` is called after every step with its global batch; ``on_record`` sees every
    logged record; ``on_step(stage, step)`` runs after every step (tests stop runs with it);
    ``on_folder(path)`` is told the partial run folder once it exists (rank 0).
    """
    t0 = time.perf_counter()
    if init is not None and str(init).startswith("timm:"):
        from mrplab.vision.interop import config_for_init

        cfg = config_for_init(cfg, str(init))  # model.timm: the architecture of the weights file
    share = runtime.CoreShare(cfg.threads)
    try:
        return _run(cfg, command, out_dir, init, resume, on_record, advance, on_plan, on_step, argv, t0, share,
                    on_folder or (lambda path: None))
    finally:
        share.close()


def resolve_precision(cfg: VisionConfig, device: torch.device) -> tuple[VisionConfig, str]:
    """precision auto -> fp32 or bf16 (runtime.choose_precision at the model's matmul shapes), and why."""
    if cfg.precision != "auto":
        return cfg, "set by the config (precision)"
    shapes = matmul_shapes(sizes_of(cfg), cfg.finetune.batch)
    precision, why, _ = runtime.choose_precision("auto", device, shapes, autocast=True)
    return cfg.model_copy(update={"precision": precision}), why


def _run(cfg, command, out_dir, init, resume, on_record, advance, on_plan, on_step, argv, t0,
         share: runtime.CoreShare, on_folder: Callable[[Path], None]) -> VisionResult:
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
        check_memory(cfg, stages, device)
        given = cfg  # what the run folder records (precision may be auto); cfg: what the run computes with
        cfg, precision_reason = resolve_precision(cfg, device)
        train, test = load_data(cfg)
        data = StageData(cfg, stages, train, device)
        done = read_stages(resume)["done"] if resume else {}
        resume_state = resume_pointer(resume, done)
        todo = [s for s in stages if s.key not in done]
        skip, changes = 0, None
        if resume_state:
            at = _stage_of(todo, resume_state)
            _, total, batch = stage_steps(cfg, at, data.count(at))
            if resume_state["step"] > total:
                raise MrplabError(f"the run stopped at step {resume_state['step']} of {at.key}, beyond the {total} "
                                  "steps its epochs now give", "resume with at least the epochs it was started with")
            skip = resume_state["step"] * batch
        if resume is not None:
            keys = resume_changes(resume, given)
            if keys:
                changes = {"keys": keys, "stage": resume_state["stage"] if resume_state else
                           (todo[0].key if todo else None), "step": resume_state["step"] if resume_state else 0}
        if on_plan is not None:
            on_plan(planned_images(cfg, todo, data.count) - skip)
        mean, std = channel_stats(train.images)
        prov = Provenance(given, git_commit())
        folder = (VisionRunFolder(out_dir, given, command, init, resume, command=argv, changes=changes)
                  if dst.rank == 0 else None)
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
                if folder is not None:
                    on_folder(folder.partial)
                    data.write_index(folder.partial / "labels")
                for stage in stages:
                    if stage.key in done:
                        if stage.kind == "pretrain":
                            encoders[stage.key] = read_safetensors(
                                resume / "checkpoints" / f"{stage.key}.encoder.safetensors", "encoder checkpoint")
                        continue
                    pointer = resume_state if resume_state and resume_state["stage"] == stage.key else None
                    loop = Loop(cfg, stage, data.train(stage), mean.to(device), std.to(device), device, dst, folder,
                                prov, pointer, emit, advance, on_step)
                    res = run_stage(loop, encoders, test, data.val(stage))
                    modules[stage.key] = res.module
                    records[stage.key] = res.record()
                ordered = [records[s.key] for s in stages]
                report.select(ordered)
                result = VisionResult(given, command, ordered, modules, report.accuracy_table(ordered),
                                      time.perf_counter() - t0,
                                      runtime={**share.record(), "precision": cfg.precision,
                                               "precision_reason": precision_reason},
                                      menu=report.accuracy_table(ordered, menu=True) if cfg.finetune.epochs_menu
                                      else [])
                if folder is not None:
                    figure_files = report.write_figures(folder.partial / "figures", folder.records, modules, test,
                                                        mean, std, cfg, device)
                    summary = report.summary(result, folder.name, prov, figure_files)
                    result.path = folder.complete(summary, report.render(summary, given, figure_files))
        except (KeyboardInterrupt, SystemExit):
            if folder is not None:
                raise RunInterrupted(folder.partial if folder.interrupted else None) from None
            raise
        return result
    finally:
        if started:
            dist.destroy_process_group()


def _stage_of(stages: list[Stage], pointer: dict) -> Stage:
    return next(s for s in stages if s.key == pointer["stage"])


