"""Masks and losses as pure functions. Every loss returns one value per run: [R].

Mask polarity, everywhere in mrplab: ``mask`` is a BoolTensor, True = masked
(hidden from the student). ``make_mask`` is the one function that makes masks.

The losses here are the reference definitions, written for autograd. The
training loops use steps.py, which computes the same losses with hand-derived
gradients; tests/theory/test_steps.py holds the two together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_mask(shape: tuple[int, ...], ratio: float, g: torch.Generator, device: str | torch.device = "cpu") -> torch.Tensor:
    """Bernoulli patch mask: each entry True (masked) with probability ``ratio``."""
    return torch.rand(shape, generator=g, device=device) < ratio


def make_run_masks(gens: list[torch.Generator], n: int, P: int, ratio: float, device: str | torch.device = "cpu") -> torch.Tensor:
    """One independent mask per run, each from its run's own generator: [R, N, P]."""
    return torch.stack([make_mask((n, P), ratio, g, device) for g in gens])


def _normalised_sq_error(pred: torch.Tensor, target: torch.Tensor, power: float, per_channel: bool = False) -> torch.Tensor:
    """Per-run mean over samples of ||pred - target||^2 divided by (target mean square)^power.

    The divisor comes from the detached target, so within a channel it rescales
    the step, never its direction. power 0 is the plain squared error, 1 is
    fully scale-free. per_channel: each output channel (kernel) is divided by
    its own target mean square (data2vec's per-channel target normalisation);
    otherwise one divisor per run. Returns [R].
    """
    sq = (pred - target).pow(2).mean(-2)  # [R, C] per channel, mean over samples
    if power != 0:
        ms = target.detach().pow(2).mean(-2)  # [R, C]
        if per_channel:
            sq = sq / ms.clamp(min=1e-30).pow(power)
        else:
            sq = sq / ms.sum(-1, keepdim=True).clamp(min=1e-30).pow(power)
    return sq.sum(-1)


def mrp_teacher_loss(pred: torch.Tensor, target: torch.Tensor, power: float = 0.0, per_kernel: bool = True) -> torch.Tensor:
    """data2vec-style: the decoder's prediction from the masked input vs the teacher's code of the full input.

    pred, target: [R, N, K]; target must already be detached (teacher side). Returns [R].
    In the polynomial phase the plain loss's gradient scales like c^(2q-1) in
    the correlations c, so no fixed step size serves both the start and the
    end; dividing each kernel's error by its own (teacher mean square)^power
    with power = (q-1)/q keeps every kernel's leading correlation growing at
    the same relative rate per step, so no kernel waits on another, while the
    competition between features inside a kernel is untouched (see docs/regime.md).
    """
    return _normalised_sq_error(pred, target, power, per_kernel)


def mae_pixel_loss(pred: torch.Tensor, X: torch.Tensor, mask: torch.Tensor, power: float = 0.0) -> torch.Tensor:
    """MAE-style: reconstruct the masked patches' pixels.

    Patches in the data model are exchangeable (positions carry no
    information), so the target is the content of the masked patches pooled:
    t = sum_{p masked} x_p. pred [R, N, d], X [Rd, N, P, d], mask [R, N, P]. Returns [R].
    """
    target = torch.einsum("rnp,rnpd->rnd", mask.to(X.dtype), X.expand(mask.shape[0], *X.shape[1:]))  # [R, N, d]
    return _normalised_sq_error(pred, target, power)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per run. logits [R, N, k], y [Rd, N] -> [R]."""
    R, N, k = logits.shape
    yy = y.expand(R, N)
    return F.cross_entropy(logits.reshape(R * N, k), yy.reshape(R * N), reduction="none").view(R, N).mean(-1)
