"""Batch transforms on whole tensors: per-channel statistics, random crop + flip, normalisation."""

from __future__ import annotations

from typing import Sequence

import torch

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

