"""Shared by the theory tests: references written from net.py's definitions."""

from __future__ import annotations

import torch

from mrplab.theory import net


def reference_patch_ops(Z, keep, dh, q, thr):
    """The forward and backward of the step's elementwise kernels in float64: (h over the kept patches,
    h over all patches, dZ). Z [R, N, P, K], keep [R, N, P] bool, dh [R, N, K]."""
    z = Z.double()
    a, g = net.smoothed_relu(z, q, thr), net.smoothed_relu_grad(z, q, thr)
    kf = keep.unsqueeze(-1).double()
    return (a * kf).sum(2), a.sum(2), g * kf * dh.double().unsqueeze(2)


def wide_matmul_is_exact(X, Ws) -> bool:
    """Whether this machine's BLAS computes each variant's columns of the step's wide matmuls (X @ [W_1 | ... |
    W_V] and X^T @ [dZ_1 | ... | dZ_V], as steps.mrp_variants runs them) bitwise as the narrow products of one
    variant alone. X [R, N, P, d], Ws [R, d, K] each."""
    R, d, K = Ws[0].shape
    V = len(Ws)
    wide = net.preact(X, torch.stack(Ws, 2).view(R, d, V * K), native=True)
    dZ = wide.flip(-1).contiguous()  # any dZ of the wide layout
    dW = net.weight_grad(X, dZ, torch.float32).view(R, d, V, K)
    parts = dZ.view(*dZ.shape[:-1], V, K)
    return all(torch.equal(wide[..., v * K:(v + 1) * K], net.preact(X, W, native=True))
               and torch.equal(dW[:, :, v], net.weight_grad(X, parts[..., v, :].contiguous(), torch.float32))
               for v, W in enumerate(Ws))
