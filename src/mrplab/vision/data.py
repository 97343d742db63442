"""Image data sets for the vision track: an embedded multi-view generator and ImageFolder trees.

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

import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator

from mrplab.config import Strict
from mrplab.errors import MrplabError
from mrplab.io import save_figure
from mrplab.rng import generator

Split = Literal["train", "test"]
ProgressFn = Callable[[int, int], None]  # (images done, images in all)

MIN_IMAGE_SIZE = 8
MIN_MOTIF = 4  # smallest motif side in pixels that still shows its shape
MAX_DISTRACTORS = 2
CACHE_VERSION = 1
PROGRESS_MIN_IMAGES = 5000  # decoding fewer images than this shows no progress by default


class VisionDataConfig(Strict):
    """Where the vision track's images come from (vision/data.py)."""

    source: Literal["embedded", "folder"] = Field(
        "embedded", description="embedded: generated multi-view motif images; folder: an ImageFolder tree at root"
    )
    root: str | None = Field(None, description="folder source: ImageFolder root holding train/ and test/")
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
            layout = _grid(self.image_size, self.motifs_per_class)
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
        return _embedded(cfg, split)
    return _folder(cfg, split, progress)


# --------------------------------------------------------------------------- embedded motif images

# Each shape maps box coordinates u, v in [0, 1) (pixel centres, u across, v down) to "drawn".
_SHAPES: tuple[tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], ...] = (
    ("square", lambda u, v: (u - 0.5).abs().maximum((v - 0.5).abs()) < 0.42),
    ("ring", lambda u, v: ((u - 0.5) ** 2 + (v - 0.5) ** 2 - 0.14).abs() < 0.085),
    ("cross", lambda u, v: ((u - 0.5).abs() < 0.17) | ((v - 0.5).abs() < 0.17)),
    ("stripes", lambda u, v: torch.frac((u + v) * 1.5) < 0.5),
    ("checker", lambda u, v: (torch.floor(u * 3) + torch.floor(v * 3)) % 2 == 0),
    ("triangle", lambda u, v: (u - 0.5).abs() <= 0.5 * v),
    ("dots", lambda u, v: ((torch.frac(u * 2) - 0.5) ** 2 + (torch.frac(v * 2) - 0.5) ** 2) < 0.12),
    ("saltire", lambda u, v: ((u - v).abs() < 0.2) | ((u + v - 1).abs() < 0.2)),
    ("hbars", lambda u, v: torch.frac(v * 2) < 0.5),
    ("vbars", lambda u, v: torch.frac(u * 2) < 0.5),
    ("disc", lambda u, v: ((u - 0.5) ** 2 + (v - 0.5) ** 2) < 0.2),
    ("diamond", lambda u, v: (u - 0.5).abs() + (v - 0.5).abs() < 0.5),
    ("frame", lambda u, v: (u - 0.5).abs().maximum((v - 0.5).abs()) > 0.3),
)
SHAPE_NAMES = tuple(name for name, _ in _SHAPES)


@dataclass
class MotifBank:
    """Motif v_{i,l} of class i: a shape and an RGB colour. Every (shape, hue) pair is distinct."""

    shape: torch.Tensor  # [K, L] int64 index into SHAPE_NAMES
    hue: torch.Tensor  # [K, L] float in [0, 1)
    colour: torch.Tensor  # [K, L, 3] float RGB in [0, 1]

    def describe(self, i: int, l: int) -> str:
        r, g, b = (int(round(255 * c)) for c in self.colour[i, l].tolist())
        return f"{SHAPE_NAMES[int(self.shape[i, l])]} #{r:02x}{g:02x}{b:02x}"


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[...] hue, saturation, value in [0, 1] -> [..., 3] RGB."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h.unsqueeze(-1) * 6) % 6
    return v.unsqueeze(-1) - (v * s).unsqueeze(-1) * (torch.minimum(k, 4 - k).clamp(0, 1))


def motif_bank(cfg: VisionDataConfig) -> MotifBank:
    """The K * L motifs, from ``bank_seed`` only (shared by both splits).

    Hues are evenly spaced and dealt to motifs in a random order, so a class's
    motifs are not of one colour family. Shapes are dealt by hue rank so that
    motifs sharing a shape are as far apart in hue as possible.
    """
    K, L = cfg.num_classes, cfg.motifs_per_class
    n = K * L
    g = generator(cfg.bank_seed, "vision-motif-bank")
    rank = torch.randperm(n, generator=g)  # [n] hue rank of motif j = i * L + l
    offset = torch.rand((), generator=g).item()
    shape_order = torch.randperm(len(_SHAPES), generator=g)
    per_shape = math.ceil(n / len(_SHAPES))  # motifs that share one shape
    n_shapes = math.ceil(n / per_shape)  # shapes used; same-shape motifs are n_shapes hue ranks apart
    shape = shape_order[rank % n_shapes]
    hue = (offset + rank.double() / n) % 1.0
    sat = 0.75 + 0.25 * torch.rand(n, generator=g)
    val = 0.8 + 0.2 * torch.rand(n, generator=g)
    colour = _hsv_to_rgb(hue.float(), sat, val)
    return MotifBank(shape=shape.reshape(K, L), hue=hue.float().reshape(K, L), colour=colour.reshape(K, L, 3))


def _grid(image_size: int, L: int) -> tuple[int, int, int]:
    """(cells per side, cell side, margin): a grid with at least L + MAX_DISTRACTORS cells, centred."""
    per_side = math.ceil(math.sqrt(L + MAX_DISTRACTORS))
    cell = image_size // per_side
    return per_side, cell, (image_size - per_side * cell) // 2


def _motif_size_range(image_size: int, cell: int) -> tuple[int, int]:
    hi = max(MIN_MOTIF, min(cell, round(0.32 * image_size)))
    lo = max(MIN_MOTIF, min(hi, round(0.2 * image_size)))
    return lo, hi


def _segment_distance(px: torch.Tensor, py: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Distance of pixel centres [S] x [S] to segments seg [..., 4] (x0, y0, x1, y1) -> [..., S, S]."""
    x0, y0, x1, y1 = (seg[..., i, None, None] for i in range(4))
    dx, dy = x1 - x0, y1 - y0
    t = (((px[None, :] - x0) * dx + (py[:, None] - y0) * dy) / (dx * dx + dy * dy + 1e-6)).clamp(0, 1)
    return torch.hypot(px[None, :] - (x0 + t * dx), py[:, None] - (y0 + t * dy))


def _embedded(cfg: VisionDataConfig, split: Split) -> ImageSet:
    K, L, S = cfg.num_classes, cfg.motifs_per_class, cfg.image_size
    n = cfg.n_train if split == "train" else cfg.n_test
    frac = cfg.single_view_train if split == "train" else cfg.single_view_test
    per_side, cell, margin = _grid(S, L)
    if cell < MIN_MOTIF:
        raise MrplabError(
            f"{L} motifs per class do not fit in {S}-px images", "raise image_size or lower motifs_per_class"
        )
    lo, hi = _motif_size_range(S, cell)
    bank = motif_bank(cfg)
    g = generator(cfg.bank_seed, f"vision-embedded-{split}")
    slots = L + MAX_DISTRACTORS  # own motifs first, then distractors

    # ---- every random number of the split, drawn up front (rendering is then chunked freely)
    labels = (torch.arange(n) % K)[torch.randperm(n, generator=g)]  # [N] balanced classes
    single = torch.rand(n, generator=g) < frac  # [N]
    chosen = torch.randint(0, L, (n,), generator=g)  # [N] the one motif of a single-view image
    present = torch.where(single[:, None], torch.arange(L)[None, :] == chosen[:, None], True)  # [N, L]
    cells = torch.argsort(torch.rand(n, per_side * per_side, generator=g), dim=1)[:, :slots]  # [N, slots]
    size = torch.randint(lo, hi + 1, (n, slots), generator=g)  # [N, slots]
    jitter = torch.rand(n, slots, 2, generator=g)  # [N, slots, 2]
    bright = 0.8 + 0.35 * torch.rand(n, slots, 1, generator=g)  # [N, slots, 1]
    tint = 0.04 * torch.randn(n, slots, 3, generator=g)  # [N, slots, 3]
    n_distract = torch.bucketize(torch.rand(n, generator=g), torch.tensor([0.3, 0.7]))  # [N] 0, 1 or 2
    d_class = (labels[:, None] + torch.randint(1, K, (n, MAX_DISTRACTORS), generator=g)) % K  # never own class
    d_motif = torch.randint(0, L, (n, MAX_DISTRACTORS), generator=g)
    base = 0.25 + 0.45 * torch.rand(n, 1, generator=g) + 0.06 * torch.randn(n, 3, generator=g)  # [N, 3]
    blobs = 0.08 * torch.randn(n, 3, 4, 4, generator=g)  # [N, 3, 4, 4] smooth colour noise
    fine = 0.04 * torch.randn(n, 1, 8, 8, generator=g)  # [N, 1, 8, 8] finer grey noise
    strokes = torch.rand(n, 3, 4, generator=g) * S  # [N, 3, 4] segments (x0, y0, x1, y1)
    stroke_contrast = 0.15 * (2 * torch.rand(n, 3, generator=g) - 1)  # [N, 3]

    # ---- boxes: slot s of image j sits in cell cells[j, s] at a random offset inside it
    cy, cx = cells // per_side, cells % per_side
    off = torch.floor(jitter * (cell - size + 1)[..., None]).long()  # [N, slots, 2]
    x0 = margin + cx * cell + off[..., 0]
    y0 = margin + cy * cell + off[..., 1]
    boxes = torch.stack([x0, y0, x0 + size, y0 + size], dim=-1)  # [N, slots, 4]
    slot_class = torch.cat([labels[:, None].expand(n, L), d_class], dim=1)  # [N, slots]
    slot_motif = torch.cat([torch.arange(L)[None, :].expand(n, L), d_motif], dim=1)
    slot_on = torch.cat([present, torch.arange(MAX_DISTRACTORS)[None, :] < n_distract[:, None]], dim=1)
    strength = torch.cat([torch.ones(L), torch.full((MAX_DISTRACTORS,), cfg.distractor_strength)])  # [slots]
    slot_colour = (bank.colour[slot_class, slot_motif] * bright + tint).clamp(0, 1)  # [N, slots, 3]
    slot_shape = bank.shape[slot_class, slot_motif]  # [N, slots]

    images = torch.empty(n, 3, S, S, dtype=torch.uint8)
    pix = torch.arange(S, dtype=torch.float32) + 0.5  # pixel centres
    chunk = max(1, 2**22 // (slots * S * S))
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        m = b - a
        # background: tinted grey + smooth colour blobs + finer grey noise + faint strokes
        img = base[a:b, :, None, None].expand(m, 3, S, S).clone()  # [m, 3, S, S]
        img += torch.nn.functional.interpolate(blobs[a:b], size=(S, S), mode="bicubic", align_corners=False)
        img += torch.nn.functional.interpolate(fine[a:b], size=(S, S), mode="bilinear", align_corners=False)
        line = (1.0 - _segment_distance(pix, pix, strokes[a:b])).clamp(0, 1)  # [m, 3, S, S] one map per stroke
        img += (line * stroke_contrast[a:b, :, None, None]).sum(1, keepdim=True)
        img.clamp_(0, 1)
        # motifs: one alpha map per slot (zero where the slot is off), then summed; slots never overlap
        on = slot_on[a:b].reshape(-1)  # [m * slots]
        bx = boxes[a:b].reshape(-1, 4).float()
        shp = slot_shape[a:b].reshape(-1)
        side = bx[:, 2:3] - bx[:, 0:1]  # [m * slots, 1]
        u = (pix[None, :] - bx[:, 0:1]) / side  # [m * slots, S] box coordinates across
        v = (pix[None, :] - bx[:, 1:2]) / side  # [m * slots, S] box coordinates down
        nan = torch.tensor(float("nan"))
        u = torch.where((u >= 0) & (u < 1), u, nan)  # outside the box every shape test is False
        v = torch.where((v >= 0) & (v < 1), v, nan)
        alpha = torch.zeros(m * slots, S, S)  # [m * slots, S, S]
        for sid, (_, fn) in enumerate(_SHAPES):
            sel = ((shp == sid) & on).nonzero().squeeze(1)
            if sel.numel():
                uu, vv = u[sel, None, :], v[sel, :, None]  # [M, 1, S], [M, S, 1]
                box = (uu == uu).float() * (vv == vv).float()  # [M, S, S] 1 inside the box (not NaN)
                alpha.index_copy_(0, sel, fn(uu, vv).float() * box)
        alpha = alpha.view(m, slots, S, S) * strength[None, :, None, None]
        paint = torch.einsum("bsyx,bsc->bcyx", alpha, slot_colour[a:b])  # [m, 3, S, S]
        img = img * (1 - alpha.sum(1, keepdim=True)) + paint
        images[a:b] = (img * 255).round_().clamp_(0, 255).to(torch.uint8)

    own_boxes = torch.where(present[..., None], boxes[:, :L], torch.full_like(boxes[:, :L], -1))  # [N, L, 4]
    return ImageSet(
        images=images,
        labels=labels.to(torch.int64),
        classes=[f"class{i}" for i in range(K)],
        view=single.to(torch.int64),
        motif_boxes=own_boxes,
        motif_present=present,
    )


# --------------------------------------------------------------------------- ImageFolder trees

_LAYOUT_HINT = "the folder source expects ROOT/train/<class>/*.png|jpg and ROOT/test/<class>/*"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mrplab"


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def _scan(root: Path, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, label)]) of one split, with the checks that name the fix."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    split_dir = root / split
    if not split_dir.is_dir():
        raise MrplabError(f"data root {root} has no {split}/ folder", _LAYOUT_HINT)
    try:
        classes, class_to_idx = find_classes(split_dir)
    except FileNotFoundError:
        raise MrplabError(f"no class folders in {split_dir}", _LAYOUT_HINT) from None
    samples = make_dataset(split_dir, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    counts = np.bincount([y for _, y in samples], minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise MrplabError(
            f"class folder(s) {', '.join(empty)} in {split_dir} hold no image files",
            f"add images ({', '.join(IMG_EXTENSIONS)}) or remove the empty class folders from train/ and test/",
        )
    return classes, samples


def _decode(path: str, size: int) -> np.ndarray:
    """One image as [size, size, 3] uint8; raises on anything unreadable."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = im.convert("RGB")  # forces the full decode (truncated files fail here)
        if im.size != (size, size):
            im = ImageOps.fit(im, (size, size), method=Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def _reason(err: Exception, path: str) -> str:
    """One-line reason why ``path`` could not be decoded."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
    except OSError:
        pass
    msg = " ".join(str(err).replace(f"'{path}'", "").replace(path, "").split())
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def _decode_chunk(paths: Sequence[str], size: int) -> tuple[np.ndarray, list[str | None]]:
    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    errors: list[str | None] = []
    for k, p in enumerate(paths):
        try:
            out[k] = _decode(p, size)
            errors.append(None)
        except Exception as err:  # any unreadable file is skipped, never fatal
            errors.append(_reason(err, p))
    return out, errors


class _StderrProgress:
    """Default decode progress: a rich bar when stderr is a terminal, a plain line every ~10% otherwise."""

    def __init__(self, what: str):
        self.what = what
        self.t0 = time.perf_counter()
        self.next_pct = 10
        self.bar = None
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(self.what, markup=False), BarColumn(), MofNCompleteColumn(),
                                TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task("", total=total)
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
            if done >= total:
                self.bar.stop()
            return
        pct = 100 * done // max(total, 1)
        if pct >= self.next_pct or done >= total:
            el = time.perf_counter() - self.t0
            eta = el / max(done, 1) * (total - done)
            print(f"{self.what}: {done}/{total} images ({pct}%), {el:.0f} s elapsed, eta {eta:.0f} s",
                  file=sys.stderr, flush=True)
            self.next_pct = pct - pct % 10 + 10


def decode_files(paths: Sequence[str], size: int, progress: ProgressFn | None = None,
                 threads: int | None = None) -> tuple[np.ndarray, list[str | None]]:
    """Decode ``paths`` in order: ([N, size, size, 3] uint8, per-file error or None). Failed rows are zero."""
    n = len(paths)
    out = np.zeros((n, size, size, 3), dtype=np.uint8)
    errors: list[str | None] = [None] * n
    step = 512
    starts = list(range(0, n, step))
    workers = threads or min(4, os.cpu_count() or 1)
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_decode_chunk, paths[a:a + step], size) for a in starts]
        for a, fut in zip(starts, futures):
            arr, errs = fut.result()
            out[a:a + len(errs)] = arr
            errors[a:a + len(errs)] = errs
            done += len(errs)
            if progress is not None:
                progress(done, n)
    return out, errors


def _cache_key(root: Path, split: str, size: int, samples: list[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, str(root), split, size]).encode())
    base = root / split
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, base)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _read_cache(path: Path, classes: list[str]) -> tuple[ImageSet, list[tuple[str, str]]] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if json.loads(meta["classes"]) != classes:
                return None
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
            skipped = [tuple(x) for x in json.loads(meta["skipped"])]
    except Exception:  # a missing, foreign or damaged cache file is rebuilt
        return None
    return ImageSet(images=images, labels=labels, classes=classes, skipped=len(skipped)), skipped


def _write_cache(path: Path, data: ImageSet, skipped: list[tuple[str, str]]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"classes": json.dumps(data.classes), "skipped": json.dumps(skipped), "version": str(CACHE_VERSION)}
        save_file({"images": data.images.contiguous(), "labels": data.labels.contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as err:
        _warn(f"could not write the decoded-image cache {path} ({err.strerror or err}); the next load decodes again")
    finally:
        tmp.unlink(missing_ok=True)


def cache_path(cfg: VisionDataConfig, split: Split) -> Path:
    """Where ``load_split`` caches (or finds) the decoded folder split."""
    root = _folder_root(cfg)
    _, samples = _scan(root, split)
    key = _cache_key(root, split, cfg.image_size, samples)
    base = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    return base / "images" / f"{root.name}-{split}-{cfg.image_size}px-{key}.safetensors"


def _folder_root(cfg: VisionDataConfig) -> Path:
    if not cfg.root:
        raise MrplabError("the folder source needs a root", "set root to an ImageFolder folder with train/ and test/")
    root = Path(cfg.root).expanduser().resolve()
    if not root.is_dir():
        raise MrplabError(f"data root {root} does not exist or is not a folder", _LAYOUT_HINT)
    return root


def _folder(cfg: VisionDataConfig, split: Split, progress: ProgressFn | None) -> ImageSet:
    root = _folder_root(cfg)
    scans = {s: _scan(root, s) for s in ("train", "test")}
    train_cls, test_cls = scans["train"][0], scans["test"][0]
    if train_cls != test_cls:
        only_train = sorted(set(train_cls) - set(test_cls)) or "-"
        only_test = sorted(set(test_cls) - set(train_cls)) or "-"
        raise MrplabError(
            f"train and test class folders differ under {root} "
            f"(only in train: {only_train}; only in test: {only_test})",
            "give train/ and test/ the same class folders",
        )
    classes, samples = scans[split]
    S = cfg.image_size
    base = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    cache = base / "images" / f"{root.name}-{split}-{S}px-{_cache_key(root, split, S, samples)}.safetensors"

    cached = _read_cache(cache, classes) if cache.is_file() else None
    if cached is not None:
        data, skipped = cached
        for path, reason in skipped:
            _warn(f"skipped unreadable image {path} ({reason})")
        return data

    paths = [p for p, _ in samples]
    if progress is None and len(paths) >= PROGRESS_MIN_IMAGES:
        progress = _StderrProgress(f"decoding {root / split}")
    arr, errors = decode_files(paths, S, progress)
    ok = np.array([e is None for e in errors], dtype=bool)
    skipped = [(p, e) for p, e in zip(paths, errors) if e is not None]
    for path, reason in skipped:
        _warn(f"skipped unreadable image {path} ({reason})")
    labels = np.array([y for _, y in samples], dtype=np.int64)
    readable = np.bincount(labels[ok], minlength=len(classes))
    if (readable == 0).any():
        bad = ", ".join(classes[i] for i in np.flatnonzero(readable == 0))
        raise MrplabError(f"class folder(s) {bad} in {root / split} hold no readable images",
                          "replace the damaged files or remove the class from train/ and test/")
    kept = arr if ok.all() else arr[ok]  # [N, S, S, 3]
    images = torch.from_numpy(kept).permute(0, 3, 1, 2).contiguous()  # [N, 3, S, S]
    data = ImageSet(images=images, labels=torch.from_numpy(labels[ok]), classes=classes, skipped=len(skipped))
    _write_cache(cache, data, skipped)
    return data


# --------------------------------------------------------------------------- batch transforms


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std in [0, 1] units of [N, 3, H, W] images (uint8 or float in [0, 1])."""
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    n_pix = images.shape[0] * images.shape[2] * images.shape[3]
    s = torch.zeros(images.shape[1], dtype=torch.float64, device=images.device)
    s2 = torch.zeros_like(s)
    for a in range(0, images.shape[0], 4096):  # chunks keep the float copy small
        x = images[a:a + 4096].to(torch.float64) / scale
        s += x.sum(dim=(0, 2, 3))
        s2 += (x * x).sum(dim=(0, 2, 3))
    mean = s / n_pix
    std = (s2 / n_pix - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float()


def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect-pad indices (no edge repeat, like F.pad(mode='reflect')) back into [0, n)."""
    idx = idx.abs()
    return torch.where(idx >= n, 2 * (n - 1) - idx, idx)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with ``pad``-px reflect padding and a random horizontal flip, per image.

    x: [B, 3, H, W] uint8 or float in [0, 1] -> float [B, 3, H, W] in [0, 1]. One gather,
    no padded copy; the random numbers come from ``generator`` (on its own device).
    """
    B, C, H, W = x.shape
    if pad >= min(H, W):
        raise ValueError(f"pad {pad} must be smaller than the image side {min(H, W)}")
    dev = generator.device
    off = torch.randint(0, 2 * pad + 1, (B, 2), generator=generator, device=dev).to(x.device)  # [B, 2] (dy, dx)
    flip = (torch.rand(B, generator=generator, device=dev) < 0.5).to(x.device)  # [B]
    ar_h = torch.arange(H, device=x.device)
    ar_w = torch.arange(W, device=x.device)
    rows = _reflect(off[:, 0:1] - pad + ar_h, H)  # [B, H]
    cols_src = torch.where(flip[:, None], W - 1 - ar_w, ar_w)  # [B, W] flipped crop reads columns backwards
    cols = _reflect(off[:, 1:2] - pad + cols_src, W)  # [B, W]
    b = torch.arange(B, device=x.device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    out = out.permute(0, 3, 1, 2)
    return out.float() / 255.0 if x.dtype == torch.uint8 else out.float()


def normalize(x: torch.Tensor, mean: Sequence[float] | torch.Tensor,
              std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Float [B, C, H, W] in [0, 1] -> (x - mean) / std per channel."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------- looking at the data


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
