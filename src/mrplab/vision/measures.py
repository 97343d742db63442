"""Quantitative multi-view evidence from class-activation maps (CAMs).

Pure functions on maps, boxes and images; the CAMs themselves come from
``vision/evidence.py`` (pytorch-grad-cam). Every measure has a fixed rule,
chosen before any comparison is looked at:

- a map is normalised per image to [0, 1] (min-max);
- **regions**: connected components (8-connectivity, scipy.ndimage.label) of
  the pixels at or above ``REGION_THRESHOLD`` of the image's maximum, ignoring
  components smaller than ``MIN_REGION_PIXELS``;
- **motif covered**: a motif's box holds a map value at or above
  ``PEAK_THRESHOLD`` (a peak) or at least ``MASS_SHARE`` of the map's total
  mass;
- **most discriminative region**: the ``window`` x ``window`` square with the
  largest map sum; occluding it fills it with the data set's mean colour.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

REGION_THRESHOLD = 0.5
MIN_REGION_PIXELS = 4
PEAK_THRESHOLD = 0.8
MASS_SHARE = 0.15
_STRUCTURE_8 = np.ones((3, 3), dtype=bool)


def normalize_maps(cams: torch.Tensor) -> torch.Tensor:
    """Min-max per map: [B, H, W] -> [B, H, W] in [0, 1]; a constant map becomes all zeros."""
    flat = cams.flatten(1).float()
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = (hi - lo).clamp_min(1e-12)
    out = torch.where(hi - lo > 1e-12, (flat - lo) / span, torch.zeros_like(flat))
    return out.view_as(cams)


def count_regions(cams: torch.Tensor, threshold: float = REGION_THRESHOLD,
                  min_pixels: int = MIN_REGION_PIXELS) -> torch.Tensor:
    """Separated high-activation regions per map: [B, H, W] -> [B] int64."""
    maps = normalize_maps(cams).cpu().numpy()
    counts = []
    for m in maps:
        labels, n = ndimage.label(m >= threshold, structure=_STRUCTURE_8)
        if n == 0:
            counts.append(0)
            continue
        sizes = np.bincount(labels.ravel())[1:]  # [n] pixels per component
        counts.append(int((sizes >= min_pixels).sum()))
    return torch.tensor(counts, dtype=torch.int64)


def motif_covered(cams: torch.Tensor, boxes: torch.Tensor, present: torch.Tensor,
                  peak: float = PEAK_THRESHOLD, mass_share: float = MASS_SHARE) -> torch.Tensor:
    """Which present motifs a map covers: cams [B, H, W], boxes [B, L, 4] (x0, y0, x1, y1, end exclusive),
    present [B, L] bool -> covered [B, L] bool (False where the motif is absent)."""
    maps = normalize_maps(cams)
    B, L = present.shape
    total = maps.flatten(1).sum(1).clamp_min(1e-12)  # [B]
    covered = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        for m in range(L):
            if not bool(present[b, m]):
                continue
            x0, y0, x1, y1 = (int(v) for v in boxes[b, m])
            patch = maps[b, y0:y1, x0:x1]
            if patch.numel() == 0:
                continue
            covered[b, m] = bool(patch.max() >= peak) or bool(patch.sum() / total[b] >= mass_share)
    return covered


def motif_coverage(cams: torch.Tensor, boxes: torch.Tensor, present: torch.Tensor, **kw) -> torch.Tensor:
    """Share of each image's present motifs that the map covers: [B] float (nan if none present)."""
    cov = motif_covered(cams, boxes, present, **kw)
    n = present.sum(1).float()
    return torch.where(n > 0, cov.sum(1).float() / n.clamp_min(1), torch.full_like(n, float("nan")))


def top_window(cams: torch.Tensor, window: int) -> torch.Tensor:
    """Top-left corner (y, x) of the window x window square with the largest map sum: [B, 2] int64."""
    maps = normalize_maps(cams).unsqueeze(1)  # [B, 1, H, W]
    sums = F.avg_pool2d(maps, window, stride=1)  # [B, 1, H-w+1, W-w+1]
    B, _, h, w = sums.shape
    idx = sums.view(B, -1).argmax(1)
    return torch.stack([idx // w, idx % w], dim=1)


def occlude(images: torch.Tensor, corners: torch.Tensor, window: int, fill: torch.Tensor) -> torch.Tensor:
    """Fill each image's window (from ``top_window``) with ``fill`` [C] (e.g. the data set's mean colour).
    images [B, C, H, W] float; returns a new tensor, the input is not changed."""
    out = images.clone()
    for b, (y, x) in enumerate(corners.tolist()):
        out[b, :, y:y + window, x:x + window] = fill.view(-1, 1, 1).to(out.dtype)
    return out


# --------------------------------------------------------------------------- image-level uncertainty


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean of per-image values [n] (nan ignored) and its standard error std / sqrt(n)."""
    v = values[~torch.isnan(values.float())].double()
    if v.numel() == 0:
        return float("nan"), float("nan")
    se = v.std(unbiased=True).item() / v.numel() ** 0.5 if v.numel() > 1 else float("nan")
    return v.mean().item(), se


def ratio_se(num: torch.Tensor, den: torch.Tensor) -> tuple[float, float]:
    """mean(num) / mean(den) over paired per-image values [n] (e.g. correct after / before occlusion) and its
    delta-method standard error, which accounts for the pairing (the same images in both)."""
    a, c = num.double(), den.double()
    n = a.numel()
    ma, mc = a.mean(), c.mean()
    if n < 2 or mc <= 0:
        return (ma / mc).item() if mc > 0 else float("nan"), float("nan")
    cov = torch.cov(torch.stack([a, c]))  # [[var a, cov], [cov, var c]], unbiased
    var = (cov[0, 0] / mc**2 - 2 * ma * cov[0, 1] / mc**3 + ma**2 * cov[1, 1] / mc**4) / n
    return (ma / mc).item(), var.clamp_min(0).sqrt().item()
