"""Checkpoints: weights as safetensors (a finished stage, a pretrained encoder), JSON sidecars with the
config and its hash, and the resumable state of a running stage.

A running stage writes, every ``checkpoint_every`` steps, its weights (safetensors), then the optimizer,
scheduler, generator states and the epoch's data order (torch.save), then ``resume.json``: the commit
point. A finished stage writes ``<stage>.safetensors`` (+ ``<stage>.encoder.safetensors`` for pretraining),
its sidecar, and its row in ``stages.json``, and drops the resume state.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mrplab.config import config_hash
from mrplab.errors import MrplabError
from mrplab.io import atomic_write_text, atomic_write_with, dumps
from mrplab.vision.config import VisionConfig
from mrplab.vision.models import Encoder
from mrplab.vision.run_folder import VisionRunFolder, read_stages
from mrplab.vision.stages import Stage, StageResult, hyper

def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def save_weights(path: Path, module: nn.Module, meta: dict[str, str] | None = None) -> None:
    state = cpu_state(module)
    atomic_write_with(path, lambda p: save_file(state, str(p), metadata=meta or {}))


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # unreadable, truncated or not safetensors
        raise MrplabError(f"cannot read {what} {path}: {' '.join(str(err).split())}", "check the path") from None


def load_weights(path: Path, module: nn.Module, what: str) -> None:
    state = read_safetensors(path, what)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError:
        raise MrplabError(
            f"{what} {path} does not fit the configured model", "use the model section the checkpoint was made with"
        ) from None


def load_encoder(source: Path | dict[str, torch.Tensor], encoder: Encoder) -> None:
    """Pretrained encoder weights into ``encoder``, all but the classification head (which fine-tuning resets)."""
    state = source if isinstance(source, dict) else read_safetensors(source, "encoder checkpoint")
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
    """What every sidecar records: the run's config (as given), its hash and the git commit."""

    cfg: VisionConfig
    git_commit: str | None

    def sidecar(self, **fields) -> str:
        return dumps({**fields, "config": self.cfg.model_dump(mode="json"), "config_hash": self.cfg.hash(),
                      "git_commit": self.git_commit}, indent=2) + "\n"


def save_resume(folder: VisionRunFolder, prov: Provenance, stage_key: str, module: nn.Module, state: dict,
                epoch: int) -> None:
    """The resumable state of a running stage: weights, then ``state`` (optimizer, scheduler, generators,
    data order, ``step``), then ``resume.json``, the commit point; older resume files are removed."""
    step = state["step"]
    tag = f"resume-{stage_key}-{step:07d}"
    save_weights(folder.ckpt / f"{tag}.safetensors", module)
    atomic_write_with(folder.ckpt / f"{tag}.pt", lambda p: torch.save(state, p))
    sidecar = prov.sidecar(stage=stage_key, step=step, epoch=epoch, weights=f"{tag}.safetensors",
                           state=f"{tag}.pt", metrics_lines=len(folder.records))
    atomic_write_text(folder.ckpt / "resume.json", sidecar)  # the commit point
    for old in folder.ckpt.glob("resume-*"):
        if not old.name.startswith(tag):
            old.unlink()


def load_resume(pointer: dict, module: nn.Module) -> dict:
    """Weights of the resume point ``pointer`` (resume.json plus ``dir``) into ``module``; returns its state."""
    ckpt = Path(pointer["dir"]) / "checkpoints"
    load_weights(ckpt / pointer["weights"], module, "resume checkpoint")
    state = torch.load(ckpt / pointer["state"], map_location="cpu", weights_only=True)
    if state["step"] != pointer["step"]:
        raise MrplabError(f"resume checkpoint in {ckpt} is torn", "resume from an earlier copy or start again")
    return state


def save_stage(folder: VisionRunFolder, prov: Provenance, cfg: VisionConfig, result: StageResult) -> None:
    """A finished stage: its weights (and a pretrain stage's encoder alone), sidecar and stages.json row."""
    stage = result.stage
    meta = {"stage": stage.key, "config_hash": cfg.hash()}
    save_weights(folder.ckpt / f"{stage.key}.safetensors", result.module, meta)
    what = {"pretrain": f"{stage.method} pretrainer: encoder, decoder"
                        + (", EMA teacher" if stage.method == "data2vec" else ""),
            "finetune": "fine-tuned encoder with its head", "scratch": "encoder with its head, trained from scratch",
            "linprobe": "frozen encoder with a trained linear head"}[stage.kind]
    fields = {"stage": stage.key, "kind": stage.kind, "seed": stage.seed, "method": stage.method, "what": what,
              "init": stage.init, "step": result.steps, "epoch": hyper(cfg, stage).epochs,
              "test": result.test}
    if stage.kind == "pretrain":
        save_weights(folder.ckpt / f"{stage.key}.encoder.safetensors", result.module.encoder, meta)
        fields["encoder"] = f"{stage.key}.encoder.safetensors"
    atomic_write_text(folder.ckpt / f"{stage.key}.json", prov.sidecar(**fields))
    done = read_stages(folder.partial)
    done["done"][stage.key] = result.record()
    done["metrics_lines"] = len(folder.records)
    atomic_write_text(folder.partial / "stages.json", dumps(done, indent=2) + "\n")
    for p in folder.ckpt.glob("resume*"):  # the finished stage's resume state is no longer needed
        p.unlink()




# --------------------------------------------------------------------------- shared pretraining


def pretrain_key(cfg: VisionConfig, stage: Stage) -> str:
    """The hash of everything a pretraining stage's result depends on: the pretraining recipe and its data,
    the model, the downstream data section (the pool or the motif bank), the seed and method, gradient
    clipping, precision and device. Runs that agree on these share one pretrained encoder."""
    return config_hash({"pretrain": cfg.pretrain.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"),
                        "data": cfg.data.model_dump(mode="json"), "seed": stage.seed, "method": stage.method,
                        "grad_clip": cfg.grad_clip, "precision": cfg.precision, "device": cfg.device})


def cached_pretrainer(cache: Path, key: str) -> tuple[Path, dict] | None:
    """(weights file, its stage record) of a pretrained model in the cache, or None."""
    folder = Path(cache) / key
    if not (folder / "stage.json").is_file():
        return None
    return folder / "pretrainer.safetensors", json.loads((folder / "stage.json").read_text())


def store_pretrainer(cache: Path, key: str, module: nn.Module, record: dict, prov: Provenance) -> None:
    """Put a pretrained model into the cache: built in a hidden folder and renamed, so a reader sees all or
    nothing; when another run stored the same key first, its copy is kept."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{key}.{os.getpid()}.partial"
    tmp.mkdir()
    try:
        save_weights(tmp / "pretrainer.safetensors", module, {"pretrain_key": key})
        atomic_write_text(tmp / "stage.json", prov.sidecar(**record, pretrain_key=key))
        try:
            os.rename(tmp, cache / key)
        except OSError:  # stored meanwhile by another run
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
