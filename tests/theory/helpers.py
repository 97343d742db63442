"""Shared by the theory tests: references written from net.py's definitions."""

from __future__ import annotations

from mrplab.theory import net


def reference_patch_ops(Z, keep, dh, q, thr):
    """The forward and backward of the step's elementwise kernels in float64: (h over the kept patches,
    h over all patches, dZ). Z [R, N, P, K], keep [R, N, P] bool, dh [R, N, K]."""
    z = Z.double()
    a, g = net.smoothed_relu(z, q, thr), net.smoothed_relu_grad(z, q, thr)
    kf = keep.unsqueeze(-1).double()
    return (a * kf).sum(2), a.sum(2), g * kf * dh.double().unsqueeze(2)
