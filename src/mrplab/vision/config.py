"""Typed config of a vision run (``mrplab vision ...``); defaults live here and only here.

The defaults are the embedded comparison that ``mrplab vision compare`` runs without a config
(configs/vision/embedded-compare.yaml lists them). YAML files and ``--set a.b=c`` overrides are
validated against ``VisionConfig``: unknown keys and out-of-range values fail with the key's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from mrplab import config as config_mod
from mrplab.config import Seeds, Strict, config_hash
from mrplab.errors import MrplabError
from mrplab.vision.data import MIN_IMAGE_SIZE, VisionDataConfig
from mrplab.vision.data.base import Root
from mrplab.vision.models import ENCODER_NAMES

Method = Literal["mae", "data2vec"]
ModelName = Literal[ENCODER_NAMES]  # type: ignore[valid-type]


class DataConfig(VisionDataConfig):
    """Where the images come from (vision/data/), with the defaults of the embedded comparison."""

    image_size: int = Field(24, ge=MIN_IMAGE_SIZE, description="side of the square images; 24 px: a motif spans several 4-px "
                            "patches; folder images are fitted to it if they differ")
    n_train: int = Field(1000, ge=1, description="embedded: training images (the pool the labelled set is drawn "
                         "from; with pretrain.data.source train also the pretraining data)")


class ModelConfig(Strict):
    """The encoder (vision/models.py) and the pretraining decoder."""

    name: ModelName = Field("vit_micro", description="vit_tiny, vit_micro, resnet18 or resnet_small")
    patch_size: int = Field(4, ge=1, description="mask (and ViT token) patch side in pixels; divides data.image_size")
    decoder_dim: int = Field(64, ge=8, description="width of the light pretraining decoder")
    decoder_depth: int = Field(1, ge=1, description="ViT decoder blocks (the CNN decoder is three convs)")
    timm: str | None = Field(
        None, json_schema_extra=config_mod.since(None),
        description="a registered timm VisionTransformer or ResNet architecture used instead of name (e.g. "
        "vit_base_patch16_224: its class token, pooling and patch size; with --init timm:NAME=FILE the weights of "
        "a published checkpoint); null = name")
    stem: Literal["small", "timm"] = Field(
        "small", json_schema_extra=config_mod.since("small"),
        description="ResNets: small = 3x3 stride-1 conv, no max-pool (small images keep their resolution); timm = "
        "timm's 7x7 stride-2 conv + max-pool (ImageNet-size images; `mrplab vision export` writes it for timm)")

    @model_validator(mode="after")
    def _known_timm(self) -> "ModelConfig":
        if self.timm is not None:
            from mrplab.vision.models import timm_family

            try:
                timm_family(self.timm)
            except MrplabError as err:
                raise ValueError(str(err)) from None
        return self


class PretrainDataConfig(Strict):
    """The unlabelled images pretraining sees, apart from the labelled downstream set (vision/splits.py)."""

    source: Literal["auto", "train", "embedded", "folder"] = Field(
        "auto", description="train: data's training images with their labels dropped; embedded: an own set of "
        "embedded motif images (own random stream, never a test image); folder: the train/ images of an "
        "ImageFolder root (labels ignored); auto: embedded for embedded data, train otherwise"
    )
    n_images: int | None = Field(None, ge=1, description="images to pretrain on; null = all of the source "
                                 "(embedded: 10 x data.n_train)")
    coverage: float = Field(1.0, gt=0.0, le=1.0, description="embedded: share of each downstream class's motifs that "
                            "pretraining shows (the first round(coverage x L) of each class)")
    extra_classes: int = Field(0, ge=0, description="embedded: classes that exist only in pretraining (own motifs)")
    single_view: float = Field(0.0, ge=0.0, le=1.0, description="embedded: single-view fraction of the pretraining "
                               "images")
    root: Root = Field(None, description="folder: ImageFolder root whose train/ is used; null = data.root")


class PretrainConfig(Strict):
    """Mask-reconstruction pretraining on unlabelled images (vision/objectives.py)."""

    data: PretrainDataConfig = Field(default_factory=PretrainDataConfig)
    method: Method = Field("mae", description="mae: pixels of the masked patches; data2vec: EMA-teacher features")
    epochs: int = Field(20, ge=1)
    batch: int = Field(128, ge=1, description="global batch (split across processes under torchrun)")
    lr: float = Field(2e-3, gt=0.0, description="peak AdamW lr")
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_epochs: float = Field(2.0, ge=0.0, description="linear warmup, then cosine decay to 0")
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0, description="fraction of patches masked, exactly per image")
    norm_pix: bool = Field(True, description="mae: each target patch normalised to zero mean, unit variance")
    momentum: float = Field(0.99, ge=0.0, le=1.0, description="data2vec: EMA momentum of the teacher at the start")
    momentum_end: float = Field(0.999, ge=0.0, le=1.0, description="data2vec: EMA momentum at the end (linear)")
    top_k: int = Field(2, ge=1, description="data2vec (ViT): teacher blocks averaged into the target")
    min_target_var: float = Field(0.01, ge=0.0, description="data2vec: target variance below this counts as collapse")
    collapse_patience: int = Field(3, ge=1, description="data2vec: consecutive collapsed logs that stop the run")


class FinetuneConfig(Strict):
    """Supervised training of the whole network: fine-tuning, and SL from scratch with the same recipe."""

    epochs: int = Field(10, ge=1, description="fine-tuning epochs; SL from scratch gets pretrain.epochs + this")
    batch: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0.0, description="peak AdamW lr (the head's; lower layers get layer_decay powers)")
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_epochs: float = Field(2.0, ge=0.0)
    layer_decay: float = Field(0.9, gt=0.0, le=1.0, description="fine-tuning: lr x decay^(layers above); 1 = off")
    epochs_menu: list[int] | None = Field(
        [25, 50, 100, 200, 400], min_length=1, description="SL from scratch and fine-tuning each train once per entry (epochs) and keep "
        "the one with the best validation accuracy (needs labels.val_fraction > 0); null = epochs as above"
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class LabelsConfig(Strict):
    """The labelled downstream set: a class-balanced subset of data's training images, and the validation
    images carved from it (vision/splits.py). Neither size set: every training image is labelled."""

    per_class: int | None = Field(25, ge=1, description="labelled images per class (few labels: where pretraining "
                                  "on many unlabelled images should pay); null with fraction null = all")
    fraction: float | None = Field(None, description="share of each class's training images that is labelled, "
                                   "0 < fraction <= 1")
    seed: int | None = Field(None, description="draws the subset; null = each run's own seed")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="share of each class's labelled images held out "
                                "for validation (at least one per class when > 0); they are not trained on")

    @model_validator(mode="after")
    def _one_size(self) -> "LabelsConfig":
        if self.per_class is not None and self.fraction is not None:
            if "per_class" in self.model_fields_set:
                raise ValueError("give labels.per_class or labels.fraction, not both (set the other to null)")
            object.__setattr__(self, "per_class", None)  # a fraction replaces the default per_class
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"labels.fraction must be in (0, 1] (got {self.fraction})")
        return self


class LinprobeConfig(Strict):
    """A linear classifier on the frozen pretrained encoder."""

    epochs: int = Field(10, ge=1)
    batch: int = Field(256, ge=1)
    lr: float = Field(1e-2, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_epochs: float = Field(0.0, ge=0.0)


class VisionConfig(Strict):
    name: str = Field("vision", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="run folder prefix: runs/<name>-<command>-<YYYYmmdd-HHMMSS>/")
    seeds: Seeds = Field(default_factory=lambda: [0, 1], description="independent runs")
    methods: list[Method] | None = Field(
        None, min_length=1, description="compare: pretraining methods to fine-tune, e.g. [mae, data2vec]; "
        "null = [pretrain.method]"
    )
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="cpu, cuda or auto")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16: torch.autocast on CPU and CUDA; auto = bf16 only where the device has native "
        "bf16 and a probe at the model's matmul shapes measures it faster (mrplab/runtime.py)")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; null = this process's share of "
                                "the available cores among running mrplab processes")
    grad_clip: float | None = Field(1.0, gt=0.0, description="clip the gradient norm to this; null = off")
    log_every: int = Field(20, ge=1, description="log a metrics record every this many steps")
    checkpoint_every: int = Field(200, ge=0, description="resumable checkpoint every this many steps; 0 = off")
    tensorboard: bool = Field(False, description="also write TensorBoard scalars (needs the tensorboard package)")
    pretrain_cache: str | None = Field(
        None, description="folder of pretrained models shared between runs, keyed by the hash of what pretraining "
        "depends on: a pretrain stage found there is loaded, not trained again; null = every run pretrains. "
        "Not part of the config hash (it does not change a result)"
    )
    data: DataConfig = Field(default_factory=DataConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    linprobe: LinprobeConfig = Field(default_factory=LinprobeConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "VisionConfig":
        if self.data.image_size % self.model.patch_size:
            raise ValueError(
                f"image size {self.data.image_size} is not divisible by patch size {self.model.patch_size}; "
                "choose model.patch_size that divides data.image_size"
            )
        if self.methods is not None and len(set(self.methods)) != len(self.methods):
            raise ValueError("methods must be distinct")
        menu = self.finetune.epochs_menu
        if menu is not None:
            if any(e < 1 for e in menu) or len(set(menu)) != len(menu):
                raise ValueError(f"finetune.epochs_menu must hold distinct positive epochs (got {menu})")
            if self.labels.val_fraction <= 0:
                raise ValueError("finetune.epochs_menu chooses on validation images: set labels.val_fraction > 0")
        pd = self.pretrain.data
        source = pd.source if pd.source != "auto" else "embedded" if self.data.source == "embedded" else "train"
        if pd.source == "embedded" and self.data.source != "embedded":
            raise ValueError("pretrain.data.source embedded needs data.source embedded (the same motif bank)")
        if pd.source == "folder" and not (pd.root or self.data.root):
            raise ValueError("pretrain.data.source folder needs pretrain.data.root (or data.root)")
        if source == "embedded" and round(pd.coverage * self.data.motifs_per_class) < 1:
            raise ValueError(f"pretrain.data.coverage {pd.coverage} leaves every class with no motif in pretraining "
                             f"(round({pd.coverage} x {self.data.motifs_per_class} motifs) = 0); raise it")
        return self

    @property
    def compare_methods(self) -> list[str]:
        return list(self.methods) if self.methods is not None else [self.pretrain.method]

    @property
    def scratch_epochs(self) -> int:
        """SL from scratch trains as many epochs as pretraining and fine-tuning together."""
        return self.pretrain.epochs + self.finetune.epochs

    def hash(self) -> str:
        return config_hash(self, drop=("pretrain_cache",))


DEFAULT_PRESET = "configs/vision/embedded-compare.yaml"


def validate(raw: dict) -> VisionConfig:
    try:
        return VisionConfig.model_validate(raw)
    except ValidationError as err:
        raise MrplabError(config_mod._format_validation(err), f"see {DEFAULT_PRESET} for the keys and ranges") from None


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> VisionConfig:
    raw = config_mod.read_yaml(config_mod.resolve_config(path, "vision")) if path is not None else {}
    return validate(config_mod.apply_overrides(raw, overrides or []))
