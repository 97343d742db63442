"""The embedded multi-view motif images: the image analogue of the theory's multi-view data model
(the package docstring describes them)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from mrplab.errors import MrplabError
from mrplab.rng import generator
from mrplab.vision.data.base import MAX_DISTRACTORS, MIN_MOTIF, ImageSet, Split, VisionDataConfig, grid

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


def motif_bank(cfg: VisionDataConfig, classes: int | None = None, stream: str = "vision-motif-bank") -> MotifBank:
    """The K * L motifs, from ``bank_seed`` only (shared by both splits); ``classes`` and ``stream`` give
    another bank (the classes that exist only in pretraining).

    Hues are evenly spaced and dealt to motifs in a random order, so a class's
    motifs are not of one colour family. Shapes are dealt by hue rank so that
    motifs sharing a shape are as far apart in hue as possible.
    """
    K, L = cfg.num_classes if classes is None else classes, cfg.motifs_per_class
    n = K * L
    g = generator(cfg.bank_seed, stream)
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


@dataclass
class _Scene:
    """Everything random about a split's N images, drawn up front (rendering is then chunked freely).
    Slot s of an image: its own motifs first (L), then the distractors (MAX_DISTRACTORS)."""

    labels: torch.Tensor  # [N] balanced classes
    single: torch.Tensor  # [N] bool: single-view
    present: torch.Tensor  # [N, L] bool: own motif l is drawn
    boxes: torch.Tensor  # [N, slots, 4] (x0, y0, x1, y1), end exclusive
    on: torch.Tensor  # [N, slots] bool: the slot is drawn
    shape: torch.Tensor  # [N, slots] index into SHAPE_NAMES
    colour: torch.Tensor  # [N, slots, 3] RGB in [0, 1]
    base: torch.Tensor  # [N, 3] background tint
    blobs: torch.Tensor  # [N, 3, 4, 4] smooth colour noise
    fine: torch.Tensor  # [N, 1, 8, 8] finer grey noise
    strokes: torch.Tensor  # [N, 3, 4] faint segments (x0, y0, x1, y1)
    stroke_contrast: torch.Tensor  # [N, 3]


def _draw_scene(cfg: VisionDataConfig, n: int, frac: float, stream: str, bank: MotifBank, shown: int,
                cell_range: tuple[int, int]) -> _Scene:
    """n images over the bank's classes, each class showing only its first ``shown`` motifs (own and as a
    distractor); with every motif shown this is exactly the downstream draw."""
    K, L, S = bank.shape.shape[0], cfg.motifs_per_class, cfg.image_size
    per_side, cell, margin = grid(S, L)
    lo, hi = cell_range
    g = generator(cfg.bank_seed, stream)
    slots = L + MAX_DISTRACTORS

    # ---- every random number of the split, in one fixed order
    labels = (torch.arange(n) % K)[torch.randperm(n, generator=g)]  # [N] balanced classes
    single = torch.rand(n, generator=g) < frac  # [N]
    chosen = torch.randint(0, shown, (n,), generator=g)  # [N] the one motif of a single-view image
    present = torch.where(single[:, None], torch.arange(L)[None, :] == chosen[:, None],
                          torch.arange(L)[None, :] < shown)  # [N, L]
    cells = torch.argsort(torch.rand(n, per_side * per_side, generator=g), dim=1)[:, :slots]  # [N, slots]
    size = torch.randint(lo, hi + 1, (n, slots), generator=g)  # [N, slots]
    jitter = torch.rand(n, slots, 2, generator=g)  # [N, slots, 2]
    bright = 0.8 + 0.35 * torch.rand(n, slots, 1, generator=g)  # [N, slots, 1]
    tint = 0.04 * torch.randn(n, slots, 3, generator=g)  # [N, slots, 3]
    n_distract = torch.bucketize(torch.rand(n, generator=g), torch.tensor([0.3, 0.7]))  # [N] 0, 1 or 2
    d_class = (labels[:, None] + torch.randint(1, K, (n, MAX_DISTRACTORS), generator=g)) % K  # never own class
    d_motif = torch.randint(0, shown, (n, MAX_DISTRACTORS), generator=g)
    base = 0.25 + 0.45 * torch.rand(n, 1, generator=g) + 0.06 * torch.randn(n, 3, generator=g)  # [N, 3]
    blobs = 0.08 * torch.randn(n, 3, 4, 4, generator=g)  # [N, 3, 4, 4]
    fine = 0.04 * torch.randn(n, 1, 8, 8, generator=g)  # [N, 1, 8, 8]
    strokes = torch.rand(n, 3, 4, generator=g) * S  # [N, 3, 4]
    stroke_contrast = 0.15 * (2 * torch.rand(n, 3, generator=g) - 1)  # [N, 3]

    # ---- boxes: slot s of image j sits in cell cells[j, s] at a random offset inside it
    cy, cx = cells // per_side, cells % per_side
    off = torch.floor(jitter * (cell - size + 1)[..., None]).long()  # [N, slots, 2]
    x0 = margin + cx * cell + off[..., 0]
    y0 = margin + cy * cell + off[..., 1]
    boxes = torch.stack([x0, y0, x0 + size, y0 + size], dim=-1)  # [N, slots, 4]
    slot_class = torch.cat([labels[:, None].expand(n, L), d_class], dim=1)  # [N, slots]
    slot_motif = torch.cat([torch.arange(L)[None, :].expand(n, L), d_motif], dim=1)
    on = torch.cat([present, torch.arange(MAX_DISTRACTORS)[None, :] < n_distract[:, None]], dim=1)
    colour = (bank.colour[slot_class, slot_motif] * bright + tint).clamp(0, 1)  # [N, slots, 3]
    return _Scene(labels, single, present, boxes, on, bank.shape[slot_class, slot_motif], colour, base, blobs,
                  fine, strokes, stroke_contrast)


def _background(sc: _Scene, a: int, b: int, S: int, pix: torch.Tensor) -> torch.Tensor:
    """Images a..b-1 without motifs: tinted grey + smooth colour blobs + finer grey noise + faint strokes."""
    m = b - a
    img = sc.base[a:b, :, None, None].expand(m, 3, S, S).clone()  # [m, 3, S, S]
    img += torch.nn.functional.interpolate(sc.blobs[a:b], size=(S, S), mode="bicubic", align_corners=False)
    img += torch.nn.functional.interpolate(sc.fine[a:b], size=(S, S), mode="bilinear", align_corners=False)
    line = (1.0 - _segment_distance(pix, pix, sc.strokes[a:b])).clamp(0, 1)  # [m, 3, S, S] one map per stroke
    img += (line * sc.stroke_contrast[a:b, :, None, None]).sum(1, keepdim=True)
    return img.clamp_(0, 1)


def _motif_alpha(sc: _Scene, a: int, b: int, S: int, pix: torch.Tensor) -> torch.Tensor:
    """[m, slots, S, S] coverage of every slot of images a..b-1 (zero where the slot is off)."""
    m, slots = b - a, sc.on.shape[1]
    on = sc.on[a:b].reshape(-1)  # [m * slots]
    bx = sc.boxes[a:b].reshape(-1, 4).float()
    shp = sc.shape[a:b].reshape(-1)
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
    return alpha.view(m, slots, S, S)


def embedded_split(cfg: VisionDataConfig, split: Split) -> ImageSet:
    """One split of the motif images: the scene drawn up front from the split's stream, rendered in chunks."""
    K, L, S = cfg.num_classes, cfg.motifs_per_class, cfg.image_size
    per_side, cell, margin = grid(S, L)
    if cell < MIN_MOTIF:
        raise MrplabError(
            f"{L} motifs per class do not fit in {S}-px images", "raise image_size or lower motifs_per_class"
        )
    n = cfg.n_train if split == "train" else cfg.n_test
    frac = cfg.single_view_train if split == "train" else cfg.single_view_test
    sc = _draw_scene(cfg, n, frac, f"vision-embedded-{split}", motif_bank(cfg), L, _motif_size_range(S, cell))
    return _render(cfg, sc, [f"class{i}" for i in range(K)])


def embedded_pretrain(cfg: VisionDataConfig, n: int, coverage: float, extra_classes: int,
                      single_view: float) -> ImageSet:
    """Unlabelled pretraining images from their own stream (never a downstream image): the downstream classes
    showing only their first round(coverage x L) motifs, plus ``extra_classes`` classes with motifs of their own."""
    K, L, S = cfg.num_classes, cfg.motifs_per_class, cfg.image_size
    shown = round(coverage * L)
    if shown < 1:
        raise MrplabError(f"coverage {coverage} leaves every class with no motif in pretraining",
                          "raise pretrain.data.coverage")
    bank = motif_bank(cfg)
    if extra_classes:
        extra = motif_bank(cfg, extra_classes, "vision-motif-bank-extra")
        bank = MotifBank(*(torch.cat([getattr(bank, f), getattr(extra, f)]) for f in ("shape", "hue", "colour")))
    cell = grid(S, L)[1]
    sc = _draw_scene(cfg, n, single_view, "vision-embedded-pretrain", bank, shown, _motif_size_range(S, cell))
    names = [f"class{i}" for i in range(K)] + [f"extra{i}" for i in range(extra_classes)]
    return _render(cfg, sc, names)


def _render(cfg: VisionDataConfig, sc: _Scene, classes: list[str]) -> ImageSet:
    L, S = cfg.motifs_per_class, cfg.image_size
    n, slots = sc.on.shape
    strength = torch.cat([torch.ones(L), torch.full((MAX_DISTRACTORS,), cfg.distractor_strength)])  # [slots]
    images = torch.empty(n, 3, S, S, dtype=torch.uint8)
    pix = torch.arange(S, dtype=torch.float32) + 0.5  # pixel centres
    chunk = max(1, 2**22 // (slots * S * S))
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        img = _background(sc, a, b, S, pix)  # [m, 3, S, S]
        alpha = _motif_alpha(sc, a, b, S, pix) * strength[None, :, None, None]  # [m, slots, S, S]; never overlap
        paint = torch.einsum("bsyx,bsc->bcyx", alpha, sc.colour[a:b])  # [m, 3, S, S]
        img = img * (1 - alpha.sum(1, keepdim=True)) + paint
        images[a:b] = (img * 255).round_().clamp_(0, 255).to(torch.uint8)

    present = sc.present
    own_boxes = torch.where(present[..., None], sc.boxes[:, :L], torch.full_like(sc.boxes[:, :L], -1))  # [N, L, 4]
    return ImageSet(
        images=images,
        labels=sc.labels.to(torch.int64),
        classes=classes,
        view=sc.single.to(torch.int64),
        motif_boxes=own_boxes,
        motif_present=present,
    )
