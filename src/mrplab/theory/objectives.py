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
    """Bernoulli patch mask: each entry True (masked) with probability ``ratio``, drawn on ``g``'s device and
    placed on ``device``: a CPU generator gives the same mask whatever the device the run trains on."""
    return _placed(torch.rand(shape, generator=g, device=g.device) < ratio, device)


def make_run_masks(gens: list[torch.Generator], n: int, P: int, ratio: float, device: str | torch.device = "cpu") -> torch.Tensor:
    """One independent mask per run, each from its run's own generator: [R, N, P] on ``device``."""
    return _placed(torch.stack([make_mask((n, P), ratio, g, g.device) for g in gens]), device)


def _placed(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """t on ``device``; from the CPU to CUDA through pinned memory without waiting for the device's queue."""
    device = torch.device(device)
    if t.device.type == device.type and (device.index is None or t.device.index == device.index):
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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


def normalise_target(t: torch.Tensor, norm: str, eps: float = 1e-12) -> torch.Tensor:
    """The target as the loss sees it. per_sample: each sample's target centred and scaled to unit
    variance across its channels (data2vec's instance-normalised targets); any other norm: t as is.
    t [R, N, C]; the teacher side, so the result carries no gradient to the student."""
    if norm != "per_sample":
        return t
    c = t - t.mean(-1, keepdim=True)
    return c / (c.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def mrp_teacher_loss(pred: torch.Tensor, target: torch.Tensor, power: float = 0.0, norm: str = "per_kernel") -> torch.Tensor:
    """data2vec-style: the decoder's prediction from the masked input vs the teacher's code.

    pred, target: [R, N, K]; target must already be detached (teacher side). Returns [R].
    In the polynomial phase the plain loss's gradient scales like c^(2q-1) in
    the correlations c, so no fixed step size serves both the start and the
    end; dividing each kernel's error by its own (teacher mean square)^power
    with power = (q-1)/q (norm="per_kernel") keeps every kernel's leading
    correlation growing at the same relative rate per step, so no kernel waits
    on another, while the competition between features inside a kernel is
    untouched (see docs/regime.md). norm: none | per_kernel | per_run |
    per_sample (the target normalised per sample, no divisor).
    """
    if norm in ("none", "per_sample"):
        return _normalised_sq_error(pred, normalise_target(target, norm), 0.0)
    return _normalised_sq_error(pred, target, power, norm == "per_kernel")


def fit_decoder(h: torch.Tensor, t: torch.Tensor, kind: str, ridge: float = 1e-10) -> torch.Tensor:
    """The linear decoder that minimises sum_n ||decode(h_n) - t_n||^2 for fixed codes: the fitted-decoder control.

    h [R, N, K] student codes, t [R, N, C] targets. diag (C = K): D_r = <h_r, t_r> / <h_r, h_r> per
    kernel ([R, K]; 0 for a kernel that never fires). full: the ridge solve (H^T H + lam I)^-1 H^T T
    ([R, K, C]) with lam = ridge * mean diagonal of H^T H, a tie-breaker far below the data's scale.
    Solved in float64: codes in the polynomial phase are ~1e-7. Any per-channel divisor of the loss
    leaves this optimum unchanged (each output channel is its own least-squares problem).
    """
    h64, t64 = h.double(), t.double()
    if kind == "diag":
        num, den = (h64 * t64).sum(1), h64.pow(2).sum(1)  # [R, K]
        return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num)).to(h.dtype)
    G = h64.transpose(1, 2) @ h64  # [R, K, K]
    lam = ridge * torch.diagonal(G, dim1=1, dim2=2).mean(-1).clamp(min=1e-300)  # [R]
    G = G + lam[:, None, None] * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G, h64.transpose(1, 2) @ t64).to(h.dtype)  # [R, K, C]


def mae_pixel_loss(pred: torch.Tensor, X: torch.Tensor, mask: torch.Tensor, power: float = 0.0,
                   scope: str = "masked") -> torch.Tensor:
    """MAE-style: reconstruct the masked patches' pixels (scope="all": every patch's).

    Patches in the data model are exchangeable (positions carry no
    information), so the target is the content of the patches pooled:
    t = sum_{p masked} x_p. pred [R, N, d], X [Rd, N, P, d], mask [R, N, P]. Returns [R].
    """
    sel = mask if scope == "masked" else torch.ones_like(mask)
    target = torch.einsum("rnp,rnpd->rnd", sel.to(X.dtype), X.expand(mask.shape[0], *X.shape[1:]))  # [R, N, d]
    return _normalised_sq_error(pred, target, power)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per run. logits [R, N, k], y [Rd, N] -> [R]."""
    R, N, k = logits.shape
    yy = y.expand(R, N)
    return F.cross_entropy(logits.reshape(R * N, k), yy.reshape(R * N), reduction="none").view(R, N).mean(-1)
