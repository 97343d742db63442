"""One training step: per-run losses and their hand-derived gradients, no autograd graph.

Each function returns the per-run loss [R] and the gradients of the summed
loss. The math follows net.py and objectives.py exactly; tests check every
gradient against autograd through those reference functions.

Cost per step: one matmul Z = X W (teacher and student share it when the
teacher is the stop-gradient student), the smoothed ReLU and its derivative
in one pass, and one matmul dW = X^T dZ.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from mrplab.theory import net

Act = Callable[[torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]]


@functools.cache
def activation(compiled: bool) -> Act:
    """The smoothed ReLU with its derivative: eager, or fused into one kernel by torch.compile.

    Compilation happens at the first call of each shape. If it fails (no working
    C++ compiler, an unsupported platform), the run goes on with the eager
    function, which computes the same numbers, after one warning line.
    """
    if not compiled:
        return net.act_and_grad
    fused = torch.compile(net.act_and_grad, dynamic=False)
    state = {"fn": fused}

    def act(z: torch.Tensor, q: int, thr: float) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return state["fn"](z, q, thr)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the same math, eagerly
            if state["fn"] is net.act_and_grad:
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(f"torch.compile failed ({first[:200]}); continuing with the eager smoothed ReLU "
                          "(set compile=false to skip compiling)", RuntimeWarning, stacklevel=2)
            state["fn"] = net.act_and_grad
            return net.act_and_grad(z, q, thr)

    return act


def _softmax_ce(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-run mean CE [R] and d(sum of losses)/d logits [R, N, k]. y [Rd, N] or [R, N]."""
    R, N, k = logits.shape
    yy = y.expand(R, N)
    logp = torch.log_softmax(logits, dim=-1)
    loss = -logp.gather(-1, yy.unsqueeze(-1)).squeeze(-1).mean(-1)  # [R]
    dlogits = logp.exp()
    dlogits.scatter_add_(-1, yy.unsqueeze(-1), -torch.ones_like(dlogits[..., :1]))
    return loss, dlogits / N


def sl(X: torch.Tensor, y: torch.Tensor, W: torch.Tensor, q: int, thr: float, k: int, m: int,
       act: Act = net.act_and_grad):
    """Cross-entropy on F_i = sum of class i's kernels. Returns (loss [R], dW [R, d, K])."""
    A, G = act(net.preact(X, W), q, thr)  # [R, N, P, K]
    h = A.sum(2)  # [R, N, K]
    loss, dlogits = _softmax_ce(net.sl_logits(h, k, m), y)  # [R, N, k]
    dh = dlogits.repeat_interleave(m, dim=-1)  # [R, N, K]: every kernel of class i gets dF_i
    G.mul_(dh.unsqueeze(2))  # dZ, in place of act'
    return loss, net.weight_grad(X, G)


@dataclass
class MRPGrads:
    loss: torch.Tensor  # [R]
    dW: torch.Tensor  # [R, d, K]
    dD: torch.Tensor  # like D
    target_var: torch.Tensor | None
    pred_var: torch.Tensor


def _sq_error_grad(pred: torch.Tensor, target: torch.Tensor, power: float, per_channel: bool):
    """objectives._normalised_sq_error and its gradient wrt pred. pred, target [R, N, C]."""
    N = pred.shape[1]
    diff = pred - target
    scale = torch.ones_like(diff[:, :1, :])  # [R, 1, C]
    if power != 0:
        ms = target.pow(2).mean(1, keepdim=True)  # [R, 1, C]
        if not per_channel:
            ms = ms.sum(-1, keepdim=True)
        scale = ms.clamp(min=1e-30).pow(-power).expand_as(scale)
    loss = (diff.pow(2).mean(1, keepdim=True) * scale).sum((1, 2))  # [R]
    return loss, diff * (2.0 * scale / N)


def mrp(
    X: torch.Tensor, W: torch.Tensor, D: torch.Tensor, mask: torch.Tensor, q: int, thr: float,
    target: str, power: float, per_kernel: bool, W_teacher: torch.Tensor | None = None,
    act: Act = net.act_and_grad,
) -> MRPGrads:
    """Mask reconstruction: student on the visible patches, teacher (or pixels) as the target.

    mask [R, N, P] True = masked. W_teacher None = stop-gradient copy of the student.
    """
    A, G = act(net.preact(X, W), q, thr)  # [R, N, P, K]
    keep = (~mask).unsqueeze(-1).to(A.dtype)  # [R, N, P, 1]
    h_s = (A * keep).sum(2)  # [R, N, K] student sees visible patches only
    target_var = None
    if target == "teacher":
        if W_teacher is None:
            t = A.sum(2)  # [R, N, K] teacher = the student on the full input, no gradient
        else:
            t = act(net.preact(X, W_teacher), q, thr)[0].sum(2)
        pred = net.decode(h_s, D)
        loss, dpred = _sq_error_grad(pred, t, power, per_kernel)
        if D.dim() == 3:
            dD = torch.bmm(h_s.transpose(1, 2), dpred)  # [R, K, K]
            dh = torch.bmm(dpred, D.transpose(1, 2))  # [R, N, K]
        else:
            dD = (dpred * h_s).sum(1)  # [R, K]
            dh = dpred * D.unsqueeze(1)
        target_var = t.var(dim=1).mean(-1)
    else:
        pred = torch.bmm(h_s, D)  # [R, N, d] pixel decoder D [R, K, d]
        Xf = X.float().expand(mask.shape[0], *X.shape[1:])
        t = torch.einsum("rnp,rnpd->rnd", mask.to(Xf.dtype), Xf)  # content of the masked patches
        loss, dpred = _sq_error_grad(pred, t, power, per_channel=False)
        dD = torch.bmm(h_s.transpose(1, 2), dpred)  # [R, K, d]
        dh = torch.bmm(dpred, D.transpose(1, 2))  # [R, N, K]
    G.mul_(keep).mul_(dh.unsqueeze(2))  # dZ: only visible patches reach the student's output
    return MRPGrads(loss=loss, dW=net.weight_grad(X, G), dD=dD, target_var=target_var,
                    pred_var=pred.var(dim=1).mean(-1))


def head(h: torch.Tensor, y: torch.Tensor, hd: net.LinearHead):
    """Linear head on fixed encoder outputs h [R, N, K]: (loss, dH, db)."""
    hs = (h - hd.center) / hd.scale
    loss, dlogits = _softmax_ce(torch.bmm(hs, hd.H) + hd.b.unsqueeze(1), y)
    return loss, torch.bmm(hs.transpose(1, 2), dlogits), dlogits.sum(1)


def finetune(X: torch.Tensor, y: torch.Tensor, W: torch.Tensor, hd: net.LinearHead, q: int, thr: float,
             act: Act = net.act_and_grad):
    """Encoder + linear head: (loss, dW, dH, db)."""
    A, G = act(net.preact(X, W), q, thr)
    h = A.sum(2)
    hs = (h - hd.center) / hd.scale
    loss, dlogits = _softmax_ce(torch.bmm(hs, hd.H) + hd.b.unsqueeze(1), y)
    dH = torch.bmm(hs.transpose(1, 2), dlogits)
    dh = torch.bmm(dlogits, hd.H.transpose(1, 2)) / hd.scale  # [R, N, K]
    G.mul_(dh.unsqueeze(2))
    return loss, net.weight_grad(X, G), dH, dlogits.sum(1)
