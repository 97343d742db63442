"""The baseline the engine is measured against: the theory network as public research
scripts write it, an ``nn.Module`` trained with autograd, one run at a time.

Kept here (not in the package) only to be timed side by side with mrplab's engine.
"""

from __future__ import annotations

import torch
from torch import nn


class SmoothedReLUConvNet(nn.Module):
    def __init__(self, d: int, K: int, q: int, thr: float, sigma_0: float, g: torch.Generator):
        super().__init__()
        self.W = nn.Parameter(sigma_0 * torch.randn(d, K, generator=g))
        self.D = nn.Parameter(torch.ones(K))
        self.q, self.thr = q, thr

    def act(self, z: torch.Tensor) -> torch.Tensor:
        poly = z.clamp(min=0, max=self.thr) ** self.q / (self.q * self.thr ** (self.q - 1))
        return poly + (z - self.thr).clamp(min=0)

    def forward(self, X: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        A = self.act(torch.einsum("npd,dk->npk", X, self.W))  # [N, P, K]
        if keep is not None:
            A = A * keep.unsqueeze(-1)
        return A.sum(1)  # [N, K]


def sl_step(model: SmoothedReLUConvNet, X: torch.Tensor, y: torch.Tensor, k: int, m: int, lr: float) -> float:
    h = model(X)
    logits = h.view(h.shape[0], k, m).sum(-1)
    loss = nn.functional.cross_entropy(logits, y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        model.W -= lr * model.W.grad
    return float(loss)


def mrp_step(model: SmoothedReLUConvNet, X: torch.Tensor, mask_ratio: float, lr: float, g: torch.Generator) -> float:
    keep = (torch.rand(X.shape[0], X.shape[1], generator=g) >= mask_ratio).float()
    with torch.no_grad():
        target = model(X)
    pred = model(X, keep) * model.D
    ms = target.pow(2).mean(0).clamp(min=1e-30) ** 0.75
    loss = ((pred - target).pow(2).mean(0) / ms).sum()
    model.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        model.W -= lr * model.W.grad
        model.D -= 0.01 * model.D.grad
    return float(loss)
