"""Which images each stage trains on: the unlabelled pretraining set, and per seed the labelled
downstream subset with the validation images carved from it.

The labelled subset is class-balanced: ``labels.per_class`` images of every class, or
``labels.fraction`` of each class's training images, drawn from the run's seed (or ``labels.seed``)
on its own stream; ``labels.val_fraction`` of each class's labelled images are held out for
validation and never trained on. Indices refer to data's training split and are written to the run
folder (``labels/s<seed>.json``). The test split is never used for any choice.

The pretraining set (``pretrain.data``) is data's training split with its labels dropped (``train``),
an own set of embedded motif images (``embedded``: its own random stream, so never a downstream
image; motif coverage and extra classes as configured), or the train/ images of an ImageFolder root
(``folder``: never its test/). ``n_images`` takes a seeded subset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mrplab.errors import MrplabError
from mrplab.rng import generator
from mrplab.vision.config import LabelsConfig, VisionConfig
from mrplab.vision.data import ImageSet, load_split
from mrplab.vision.data.embedded import embedded_pretrain


@dataclass(frozen=True)
class Labelled:
    """One seed's labelled images: indices into the training split."""

    train: torch.Tensor  # [n] int64, sorted
    val: torch.Tensor  # [v] int64, sorted; empty without validation

    def record(self, classes: list[str], labels: torch.Tensor) -> dict:
        count = lambda idx: {c: int((labels[idx] == i).sum()) for i, c in enumerate(classes)}  # noqa: E731
        return {"train": self.train.tolist(), "val": self.val.tolist(), "train_per_class": count(self.train),
                "val_per_class": count(self.val)}


def labelled_subset(pool: ImageSet, cfg: LabelsConfig, seed: int) -> Labelled:
    """The class-balanced labelled subset of ``pool`` for a run with ``seed``, and its validation images."""
    if cfg.per_class is None and cfg.fraction is None and cfg.val_fraction == 0:
        everything = torch.arange(len(pool))
        return Labelled(everything, everything[:0])
    g = generator(cfg.seed if cfg.seed is not None else seed, "vision/labels")
    train, val = [], []
    for c, name in enumerate(pool.classes):
        idx = (pool.labels == c).nonzero().squeeze(1)  # [n_c]
        if cfg.per_class is not None and cfg.per_class > len(idx):
            raise MrplabError(f"labels.per_class = {cfg.per_class} but class {name} has {len(idx)} training images",
                              f"use labels.per_class <= {len(idx)} or more training images")
        k = cfg.per_class if cfg.per_class is not None else (
            len(idx) if cfg.fraction is None else max(1, round(cfg.fraction * len(idx))))
        chosen = idx[torch.randperm(len(idx), generator=g)[:k]]
        v = max(1, round(cfg.val_fraction * k)) if cfg.val_fraction > 0 else 0
        if v >= k:
            raise MrplabError(f"class {name} has {k} labelled images: none is left to train on after "
                              f"holding out {v} for validation", "raise labels.per_class or lower labels.val_fraction")
        val.append(chosen[:v])
        train.append(chosen[v:])
    return Labelled(torch.cat(train).sort().values, torch.cat(val).sort().values)


def subset(data: ImageSet, idx: torch.Tensor) -> ImageSet:
    """The images ``idx`` of ``data`` (ground truth of embedded images included)."""
    pick = lambda t: None if t is None else t[idx]  # noqa: E731
    return ImageSet(data.images[idx], data.labels[idx], data.classes, view=pick(data.view),
                    motif_boxes=pick(data.motif_boxes), motif_present=pick(data.motif_present))


def pretrain_source(cfg: VisionConfig) -> str:
    """pretrain.data.source with auto resolved: embedded for embedded data, train otherwise."""
    src = cfg.pretrain.data.source
    return src if src != "auto" else "embedded" if cfg.data.source == "embedded" else "train"


def pretrain_images(cfg: VisionConfig, pool: ImageSet) -> ImageSet:
    """The unlabelled images pretraining sees (labels, where present, are never used)."""
    pd, data = cfg.pretrain.data, cfg.data
    source = pretrain_source(cfg)
    if source == "embedded":
        return embedded_pretrain(data, pd.n_images or 10 * data.n_train, pd.coverage, pd.extra_classes,
                                 pd.single_view)
    if source == "folder":
        images = load_split(data.model_copy(update={"source": "folder", "root": pd.root or data.root}), "train")
    else:
        images = pool
    if pd.n_images is None or pd.n_images >= len(images):
        if pd.n_images is not None and pd.n_images > len(images):
            raise MrplabError(f"pretrain.data.n_images = {pd.n_images} but the {source} source has "
                              f"{len(images)} images", f"use pretrain.data.n_images <= {len(images)} or null (all)")
        return images
    order = torch.randperm(len(images), generator=generator(data.bank_seed, "vision/pretrain-subset"))
    return subset(images, order[:pd.n_images].sort().values)
