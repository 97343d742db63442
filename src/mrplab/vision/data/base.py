"""The vision data config and ``ImageSet``, one whole split in memory; shared by both sources."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Annotated, Callable, Literal

import torch
from pydantic import AfterValidator, Field, model_validator

from mrplab.config import Strict
from mrplab.errors import MrplabError

Split = Literal["train", "test"]
ProgressFn = Callable[[int, int], None]  # (images done, images in all)

MIN_IMAGE_SIZE = 8
MIN_MOTIF = 4  # smallest motif side in pixels that still shows its shape
MAX_DISTRACTORS = 2


def grid(image_size: int, L: int) -> tuple[int, int, int]:
    """(cells per side, cell side, margin): a grid with at least L + MAX_DISTRACTORS cells, centred."""
    per_side = math.ceil(math.sqrt(L + MAX_DISTRACTORS))
    cell = image_size // per_side
    return per_side, cell, (image_size - per_side * cell) // 2


_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")


def expand_root(text: str) -> str:
    """``data.root`` with environment variables filled in: ``$VAR``, ``${VAR}`` and ``${VAR:-default}`` (the
    shell's forms), so a shipped preset names a variable and an example default, never one machine's path."""
    def fill(m: re.Match) -> str:
        name, default = m.group(1) or m.group(3), m.group(2)
        value = os.environ.get(name)
        if value:
            return value
        if default is not None:
            return default
        raise MrplabError(f"data.root {text} names ${name}, which is not set",
                          f"export {name}=/path/to/the/data, or give data.root as a path")
    return _VAR.sub(fill, text)


def _filled(text: str | None) -> str | None:
    """A root as the run sees it, variables filled in when the config is read, so the config a run folder keeps,
    its hash, a sweep row's key and a cached pretraining's key name the folder actually used (a changed
    $MRPLAB_CIFAR10 is another key; a preset that spells the same folder through a variable is the same key).
    An unset variable without a default stays as written: it is an error only where the root is read."""
    if text is None:
        return None
    try:
        return expand_root(text)
    except MrplabError:
        return text


Root = Annotated[str | None, AfterValidator(_filled)]
"""An ImageFolder root setting: environment variables filled in at validation (``expand_root``)."""


class VisionDataConfig(Strict):
    """Where the vision track's images come from (vision/data/)."""

    source: Literal["embedded", "folder"] = Field(
        "embedded", description="embedded: generated multi-view motif images; folder: an ImageFolder tree at root"
    )
    root: Root = Field(None, description="folder source: ImageFolder root holding train/ and test/; $VAR, ${VAR:-default} filled from the environment")
    image_size: int = Field(
        32, ge=MIN_IMAGE_SIZE, description="side of the square images; folder images are fitted to it if they differ"
    )
    num_classes: int = Field(4, ge=2, description="embedded: number of classes")
    motifs_per_class: int = Field(2, ge=2, description="embedded: discriminative motifs (views) per class, L")
    n_train: int = Field(2000, ge=1, description="embedded: training images")
    n_test: int = Field(1000, ge=1, description="embedded: test images")
    single_view_train: float = Field(0.0, ge=0.0, le=1.0, description="embedded: single-view fraction of train")
    single_view_test: float = Field(0.5, ge=0.0, le=1.0, description="embedded: single-view fraction of test")
    distractor_strength: float = Field(
        0.3, ge=0.0, le=1.0, description="embedded: opacity of the other classes' motifs drawn as distractors"
    )
    bank_seed: int = Field(0, description="embedded: seeds the motif bank and each split's images")
    cache_dir: str | None = Field(
        None, description="folder: where decoded splits are cached; null = $XDG_CACHE_HOME/mrplab or ~/.cache/mrplab"
    )

    @model_validator(mode="after")
    def _motifs_fit(self) -> "VisionDataConfig":
        if self.source == "embedded":
            layout = grid(self.image_size, self.motifs_per_class)
            if layout[1] < MIN_MOTIF:
                raise ValueError(
                    f"{self.motifs_per_class} motifs per class do not fit in {self.image_size}-px images "
                    f"(each needs a {MIN_MOTIF}-px cell); raise image_size or lower motifs_per_class"
                )
        return self


@dataclass
class ImageSet:
    """One whole split in memory."""

    images: torch.Tensor  # [N, 3, H, W] uint8
    labels: torch.Tensor  # [N] int64
    classes: list[str]
    skipped: int = 0  # unreadable files skipped (folder source)
    view: torch.Tensor | None = None  # [N] int64: 0 = multi-view, 1 = single-view (embedded)
    motif_boxes: torch.Tensor | None = None  # [N, L, 4] int64 (x0, y0, x1, y1), end exclusive; -1 where absent
    motif_present: torch.Tensor | None = None  # [N, L] bool: own motif l is drawn (embedded)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


