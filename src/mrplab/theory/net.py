"""The analysed network: smoothed ReLU, two-layer conv encoder, linear decoder, heads.

Every weight carries a leading run axis R: R independent runs (seeds) train at
once. Kernel r = i*m + j is "class i's j-th kernel" for the supervised head;
mask reconstruction ignores that grouping.

Encoder (a conv layer whose kernels slide over the P patches, then sum-pooling):

    h_r(X) = sum_p act(<w_r, x_p>)              # [R, N, K]

A masked forward is ``keep * act(X W)`` summed over patches: a zeroed patch
has act(<w, 0>) = 0, so masked copies of X are never built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mrplab.runtime import matmul_flops, weight_grad_reads_a_copy


# --------------------------------------------------------------------------- smoothed ReLU


def smoothed_relu(z: torch.Tensor, q: int, thr: float) -> torch.Tensor:
    """0 for z <= 0; z^q / (q thr^(q-1)) for 0 < z <= thr; z - (1 - 1/q) thr above."""
    zp = z.clamp(min=0.0)
    poly = zp.clamp(max=thr) ** q / (q * thr ** (q - 1))
    lin = (zp - thr).clamp(min=0.0)
    return poly + lin  # continuous at thr: thr/q + 0 = thr - (1-1/q) thr


def smoothed_relu_grad(z: torch.Tensor, q: int, thr: float) -> torch.Tensor:
    """Exact derivative: 0, (z/thr)^(q-1), 1 on the three pieces."""
    zp = z.clamp(min=0.0)
    return torch.where(z > thr, torch.ones_like(z), (zp / thr) ** (q - 1))


class _SmoothedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, q: int, thr: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        ctx.q, ctx.thr = q, thr
        return smoothed_relu(z, q, thr)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return grad_out * smoothed_relu_grad(z, ctx.q, ctx.thr), None, None


def act(z: torch.Tensor, q: int, thr: float) -> torch.Tensor:
    """Smoothed ReLU with the exact hand-written derivative in backward."""
    return _SmoothedReLU.apply(z, q, thr)


# --------------------------------------------------------------------------- encoder


def init_kernels(seeds_gens: list[torch.Generator], d: int, K: int, sigma_0: float) -> torch.Tensor:
    """Gaussian kernels, one generator per run so a run's init does not depend on R."""
    return torch.stack([sigma_0 * torch.randn(d, K, generator=g) for g in seeds_gens])  # [R, d, K]


def preact(X: torch.Tensor, W: torch.Tensor, native: bool = False) -> torch.Tensor:
    """Z[r, n, p, k] = <w_{r,k}, x_{n,p}>.

    X: [Rd, N, P, d] with Rd = 1 (data shared by all runs) or Rd = R.
    W: [R, d, K]. Shared data uses one matmul X[N*P, d] @ W[d, R*K].
    Z comes in W's dtype, or with ``native`` as the matmul wrote it: X's dtype, and for shared
    data a view of its [N, P, R, K] layout (the engine's steps read it as it is).
    """
    Rd, N, P, d = X.shape
    R, _, K = W.shape
    matmul_flops.add(N * P, d, R * K if Rd == 1 else K, times=1 if Rd == 1 else R)  # the product that runs
    Wc = W.to(X.dtype)  # bf16 data: bf16 matmul inputs
    if Rd == 1:
        Wf = Wc.permute(1, 0, 2).reshape(d, R * K)  # [d, R*K]
        Z = (X.reshape(N * P, d) @ Wf).view(N, P, R, K).permute(2, 0, 1, 3)  # [R, N, P, K]
    elif Wc.requires_grad:  # the autograd reference path
        Z = torch.matmul(X.reshape(R, N * P, d), Wc).view(R, N, P, K)
    else:  # per-run data: one matmul per run into one buffer (CPU bmm of these thin shapes is ~1.5x slower)
        Xr = X.reshape(R, N * P, d)
        Z = torch.empty(R, N * P, K, dtype=X.dtype, device=X.device)
        for r in range(R):
            torch.mm(Xr[r], Wc[r], out=Z[r])
        Z = Z.view(R, N, P, K)
    return Z if native else Z.to(W.dtype)


def encode(
    X: torch.Tensor, W: torch.Tensor, q: int, thr: float, keep: torch.Tensor | None = None, per_patch: bool = False
) -> torch.Tensor:
    """h = sum over (kept) patches of act(X W): [R, N, K]; per_patch returns [R, N, P, K]."""
    A = act(preact(X, W), q, thr)  # [R, N, P, K]
    if keep is not None:
        A = A * keep.unsqueeze(-1).to(A.dtype)  # keep: [R, N, P] bool, True = visible
    return A if per_patch else A.sum(dim=2)


# --------------------------------------------------------------------------- decoder and heads


def init_decoder(R: int, K: int, kind: str) -> torch.Tensor:
    """Identity start: the decoder first copies each kernel's code, then learns to mix."""
    if kind == "full":
        return torch.eye(K).expand(R, K, K).clone()  # [R, K, K]
    return torch.ones(R, K)  # [R, K]


def decode(h: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Linear decoder: h [R, N, K] -> [R, N, K] (full D [R, K, K] or diagonal D [R, K])."""
    if D.dim() == 3:
        return torch.bmm(h, D)
    return h * D.unsqueeze(1)


def sl_logits(h: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """The analysed supervised head F_i(X) = sum of class i's m kernel outputs: [R, N, k]."""
    R, N, K = h.shape
    return h.view(R, N, k, m).sum(-1)


@dataclass
class LinearHead:
    H: torch.Tensor  # [R, K, k]
    b: torch.Tensor  # [R, k]
    center: torch.Tensor  # [R, 1, K] frozen per-kernel mean of the encoder output
    scale: torch.Tensor  # [R, 1, 1] frozen overall std of the run's encoder output

    def runs(self, s: slice) -> "LinearHead":
        """The heads of runs s (views, not copies)."""
        return LinearHead(H=self.H[s], b=self.b[s], center=self.center[s], scale=self.scale[s])

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return torch.bmm((h - self.center) / self.scale, self.H) + self.b.unsqueeze(1)  # [R, N, k]


def init_linear_head(
    h_train: torch.Tensor, k: int, standardize: bool, gens: list[torch.Generator] | None = None
) -> LinearHead:
    """A linear head on encoder outputs h_train [R, N, K].

    Standardisation centres each kernel and divides by the run's overall std
    (one scalar per run), so kernels that captured nothing stay small instead of
    being blown up to unit variance. ``gens`` = random init N(0, 1/K), else zeros.
    """
    R, N, K = h_train.shape
    if standardize:
        center = h_train.mean(dim=1, keepdim=True)  # [R, 1, K]
        scale = (h_train - center).pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp(min=1e-12)  # [R, 1, 1]
    else:
        center = torch.zeros(R, 1, K, dtype=h_train.dtype, device=h_train.device)
        scale = torch.ones(R, 1, 1, dtype=h_train.dtype, device=h_train.device)
    if gens is None:
        H = torch.zeros(R, K, k, dtype=h_train.dtype, device=h_train.device)
    else:
        H = torch.stack([torch.randn(K, k, generator=g) / K**0.5 for g in gens]).to(h_train.device, h_train.dtype)
    b = torch.zeros(R, k, dtype=h_train.dtype, device=h_train.device)
    return LinearHead(H=H, b=b, center=center, scale=scale)


# --------------------------------------------------------------------------- hand-derived backward
#
# The engine's steps (steps.py) avoid autograd: one matmul for the forward
# (Z = X W), one for the weight gradient (dW = X^T dZ), and between them the
# smoothed ReLU's pooled values and its derivative computed from Z. The
# autograd path above stays as the reference (tests compare the two).


def transposed_patches(X: torch.Tensor) -> torch.Tensor | None:
    """X^T [Rd, d, N*P] laid out for the weight gradient's matmul where that layout pays
    (runtime.weight_grad_reads_a_copy: bf16 on the CPU); elsewhere None, costing no memory."""
    if not weight_grad_reads_a_copy(X.dtype, X.device):
        return None
    Rd, N, P, d = X.shape
    return X.reshape(Rd, N * P, d).transpose(1, 2).contiguous()


def weight_grad(X: torch.Tensor, dZ: torch.Tensor, dtype: torch.dtype | None = None,
                Xt: torch.Tensor | None = None) -> torch.Tensor:
    """dW = X^T dZ for Z = preact(X, W): X [Rd, N, P, d], dZ [R, N, P, K] -> [R, d, K] in ``dtype``
    (default dZ's). The matmul runs in X's dtype, from ``Xt = transposed_patches(X)`` when given.

    Shared data (Rd = 1) uses one matmul X[N*P, d]^T @ dZ[N*P, R*K] (no copy when dZ has
    the [N, P, R, K] layout of ``preact(..., native=True)``).
    """
    Rd, N, P, d = X.shape
    R, K = dZ.shape[0], dZ.shape[-1]
    dtype = dtype or dZ.dtype
    matmul_flops.add(N * P, d, R * K if Rd == 1 else K, times=1 if Rd == 1 else R)  # the product that runs
    XT = X.reshape(Rd, N * P, d).transpose(1, 2) if Xt is None else Xt  # [Rd, d, N*P]
    if Rd == 1:
        dZf = dZ.permute(1, 2, 0, 3).reshape(N * P, R * K)  # [N*P, R*K]
        dW = XT[0] @ dZf.to(X.dtype)  # [d, R*K]
        return dW.view(d, R, K).permute(1, 0, 2).to(dtype)
    dZr = dZ.reshape(R, N * P, K).to(X.dtype)
    dW = torch.empty(R, d, K, dtype=X.dtype, device=X.device)
    for r in range(R):
        torch.mm(XT[r], dZr[r], out=dW[r])
    return dW.to(dtype)
