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
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from mrplab import runtime
from mrplab.theory import net, objectives

Act = Callable[[torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]]


@functools.cache
def _compiled_act() -> Act:
    runtime.use_persistent_compile_cache()
    return torch.compile(net.act_and_grad, dynamic=False)


@functools.cache
def activation(compiled: bool) -> Act:
    """The smoothed ReLU with its derivative: eager, or fused into one kernel by torch.compile.

    Compilation happens at the first call of each shape. If it fails (no working
    C++ compiler, an unsupported platform), the run goes on with the eager
    function, which computes the same numbers, after one warning line.
    """
    if not compiled:
        return net.act_and_grad
    state: dict = {"fn": _compiled_act()}

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


class FirstCallTimer:
    """An activation that records how long one run's first call took (its compile, when it compiles then)."""

    def __init__(self, fn: Act):
        self.fn, self.first_call_s = fn, None

    def __call__(self, z: torch.Tensor, q: int, thr: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.first_call_s is not None:
            return self.fn(z, q, thr)
        t0 = time.perf_counter()
        out = self.fn(z, q, thr)
        self.first_call_s = time.perf_counter() - t0
        return out


def _probe_input(shape: tuple[int, ...], thr: float) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.5 * thr


def time_eager_act(shape: tuple[int, ...], q: int, thr: float) -> float:
    """ms per call of the eager smoothed ReLU + derivative at one chunk's shape."""
    z = _probe_input(shape, thr)
    return runtime.best_time(lambda: net.act_and_grad(z, q, thr), 0.05) * 1e3


def time_compiled_act(shape: tuple[int, ...], q: int, thr: float) -> tuple[float, float]:
    """(ms per call, seconds of the first call) of the compiled function ``activation(True)`` uses,
    so a run that probed here pays no second compile; raises if compiling fails."""
    z = _probe_input(shape, thr)
    t0 = time.perf_counter()
    _compiled_act()(z, q, thr)
    compile_s = time.perf_counter() - t0
    return runtime.best_time(lambda: _compiled_act()(z, q, thr), 0.05) * 1e3, compile_s


def _softmax_ce(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-run mean CE [R] and d(sum of losses)/d logits [R, N, k]. y [Rd, N] or [R, N]."""
    R, N, k = logits.shape
    yy = y.expand(R, N)
    logp = torch.log_softmax(logits, dim=-1)
    loss = -logp.gather(-1, yy.unsqueeze(-1)).squeeze(-1).mean(-1)  # [R]
    dlogits = logp.exp()
    dlogits.scatter_add_(-1, yy.unsqueeze(-1), -torch.ones_like(dlogits[..., :1]))
    return loss, dlogits / N


def run_chunks(R: int, per_run_elems: int, budget: int = 1 << 21) -> list[slice]:
    """Slices of the run axis whose [c, N, P, K] temporaries hold at most ``budget`` elements (8 MiB fp32).

    A step's elementwise work touches several tensors of N*P*K elements per run;
    done for all R runs at once they grow past the caches and past the
    allocator's reuse threshold (glibc returns blocks over 32 MiB to the system
    and every step page-faults them back in), so a step over R runs cost more
    than R steps over one. Runs are independent, so a step is computed chunk by
    chunk with the same numbers: a run's result never depends on which others
    are batched with it.
    """
    c = max(1, budget // max(per_run_elems, 1))
    return [slice(i, min(i + c, R)) for i in range(0, R, c)]


def chunks(X: torch.Tensor, W: torch.Tensor) -> list[slice]:
    """run_chunks for patches X [Rd, N, P, d] and kernels W [R, d, K]."""
    return run_chunks(W.shape[0], X.shape[1] * X.shape[2] * W.shape[2])


def run_rows(t: torch.Tensor, s: slice) -> torch.Tensor:
    """The runs s of a tensor with a leading run axis, or t itself when that axis is shared (size 1)."""
    return t if t.shape[0] == 1 else t[s]


def sl(X: torch.Tensor, y: torch.Tensor, W: torch.Tensor, q: int, thr: float, k: int, m: int,
       act: Act = net.act_and_grad):
    """Cross-entropy on F_i = sum of class i's kernels.

    Returns (loss [R], dW [R, d, K], fitted [R] bool: every sample classified correctly)."""
    loss, dW = W.new_empty(W.shape[0]), torch.empty_like(W)
    fitted = torch.empty(W.shape[0], dtype=torch.bool, device=W.device)
    for s in chunks(X, W):
        loss[s], dW[s], fitted[s] = _sl(run_rows(X, s), run_rows(y, s), W[s], q, thr, k, m, act)
    return loss, dW, fitted


def _sl(X, y, W, q, thr, k, m, act):
    A, G = act(net.preact(X, W), q, thr)  # [R, N, P, K]
    h = A.sum(2)  # [R, N, K]
    logits = net.sl_logits(h, k, m)  # [R, N, k]
    loss, dlogits = _softmax_ce(logits, y)
    fitted = (logits.argmax(-1) == y.expand(logits.shape[:2])).all(-1)  # [R]
    dh = dlogits.repeat_interleave(m, dim=-1)  # [R, N, K]: every kernel of class i gets dF_i
    G.mul_(dh.unsqueeze(2))  # dZ, in place of act'
    return loss, net.weight_grad(X, G), fitted


@dataclass(frozen=True)
class MRPSpec:
    """Which mask-reconstruction variant a step computes (config.MRPConfig documents each choice)."""

    target: str = "teacher"  # teacher | pixels
    scope: str = "all"  # all | masked: the patches the target pools
    norm: str = "per_kernel"  # none | per_kernel | per_run | per_sample
    power: float = 0.75  # power of the per_kernel / per_run divisor
    fit_decoder: bool = False  # the decoder set to its least-squares optimum every step
    shuffled: bool = False  # sample n gets sample n+1's target (within-sample prediction removed)

    @property
    def divisor_power(self) -> float:
        """The power of the loss's target-mean-square divisor: only per_kernel and per_run divide."""
        return self.power if self.norm in ("per_kernel", "per_run") else 0.0

    @staticmethod
    def of(cfg, q: int, fit_decoder: bool | None = None, shuffled: bool | None = None) -> "MRPSpec":
        """From a config.MRPConfig; fit_decoder / shuffled override decoder_fit / target_pairing (control runs)."""
        fit = cfg.decoder_fit == "lstsq" if fit_decoder is None else fit_decoder
        shuf = cfg.target_pairing == "shuffled" if shuffled is None else shuffled
        return MRPSpec(cfg.target, cfg.scope, cfg.target_norm, cfg.norm_power(q), fit, shuf)


@dataclass
class MRPGrads:
    loss: torch.Tensor  # [R]
    dW: torch.Tensor  # [R, d, K]
    dD: torch.Tensor  # like D
    D: torch.Tensor  # the decoder this step used (the fitted one under the control)
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
    spec: MRPSpec, W_teacher: torch.Tensor | None = None, act: Act = net.act_and_grad,
) -> MRPGrads:
    """Mask reconstruction: student on the visible patches, teacher (or pixels) as the target.

    mask [R, N, P] True = masked. W_teacher None = stop-gradient copy of the student.
    """
    parts = [_mrp(run_rows(X, s), W[s], D[s], mask[s], q, thr, spec,
                  None if W_teacher is None else W_teacher[s], act)
             for s in chunks(X, W)]
    if len(parts) == 1:
        return parts[0]
    return MRPGrads(
        loss=torch.cat([p.loss for p in parts]), dW=torch.cat([p.dW for p in parts]),
        dD=torch.cat([p.dD for p in parts]), D=torch.cat([p.D for p in parts]),
        pred_var=torch.cat([p.pred_var for p in parts]),
        target_var=None if parts[0].target_var is None else torch.cat([p.target_var for p in parts]),
    )


def _mrp(X, W, D, mask, q, thr, spec: MRPSpec, W_teacher, act) -> MRPGrads:
    A, G = act(net.preact(X, W), q, thr)  # [R, N, P, K]
    keep = (~mask).unsqueeze(-1).to(A.dtype)  # [R, N, P, 1]
    h_s = (A * keep).sum(2)  # [R, N, K] student sees visible patches only
    target_var = None
    if spec.target == "teacher":
        A_t = A if W_teacher is None else act(net.preact(X, W_teacher), q, thr)[0]  # teacher, full input
        t = A_t.sum(2) if spec.scope == "all" else (A_t * (1.0 - keep)).sum(2)  # [R, N, K]
        if spec.shuffled:
            t = t.roll(-1, dims=1)  # sample n's target is sample n+1's
        t = objectives.normalise_target(t, spec.norm)
        if spec.fit_decoder:
            D = objectives.fit_decoder(h_s, t, "full" if D.dim() == 3 else "diag")
        pred = net.decode(h_s, D)
        loss, dpred = _sq_error_grad(pred, t, spec.divisor_power, spec.norm == "per_kernel")
        if D.dim() == 3:
            dD = torch.bmm(h_s.transpose(1, 2), dpred)  # [R, K, K]
            dh = torch.bmm(dpred, D.transpose(1, 2))  # [R, N, K]
        else:
            dD = (dpred * h_s).sum(1)  # [R, K]
            dh = dpred * D.unsqueeze(1)
        target_var = t.var(dim=1).mean(-1)
    else:
        Xf = X.float().expand(mask.shape[0], *X.shape[1:])
        sel = mask if spec.scope == "masked" else torch.ones_like(mask)
        t = torch.einsum("rnp,rnpd->rnd", sel.to(Xf.dtype), Xf)  # content of the patches in scope
        if spec.shuffled:
            t = t.roll(-1, dims=1)
        if spec.fit_decoder:
            D = objectives.fit_decoder(h_s, t, "full")
        pred = torch.bmm(h_s, D)  # [R, N, d] pixel decoder D [R, K, d]
        loss, dpred = _sq_error_grad(pred, t, spec.divisor_power, per_channel=False)
        dD = torch.bmm(h_s.transpose(1, 2), dpred)  # [R, K, d]
        dh = torch.bmm(dpred, D.transpose(1, 2))  # [R, N, K]
    G.mul_(keep).mul_(dh.unsqueeze(2))  # dZ: only visible patches reach the student's output
    return MRPGrads(loss=loss, dW=net.weight_grad(X, G), dD=dD, D=D, target_var=target_var,
                    pred_var=pred.var(dim=1).mean(-1))


@torch.no_grad()
def encode(X: torch.Tensor, W: torch.Tensor, q: int, thr: float) -> torch.Tensor:
    """Encoder outputs h [R, N, K] for evaluation and probes, computed run chunk by run chunk."""
    h = W.new_empty(W.shape[0], X.shape[1], W.shape[2])
    for s in chunks(X, W):
        h[s] = net.smoothed_relu(net.preact(run_rows(X, s), W[s]), q, thr).sum(2)
    return h


def head(h: torch.Tensor, y: torch.Tensor, hd: net.LinearHead):
    """Linear head on fixed encoder outputs h [R, N, K]: (loss, dH, db)."""
    hs = (h - hd.center) / hd.scale
    loss, dlogits = _softmax_ce(torch.bmm(hs, hd.H) + hd.b.unsqueeze(1), y)
    return loss, torch.bmm(hs.transpose(1, 2), dlogits), dlogits.sum(1)


def finetune(X: torch.Tensor, y: torch.Tensor, W: torch.Tensor, hd: net.LinearHead, q: int, thr: float,
             act: Act = net.act_and_grad):
    """Encoder + linear head: (loss, dW, dH, db)."""
    loss, dW = W.new_empty(W.shape[0]), torch.empty_like(W)
    dH, db = torch.empty_like(hd.H), torch.empty_like(hd.b)
    for s in chunks(X, W):
        loss[s], dW[s], dH[s], db[s] = _finetune(run_rows(X, s), run_rows(y, s), W[s], hd.runs(s), q, thr, act)
    return loss, dW, dH, db


def _finetune(X, y, W, hd, q, thr, act):
    A, G = act(net.preact(X, W), q, thr)
    h = A.sum(2)
    hs = (h - hd.center) / hd.scale
    loss, dlogits = _softmax_ce(torch.bmm(hs, hd.H) + hd.b.unsqueeze(1), y)
    dH = torch.bmm(hs.transpose(1, 2), dlogits)
    dh = torch.bmm(dlogits, hd.H.transpose(1, 2)) / hd.scale  # [R, N, K]
    G.mul_(dh.unsqueeze(2))
    return loss, net.weight_grad(X, G), dH, dlogits.sum(1)
