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

from mrplab.config import config_hash, hash_view
from mrplab.errors import MrplabError
from mrplab.io import atomic_write_text, atomic_write_with, dumps, read_json
from mrplab.vision.config import VisionConfig
from mrplab.vision.models import Encoder, build_encoder
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
    return config_hash({"pretrain": hash_view(cfg.pretrain), "model": hash_view(cfg.model),
                        "data": hash_view(cfg.data), "seed": stage.seed, "method": stage.method,
                        "grad_clip": cfg.grad_clip, "precision": cfg.precision, "device": cfg.device})


def scratch_key(cfg: VisionConfig, stage: Stage, epochs: int) -> str:
    """The hash of everything an SL-from-scratch stage's result depends on: the whole config (hash_view) but
    what SL never reads (pretraining, probing, the methods, the run's name and seeds, output cadence,
    threads, the cache path; fine-tuning's own epochs, menu and layer decay), plus the stage's epochs and
    seed. Rows of a study that differ only in pretraining (coverage, method) share one SL model."""
    view = hash_view(cfg)
    for k in ("name", "seeds", "methods", "threads", "log_every", "checkpoint_every", "tensorboard",
              "pretrain_cache", "pretrain", "linprobe"):
        view.pop(k, None)
    for k in ("epochs", "epochs_menu", "layer_decay"):
        view["finetune"].pop(k, None)
    return config_hash({"scratch": view, "epochs": epochs, "seed": stage.seed})


CACHE_FILES = {"pretrain": "pretrainer.safetensors", "scratch": "classifier.safetensors"}


def cached_stage(cache: Path, key: str, kind: str) -> tuple[Path, dict] | None:
    """(weights file, its stage record) of a pretrain or scratch stage in the cache, or None."""
    folder = Path(cache) / key
    if not (folder / "stage.json").is_file() or not (folder / CACHE_FILES[kind]).is_file():
        return None
    return folder / CACHE_FILES[kind], json.loads((folder / "stage.json").read_text())


def store_stage(cache: Path, key: str, kind: str, module: nn.Module, record: dict, prov: Provenance) -> None:
    """Put a trained stage's module into the cache: built in a hidden folder and renamed, so a reader sees all
    or nothing; when another run stored the same key first, its copy is kept."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{key}.{os.getpid()}.partial"
    tmp.mkdir()
    try:
        save_weights(tmp / CACHE_FILES[kind], module, {"cache_key": key})
        atomic_write_text(tmp / "stage.json", prov.sidecar(**record, cache_key=key))
        try:
            os.rename(tmp, cache / key)
        except OSError:  # stored meanwhile by another run
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- classifiers (for `mrplab evidence`)


@dataclass
class Classifier:
    path: Path
    approach: str  # "SL", "MRP+FT (mae)", ...
    seed: int
    cfg: VisionConfig
    encoder: Encoder
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or f"{self.approach} s{self.seed}"


def _approach(sidecar: dict) -> str:
    kind, method = sidecar.get("kind"), sidecar.get("method")
    if kind == "scratch":
        return "SL"
    if kind == "finetune":
        return f"MRP+FT ({method})" if method else "FT"
    if kind == "linprobe":
        return f"LP ({method})" if method else "LP"
    raise MrplabError(
        f"checkpoint kind '{kind}' has no classifier to explain",
        "give a scratch, fine-tuned or linear-probe checkpoint (or a compare run folder)",
    )


def load_classifier(path: str | Path) -> Classifier:
    """A classifier checkpoint of the vision track, with its sidecar's config; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise MrplabError(f"checkpoint {path} does not exist", "give a .safetensors file from a run's checkpoints/")
    sidecar_path = path.with_suffix(".json")
    if not sidecar_path.is_file():
        raise MrplabError(f"{path} has no sidecar {sidecar_path.name}",
                          "give a checkpoint written by `mrplab vision` (it writes <stage>.json beside it)")
    try:
        sidecar = json.loads(sidecar_path.read_text())
        cfg = VisionConfig.model_validate(sidecar["config"])
    except Exception as err:  # noqa: BLE001 - any unreadable sidecar is the user's file problem
        raise MrplabError(f"sidecar {sidecar_path} is not a vision checkpoint sidecar ({type(err).__name__})",
                          "give a checkpoint written by `mrplab vision`") from None
    approach = _approach(sidecar)
    try:
        state = load_file(str(path))
    except Exception:  # noqa: BLE001
        raise MrplabError(f"{path} is not a safetensors checkpoint", "give a .safetensors file from a run's checkpoints/") from None
    if approach.startswith("LP"):  # LinearProbe wraps the encoder
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    encoder = build_encoder(cfg.model.name, cfg.data.image_size, cfg.model.patch_size, _num_classes(state, cfg),
                            cfg.model.stem, cfg.model.timm)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError:
        raise MrplabError(f"{path} does not fit the model its sidecar describes ({cfg.model.name})",
                          "give the checkpoint and sidecar written together by `mrplab vision`") from None
    encoder.eval()
    return Classifier(path, approach, int(sidecar.get("seed", 0)), cfg, encoder)


def _num_classes(state: dict[str, torch.Tensor], cfg: VisionConfig) -> int:
    for key in ("vit.head.weight", "net.fc.weight"):
        if key in state:
            return int(state[key].shape[0])
    raise MrplabError("the checkpoint holds no classification head", "give a scratch or fine-tuned checkpoint")


def _not_selected(run_dir: Path) -> set[str]:
    """Stages of an epochs-menu run that validation did not choose (they are left out of a run folder's models)."""
    try:
        stages = json.loads((run_dir / "summary.json").read_text()).get("stages", [])
    except (OSError, ValueError):
        return set()
    return {st["stage"] for st in stages if st.get("selected") is False}


def _sidecar_kind(checkpoint: Path) -> str | None:
    sidecar = read_json(checkpoint.with_suffix(".json"), "checkpoint sidecar",
                        "restore it from the run that wrote it, or remove the checkpoint and its sidecar")
    return sidecar.get("kind") if isinstance(sidecar, dict) else None


def classifier_files(paths: list[str]) -> list[Path]:
    """Checkpoint files as given; a run folder contributes its supervised stages' checkpoints (with an epochs
    menu, the stages validation chose)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise MrplabError(f"{p} does not exist", "give a .safetensors checkpoint or a `mrplab vision` run folder")
        if p.is_dir():
            skip = _not_selected(p)
            found = [c for c in sorted((p / "checkpoints").glob("*.safetensors"))
                     if not c.name.endswith(".encoder.safetensors") and not c.name.startswith("resume")
                     and c.stem not in skip and c.with_suffix(".json").is_file()
                     and _sidecar_kind(c) in ("scratch", "finetune", "linprobe")]
            if not found:
                raise MrplabError(f"{p} holds no classifier checkpoints", "give a `mrplab vision` run folder or .safetensors files")
            out += found
        else:
            out.append(p)
    return out
