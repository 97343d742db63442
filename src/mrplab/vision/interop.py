"""timm in both directions: mrplab encoders exported as timm-native folders, timm models explained by evidence.

Export (``mrplab vision export``): a ViT checkpoint of a run becomes the folder timm's hub format describes,
written by timm itself (``timm.models.save_for_hf``): ``model.safetensors`` with timm's own key names and
``config.json`` with the architecture (a registered timm ViT plus the ``model_args`` that give mrplab's
sizes: no class token, average pooling) and the preprocessing (input size, the training images' channel
mean and std). ``timm.create_model("local-dir:OUT")`` rebuilds it with strict key matching.
ResNets are exported when trained with ``model.stem: timm`` (architecture resnet18 plus the stage sizes):
the default small-image stem (3x3 stride-1 convolution, no max-pool) is not a configuration timm's ResNet
has, so timm could not rebuild that network.

Import: ``--init local-dir:DIR`` fine-tunes or probes the ViT or ResNet of such a folder (its ``model_args``
must be the configured model's); ``local-dir:DIR`` (a timm hub folder) or ``timm:NAME=FILE`` (a registered timm model plus a local
weights file, safetensors or a timm checkpoint: the published SL, MAE and data2vec checkpoints) become
classifiers ``mrplab evidence`` explains beside mrplab's own; each sees the images normalised its own way.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from mrplab.errors import MrplabError
from mrplab.io import read_json
from mrplab.vision.checkpoints import Classifier, read_safetensors
from mrplab.vision.config import VisionConfig, VisionDataConfig
from mrplab.vision.models import RESNET_SIZES, VIT_SIZES, timm_family

ARCHITECTURE = "vit_tiny_patch16_224"  # a registered timm ViT; model_args give every size mrplab changes
RESNET_ARCHITECTURE = "resnet18"  # a registered timm BasicBlock ResNet; model_args give the stage sizes
TIMM_PREFIXES = ("local-dir:", "timm:")


# --------------------------------------------------------------------------- export


def timm_args(cfg: VisionConfig, num_classes: int) -> tuple[str, dict]:
    """(registered timm architecture, its arguments) that build mrplab's encoder of ``cfg`` (models.py)."""
    name = cfg.model.name
    if cfg.model.timm is not None:  # the architecture is timm's own: only the sizes mrplab changed
        family = timm_family(cfg.model.timm)
        return cfg.model.timm, ({"img_size": cfg.data.image_size} if family == "vit" else {}) | {"num_classes": num_classes}
    if name in VIT_SIZES:
        dim, depth, heads, mlp = VIT_SIZES[name]
        return ARCHITECTURE, {"img_size": cfg.data.image_size, "patch_size": cfg.model.patch_size, "embed_dim": dim,
                              "depth": depth, "num_heads": heads, "mlp_ratio": mlp, "class_token": False,
                              "global_pool": "avg", "fc_norm": False, "num_classes": num_classes}
    if cfg.model.stem != "timm":
        raise MrplabError(
            f"{name} with the small-image stem cannot be exported to timm: timm's ResNet has no 3x3 stride-1 stem "
            "without max-pool", "train the ResNet with --set model.stem=timm (timm's 7x7 stride-2 stem), or export "
            "a ViT run")
    layers, channels = RESNET_SIZES[name]
    return RESNET_ARCHITECTURE, {"layers": list(layers), "channels": list(channels), "num_classes": num_classes}


def _is_vit(cfg: VisionConfig) -> bool:
    return timm_family(cfg.model.timm) == "vit" if cfg.model.timm is not None else cfg.model.name in VIT_SIZES


def _prefix(cfg: VisionConfig) -> str:
    """The key prefix of the timm model inside mrplab's encoder (models.ViTEncoder.vit, CNNEncoder.net)."""
    return "vit." if _is_vit(cfg) else "net."


def _head(cfg: VisionConfig) -> str:
    return "head." if _is_vit(cfg) else "fc."


def _exportable(path: Path) -> list[tuple[Path, str]]:
    """(checkpoint, name) pairs: a file as given, or a run folder's classifiers and pretrained encoders."""
    if path.is_file():
        return [(path, path.name.removesuffix(".safetensors"))]
    if not path.is_dir():
        raise MrplabError(f"{path} does not exist", "give a `mrplab vision` run folder or a .safetensors checkpoint")
    out = []
    for sidecar in sorted((path / "checkpoints").glob("*.json")):
        if sidecar.name.startswith("resume"):
            continue
        info = read_json(sidecar, "checkpoint sidecar", "restore it from the run that wrote it")
        if info.get("kind") == "pretrain" and info.get("encoder"):
            out.append((sidecar.parent / info["encoder"], f"{sidecar.stem}.encoder"))
        elif info.get("kind") in ("scratch", "finetune", "linprobe"):
            out.append((sidecar.with_suffix(".safetensors"), sidecar.stem))
    if not out:
        raise MrplabError(f"{path} holds no checkpoints to export", "give a `mrplab vision` run folder")
    return out


def _sidecar_of(ckpt: Path) -> dict:
    name = ckpt.name.removesuffix(".safetensors").removesuffix(".encoder")
    sidecar = ckpt.with_name(f"{name}.json")
    if not sidecar.is_file():
        raise MrplabError(f"{ckpt} has no sidecar {sidecar.name}", "give a checkpoint written by `mrplab vision`")
    info = read_json(sidecar, "checkpoint sidecar", "restore it from the run that wrote it")
    if not isinstance(info, dict) or "config" not in info:
        raise MrplabError(f"{sidecar} is not a vision checkpoint sidecar", "give a checkpoint written by `mrplab vision`")
    return info


def _encoder_state(ckpt: Path, kind: str, cfg: VisionConfig) -> dict[str, torch.Tensor]:
    state = read_safetensors(ckpt, "checkpoint")
    if kind == "linprobe":  # LinearProbe wraps the encoder
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    prefix = _prefix(cfg)
    if not state or not all(k.startswith(prefix) for k in state):
        raise MrplabError(f"{ckpt} is not a {cfg.model.name} encoder checkpoint (its keys do not start with "
                          f"{prefix})", "give a checkpoint of the run whose sidecar lies beside it")
    return {k[len(prefix):]: v for k, v in state.items()}


def export_one(ckpt: Path, info: dict, cfg: VisionConfig, stats: tuple[torch.Tensor, torch.Tensor],
               out: Path) -> Path:
    """One checkpoint (its sidecar ``info`` and config, the training images' channel ``stats``) as a timm hub
    folder ``out`` (built beside it, renamed when complete)."""
    import timm
    from timm.models import save_for_hf

    state = _encoder_state(ckpt, info.get("kind", ""), cfg)
    head = _head(cfg)
    pretrained = info.get("kind") == "pretrain"  # its head was never trained: exported without one
    num_classes = int(state[f"{head}weight"].shape[0]) if f"{head}weight" in state and not pretrained else 0
    if num_classes == 0:
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    architecture, args = timm_args(cfg, num_classes)
    model = timm.create_model(architecture, pretrained=False, **args)
    model.load_state_dict(state, strict=True)
    mean, std = stats
    S = cfg.data.image_size
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        save_for_hf(model, str(partial), model_args=args, safe_serialization=True,
                    data_config={"input_size": (3, S, S), "mean": tuple(mean.tolist()), "std": tuple(std.tolist()),
                                 "crop_pct": 1.0, "interpolation": "bicubic"})
        if out.exists():
            raise MrplabError(f"{out} already exists", "choose a new output folder")
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def export(src: Path, out_dir: Path) -> list[Path]:
    """A checkpoint -> ``out_dir``; a run folder -> ``out_dir/<stage>`` for each classifier and encoder."""
    from mrplab.config import config_hash
    from mrplab.vision.data import channel_stats, load_split

    items = _exportable(Path(src))
    infos = [_sidecar_of(ckpt) for ckpt, _ in items]  # every checkpoint checked before anything is written
    cfgs = [VisionConfig.model_validate(info["config"]) for info in infos]
    for cfg in cfgs:
        timm_args(cfg, 0)
    out_dir = Path(out_dir)
    single = len(items) == 1 and Path(src).is_file()
    targets = [out_dir] if single else [out_dir / name for _, name in items]
    for t in targets:
        if t.exists():
            raise MrplabError(f"{t} already exists", "choose a new output folder")
    (out_dir.parent if single else out_dir).mkdir(parents=True, exist_ok=True)
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the training images' statistics, once per data set
    for cfg in cfgs:
        key = config_hash(cfg.data)
        if key not in stats:
            stats[key] = channel_stats(load_split(cfg.data, "train").images)
    return [export_one(ckpt, info, cfg, stats[config_hash(cfg.data)], t)
            for (ckpt, _), info, cfg, t in zip(items, infos, cfgs, targets)]


# --------------------------------------------------------------------------- import


def timm_encoder_state(spec: str, cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """The weights of ``spec`` as mrplab encoder weights (without a head), for ``--init``: ``local-dir:DIR`` must
    hold the network ``cfg`` describes (an export of such a run, or any timm model with the same arguments);
    ``timm:NAME=FILE`` is a weights file of the architecture ``model.timm`` (``config_for_init`` sets it)."""
    if spec.startswith("timm:"):
        return _file_encoder_state(spec, cfg)
    folder = Path(spec[len("local-dir:"):])
    conf = read_json(folder / "config.json", "timm config", "give a folder written by `mrplab vision export`")
    args = conf.get("model_args", {}) if isinstance(conf, dict) else {}
    architecture, want = timm_args(cfg, 0)
    if isinstance(conf, dict) and conf.get("architecture") != architecture:
        raise MrplabError(f"{folder} holds a timm {conf.get('architecture')}, not the configured {cfg.model.name} "
                          f"({architecture})", "fine-tune with the model section the folder was exported with")

    def same(a: object, b: object) -> bool:  # timm records sizes as [h, w] pairs
        pair = lambda v: list(v) if isinstance(v, (list, tuple)) else [v, v] if isinstance(v, int) else v  # noqa: E731
        return pair(a) == pair(b) if {type(a), type(b)} & {list, tuple} else a == b

    diff = {k: [args.get(k), v] for k, v in want.items() if k != "num_classes" and not same(args.get(k), v)}
    if diff:
        raise MrplabError(f"{folder} is not the configured {cfg.model.name} (its model_args differ: {diff})",
                          "fine-tune with the model section and data.image_size the folder was exported with")
    state = read_safetensors(folder / "model.safetensors", "timm weights")
    return {f"{_prefix(cfg)}{k}": v for k, v in state.items()}


def parse_file_spec(spec: str) -> tuple[str, Path]:
    """``timm:NAME=FILE`` -> (NAME, FILE), the file existing; one error line otherwise."""
    name, sep, file = spec[len("timm:"):].partition("=")
    if not sep or not name or not Path(file).is_file():
        raise MrplabError(f"{spec} is not timm:NAME=FILE with an existing file",
                          "e.g. timm:vit_base_patch16_224=/models/mae_pretrain_vit_base.pth")
    return name, Path(file)


def config_for_init(cfg: VisionConfig, init: str) -> VisionConfig:
    """The config a ``--init timm:NAME=FILE`` run computes with: ``model.timm`` set to NAME (recorded in the run
    folder's config.yaml), or refused when the config names another architecture."""
    if not init.startswith("timm:"):
        return cfg
    name, _ = parse_file_spec(init)
    if cfg.model.timm not in (None, name):
        raise MrplabError(f"--init {init} is a {name}, but model.timm is {cfg.model.timm}",
                          f"drop model.timm or set it to {name}")
    return VisionConfig.model_validate({**cfg.model_dump(mode="json"),
                                        "model": {**cfg.model.model_dump(mode="json"), "timm": name}})


def _file_encoder_state(spec: str, cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """A local weights file of a registered timm architecture (safetensors, or a torch checkpoint holding
    ``model`` / ``state_dict``) through timm's own reading and key conversion (a ViT's positions resampled to
    data.image_size); every non-classifier weight of the model must come from the file."""
    import timm
    from timm.models import load_state_dict

    name, file = parse_file_spec(spec)
    family = timm_family(name)
    with torch.device("meta"):  # shapes for timm's key conversion; the file's tensors are assigned, nothing initialised
        model = timm.create_model(name, pretrained=False, num_classes=0,
                                  **({"img_size": cfg.data.image_size} if family == "vit" else {}))
    try:
        state = load_state_dict(str(file), use_ema=False, weights_only=True)
        if family == "vit":
            from timm.models.vision_transformer import checkpoint_filter_fn

            state = checkpoint_filter_fn(state, model)
    except Exception as err:  # noqa: BLE001 - any unreadable weights file is the user's file problem
        raise MrplabError(f"cannot read weights {file} as {name} ({type(err).__name__}: {' '.join(str(err).split())[:120]})",
                          "give a safetensors file or a timm / torch checkpoint of that architecture") from None
    classifier = ("head.", "fc.", "head_dist.")
    state = {k: v for k, v in state.items() if not k.startswith(classifier)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:
        raise MrplabError(f"{file} does not fit timm's {name} at {cfg.data.image_size} px: "
                          f"{' '.join(str(err).split())[:160]}", "give that architecture's weights") from None
    if missing or unexpected:
        raise MrplabError(f"{file} is not timm's {name}: {len(missing)} of its weights missing "
                          f"({', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected ({', '.join(unexpected[:3]) or '-'})",
                          "give the weights of that architecture (or the architecture of those weights)")
    return {f"{_prefix(cfg)}{k}": v for k, v in model.state_dict().items()}


def is_timm_spec(text: str) -> bool:
    return text.startswith(TIMM_PREFIXES)


class TimmClassifier(nn.Module):
    """A plain timm model behind the contract evidence uses (kind, grid, head, the CAM layer through ``vit`` or
    ``net``); it re-normalises the data-normalised input to the model's own mean and std."""

    def __init__(self, model: nn.Module):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.model = model
        if isinstance(model, VisionTransformer):
            self.kind, self.vit = "vit", model
            self.grid = tuple(model.patch_embed.grid_size)
        elif hasattr(model, "layer4"):
            self.kind, self.net = "cnn", model
            self.grid = (1, 1)
        else:
            raise MrplabError(f"evidence explains timm ViTs and ResNets, not {type(model).__name__}",
                              "give a VisionTransformer or ResNet model")
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.register_buffer("own_mean", torch.tensor(cfg.get("mean", (0.0, 0.0, 0.0))).view(1, 3, 1, 1))
        self.register_buffer("own_std", torch.tensor(cfg.get("std", (1.0, 1.0, 1.0))).view(1, 3, 1, 1))
        self.register_buffer("data_mean", torch.zeros(1, 3, 1, 1))
        self.register_buffer("data_std", torch.ones(1, 3, 1, 1))

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The channel mean and std the input was normalised with (the data's)."""
        self.data_mean.copy_(mean.view(1, 3, 1, 1))
        self.data_std.copy_(std.view(1, 3, 1, 1))

    @property
    def head(self) -> nn.Module:
        return self.model.get_classifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = x * self.data_std + self.data_mean  # [B, 3, H, W] in [0, 1]
        return self.model((raw - self.own_mean) / self.own_std)


def _num_classes_in(file: Path, classifier: str) -> int | None:
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(file), weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable weights file is the user's file problem
        raise MrplabError(f"cannot read weights {file} ({type(err).__name__})",
                          "give a safetensors file or a timm / torch checkpoint") from None
    w = state.get(f"{classifier}.weight")
    return int(w.shape[0]) if w is not None and w.ndim == 2 else None


def load_timm(spec: str, data: VisionDataConfig | None) -> Classifier:
    """``local-dir:DIR`` or ``timm:NAME=FILE`` as an evidence classifier, weights loaded with strict key matching."""
    import timm
    from timm.models import get_pretrained_cfg_value

    if data is None:
        raise MrplabError(f"{spec} brings no data set of its own", "give --data ROOT (an ImageFolder the model classifies)")
    try:
        if spec.startswith("local-dir:"):
            folder = Path(spec[len("local-dir:"):])
            if not (folder / "config.json").is_file():
                raise MrplabError(f"{folder} has no config.json", "give a folder written by `mrplab vision export` "
                                  "or timm's save_for_hf")
            name = json.loads((folder / "config.json").read_text()).get("architecture", "timm")
            model = timm.create_model(spec, pretrained=True)
        else:
            name, file = parse_file_spec(spec)
            if not timm.is_model(name):
                raise MrplabError(f"timm has no model {name}", "see timm.list_models()")
            classifier = get_pretrained_cfg_value(name, "classifier") or "head"  # read, not a model built
            k = _num_classes_in(Path(file), classifier if isinstance(classifier, str) else classifier[0])
            # the overlay's num_classes says the file's head fits; otherwise timm would drop it and load non-strictly
            model = timm.create_model(name, pretrained=True, num_classes=k or 1000,
                                      pretrained_cfg_overlay={"file": str(file), "num_classes": k or 1000})
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        raise MrplabError(f"timm cannot load {spec}: {' '.join(str(err).split())[:200]}",
                          "check the model name and that the weights are that model's") from None
    model.eval()
    pcfg = model.pretrained_cfg
    size = int(pcfg["input_size"][-1]) if pcfg.get("fixed_input_size") and pcfg.get("input_size") else data.image_size
    cfg = VisionConfig(data=data.model_copy(update={"image_size": size}))
    return Classifier(Path(spec), f"timm {name}", 0, cfg, TimmClassifier(model))
