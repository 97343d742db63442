"""Image data sets for the vision track: an embedded multi-view generator and ImageFolder trees.

The package: ``base`` (the config and ``ImageSet``), ``embedded`` (the motif images), ``folder``
(ImageFolder trees and their cache), ``transforms`` (batch augmentation and normalisation).

Two sources give the same ``ImageSet`` (a whole split in memory as uint8):

* ``embedded``: the image analogue of the theory's multi-view data model.
  Class i owns L motifs v_{i,1..L} (a shape with its own colour: filled
  square, ring, cross, stripes, checker, triangle, dot grid, ...). A
  multi-view image shows all L motifs of its class, a single-view image
  exactly one (uniform over L). The image is split into a grid of at least
  L + 2 cells; each motif sits at a random size and offset inside its own
  cell, so the own motifs never overlap. Zero to two motifs of other classes
  are blended in at ``distractor_strength`` in free cells, on a cluttered
  background (smooth random colour noise and faint random strokes). Every
  motif alone identifies the class; the mean colour does not (hues are
  shuffled across classes, colours and brightness jitter per image, the
  background is tinted). Boxes and presence flags of the own motifs are
  recorded. Everything follows from ``bank_seed``: the motif bank from one
  stream, each split's images from its own stream.
* ``folder``: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` in
  torchvision's ImageFolder layout. Every image is decoded once with PIL
  (several threads), fitted to ``image_size`` (shorter side resized, centre
  crop) when its size differs, and the decoded split is cached as a
  safetensors file under ``cache_dir``, keyed by the absolute root, split,
  image size and every file's relative path, size and mtime. Unreadable files
  are skipped with one warning line each on stderr and counted.

``augment`` (random crop with 4-px reflect padding + horizontal flip) and
``normalize`` work on whole batches with tensor ops; ``channel_stats`` gives
the per-channel mean and std for ``normalize``.
"""

from __future__ import annotations

import math
from pathlib import Path

from mrplab.errors import MrplabError
from mrplab.io import save_figure
from mrplab.vision.data.base import (
    MIN_IMAGE_SIZE,
    MIN_MOTIF,
    ImageSet,
    ProgressFn,
    Split,
    VisionDataConfig,
)
from mrplab.vision.data.embedded import SHAPE_NAMES, MotifBank, embedded_split, motif_bank
from mrplab.vision.data.folder import cache_path, decode_files, default_cache_dir, folder_split
from mrplab.vision.data.transforms import augment, channel_stats, normalize

__all__ = ["MIN_IMAGE_SIZE", "MIN_MOTIF", "SHAPE_NAMES", "ImageSet", "MotifBank", "ProgressFn", "Split",
           "VisionDataConfig", "augment", "cache_path", "channel_stats", "decode_files", "default_cache_dir",
           "load_split", "motif_bank", "normalize", "save_examples"]

def load_split(cfg: VisionDataConfig, split: Split, progress: ProgressFn | None = None) -> ImageSet:
    """The ``train`` or ``test`` split of the configured source.

    ``progress(done, total)`` is called while a folder split is decoded; without it,
    decoding many images prints its own progress on stderr.
    """
    if split not in ("train", "test"):
        raise MrplabError(f"unknown split {split!r}", "use 'train' or 'test'")
    if cfg.image_size < MIN_IMAGE_SIZE:
        raise MrplabError(
            f"image_size {cfg.image_size} is too small", f"use image_size >= {MIN_IMAGE_SIZE} (32 for CIFAR-10)"
        )
    if cfg.source == "embedded":
        return embedded_split(cfg, split)
    return folder_split(cfg, split, progress)



def save_examples(imageset: ImageSet, path: str | Path, n: int = 16, cols: int = 8) -> Path:
    """A PNG grid of the first ``n`` images, class name on top, own motif boxes outlined (embedded)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n = min(n, len(imageset))
    if n == 0:
        raise MrplabError("the image set is empty", "load a split with at least one image")
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(1.6 * cols, 1.8 * rows))
    for k in range(n):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(imageset.images[k].permute(1, 2, 0).numpy(), interpolation="nearest")
        title = imageset.classes[int(imageset.labels[k])]
        if imageset.view is not None:
            title += " single" if int(imageset.view[k]) else " multi"
        ax.set_title(title, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        if imageset.motif_boxes is not None and imageset.motif_present is not None:
            for l, (x0, y0, x1, y1) in enumerate(imageset.motif_boxes[k].tolist()):
                if bool(imageset.motif_present[k, l]):
                    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=0.8,
                                           edgecolor="white" if l % 2 == 0 else "black"))
    return save_figure(fig, Path(path), 120)
