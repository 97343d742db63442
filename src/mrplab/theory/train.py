"""Training loops: supervised from scratch, mask-reconstruction pretraining, fine-tuning.

Plain (full-batch or mini-batch) gradient descent, R runs at once, with the
hand-derived gradients of steps.py (no autograd graph). Each run's loss is its
own mean and its gradient touches only its own weights, so runs never mix. The loops know nothing of probes: at every logged step
they call ``hooks.log(phase, step, state)`` and the caller measures what it wants.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from mrplab.config import FinetuneConfig, MRPConfig, NetConfig, SLConfig
from mrplab.divergence import Guard, weight_norm
from mrplab.theory import net, steps
from mrplab.theory.data import MultiViewData
from mrplab.theory.objectives import make_run_masks


class Hooks(Protocol):
    def log(self, phase: str, step: int, state: dict[str, torch.Tensor]) -> None: ...
    def advance(self, n: int = 1) -> None: ...


@dataclass
class RunGens:
    """Per-run generators for the stochastic parts of training (masks, batches, heads)."""

    mask: list[torch.Generator]
    batch: list[torch.Generator]
    head: list[torch.Generator] = field(default_factory=list)


def _is_log_step(t: int, steps: int, every: int) -> bool:
    return t % every == 0 or t == steps


def _select(data: MultiViewData, idx: torch.Tensor | None, Xt: torch.Tensor | None = None,
            runs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Patches, labels and transposed patches (``Xt`` = net.transposed_patches(data.X) of the full
    set, or None) of a batch: idx [R, B] per-run sample indices, or None for the full set. ``runs``:
    idx holds the batches of these runs only (the others' rows are left out)."""
    if idx is None:
        return data.X, data.y, Xt
    if runs is None:
        runs = torch.arange(idx.shape[0], device=idx.device)
    rows = (runs if data.X.shape[0] > 1 else torch.zeros_like(runs)).unsqueeze(1)  # shared data: row 0
    return data.X[rows, idx], data.y[rows, idx], None  # [len(runs), B, P, d], [len(runs), B]


def _full_set_t(data: MultiViewData, bs: int | None) -> torch.Tensor | None:
    """net.transposed_patches of the full set when every step uses it (bs None or >= n, as _batch_idx)."""
    return net.transposed_patches(data.X) if bs is None or bs >= data.n else None


def _batch_idx(gens: list[torch.Generator], n: int, bs: int | None, device: torch.device) -> torch.Tensor | None:
    if bs is None or bs >= n:
        return None
    return torch.stack([torch.randperm(n, generator=g)[:bs] for g in gens]).to(device)  # [R, B]


# --------------------------------------------------------------------------- supervised from scratch


@dataclass
class SLResult:
    W: torch.Tensor  # [R, d, K]
    steps: torch.Tensor  # [R] steps each run trained
    fitted: torch.Tensor  # [R] bool: every training sample classified correctly at the end


def train_sl(
    W0: torch.Tensor, data: MultiViewData, cfg: SLConfig, netc: NetConfig, k: int, gens: RunGens,
    hooks: Hooks, log_every: int, ops: steps.PatchOps = steps.EAGER,
) -> SLResult:
    """Cross-entropy on F_i = sum of class i's kernels.

    Every run trains ``cfg.steps`` steps; with ``until_fit`` a run that does not yet classify every
    training sample correctly goes on, up to ``max_steps``, and stops at the first step where it does
    (its kernels then stay as they are while other runs finish), so a run's result never depends on
    which other runs share the batch.

    Only the runs still training are computed: once a run has finished, a step covers the others
    (their rows of the data gathered once per change of that set), so a batch of R runs costs the sum
    of its runs' steps, not R times the longest run's. A finished run's logged loss stays that of its
    last step (the same number: its kernels and, with full-batch steps, its data no longer change).
    """
    W = W0.clone()
    R = W.shape[0]
    q, thr = netc.q, netc.threshold
    last = max(cfg.max_steps, cfg.steps) if cfg.until_fit else cfg.steps
    done = torch.zeros(R, dtype=torch.bool, device=W.device)
    taken = torch.full((R,), last, dtype=torch.long)
    fitted = torch.zeros(R, dtype=torch.bool, device=W.device)
    guard = Guard("supervised training", "sl.lr")
    live: torch.Tensor | None = None  # the runs still training, once one has finished (None: all)
    whole = (data.X, data.y, _full_set_t(data, cfg.batch_size))  # the full set: patches, labels, transposed
    full = whole  # its rows of the live runs
    for t in range(last + 1):
        idx = _batch_idx(gens.batch, data.n, cfg.batch_size, W.device)
        X, y, Xt_b = full if idx is None else _select(data, idx if live is None else idx[live], runs=live)
        W_live = W if live is None else W[live]
        loss_l, dW, fits_l = steps.sl(X, y, W_live, q, thr, k, netc.m, ops, Xt_b)  # [L], [L, d, K], [L]
        if live is None:
            loss, fits = loss_l, fits_l
        else:
            # out of place: a logged loss tensor from an earlier step stays as it was
            loss, fits = loss.index_put((live,), loss_l), torch.zeros_like(done).index_put_((live,), fits_l)
        guard.check(t, loss, weight_norm(W, runs=True))
        fitted = torch.where(done, fitted, fits)
        if t >= cfg.steps:
            newly = ~done & fits if cfg.until_fit else ~done
            taken[newly.cpu()] = t
            done |= newly
        stop = t == last or bool(done.all())
        if _is_log_step(t, cfg.steps, log_every) or stop:
            hooks.log("sl", t, {"W": W, "loss": loss})
        if stop:
            break
        if not bool(done.any()):
            W.sub_(dW, alpha=cfg.lr)
        else:
            rows = torch.arange(R, device=W.device) if live is None else live  # this step's runs
            still = ~done[rows]
            if not bool(still.all()):  # some finished at this step: train on without them
                live = rows[still]
                full = tuple(steps.rows_or_none(a, live) for a in whole)
            W[live] = W_live[still].sub_(dW[still], alpha=cfg.lr)
        hooks.advance()
    return SLResult(W=W, steps=taken, fitted=fitted)


# --------------------------------------------------------------------------- mask-reconstruction pretraining


@dataclass
class MRPResult:
    W: torch.Tensor  # [R, d, K] encoder
    D: torch.Tensor  # decoder: [R, K, K] or [R, K] (teacher target), [R, K, d] (pixels)


def pretrain_mrp(
    W0: torch.Tensor, data: MultiViewData, cfg: MRPConfig, netc: NetConfig, gens: RunGens,
    hooks: Hooks, log_every: int, ops: steps.PatchOps = steps.EAGER, fit_decoder: bool | None = None,
    shuffled: bool | None = None, phase: str = "mrp",
) -> MRPResult:
    """Teacher-student mask reconstruction (or its MAE pixel variant).

    Student: masked input -> encoder -> linear decoder. Teacher target: the
    encoder with EMA weights on the full input (momentum 0: the student's own
    weights under stop-gradient, so one Z = X W serves both), pooled over all
    patches or the masked ones. fit_decoder / shuffled override cfg.decoder_fit /
    cfg.target_pairing (the control runs); ``phase`` names the run in the hooks' logs.
    """
    variant = {"fit_decoder": fit_decoder, "shuffled": shuffled}
    return pretrain_mrp_variants(W0, data, cfg, netc, gens, hooks, log_every, ops, {phase: variant})[phase]


class _MRPRun:
    """One variant's state in pretrain_mrp_variants: encoder, decoder, EMA teacher, objective, guard."""

    def __init__(self, W0: torch.Tensor, cfg: MRPConfig, netc: NetConfig, phase: str, overrides: dict):
        R, d, K = W0.shape
        self.phase, self.W = phase, W0.clone()
        if cfg.target == "teacher":
            self.D = net.init_decoder(R, K, netc.decoder).to(W0.device)
        else:
            self.D = torch.zeros(R, K, d, device=W0.device)
        self.W_t = W0.clone() if cfg.ema_teacher else None
        self.spec = steps.MRPSpec.of(cfg, netc.q, overrides.get("fit_decoder"), overrides.get("shuffled"))
        self.guard = Guard("mask-reconstruction pretraining" + ("" if phase == "mrp" else f" ({phase})"), "mrp.lr")


def pretrain_mrp_variants(
    W0: torch.Tensor, data: MultiViewData, cfg: MRPConfig, netc: NetConfig, gens: RunGens,
    hooks: Hooks, log_every: int, ops: steps.PatchOps, variants: dict[str, dict],
) -> dict[str, MRPResult]:
    """pretrain_mrp for several variants at once, by phase name: {phase: {"fit_decoder": ..., "shuffled": ...}}
    (None = the config's choice). They share the initial weights, the data and the masks, so each step
    draws its batch and its masks once for all of them (the mask draw costs ~0.1 ms per run and step), and with
    the stop-gradient teacher their matmuls run as one (steps.mrp_variants); every variant's numbers are those
    it gets trained alone (bitwise where the BLAS rounds a column of the wide product as the narrow one)."""
    q, thr = netc.q, netc.threshold
    runs = [_MRPRun(W0, cfg, netc, phase, overrides) for phase, overrides in variants.items()]
    dec_lr = cfg.decoder_lr if cfg.decoder_lr is not None else cfg.lr
    P = data.X.shape[-2]
    Xt = _full_set_t(data, cfg.batch_size)
    for t in range(cfg.steps + 1):
        idx = _batch_idx(gens.batch, data.n, cfg.batch_size, W0.device)
        X, _, Xt_b = _select(data, idx, Xt)
        mask = make_run_masks(gens.mask, X.shape[1], P, cfg.mask_ratio, W0.device)  # [R, N, P] True = masked
        if runs[0].W_t is None:  # one student serves as its own teacher: the variants' matmuls run as one
            outs = steps.mrp_variants(X, [run.W for run in runs], [run.D for run in runs], mask, q, thr,
                                      [run.spec for run in runs], ops, Xt_b)
        else:
            outs = [steps.mrp(X, run.W, run.D, mask, q, thr, run.spec, run.W_t, ops, Xt_b) for run in runs]
        for run, out in zip(runs, outs):
            W, spec = run.W, run.spec
            run.guard.check(t, out.loss, weight_norm(W, runs=True))
            if spec.fit_decoder:
                run.D = out.D  # the least-squares decoder for the current encoder
            if _is_log_step(t, cfg.steps, log_every):
                state = {"W": W, "D": run.D, "loss": out.loss, "pred_var": out.pred_var}
                if out.target_var is not None:
                    state["target_var"] = out.target_var
                hooks.log(run.phase, t, state)
            if t == cfg.steps:
                continue
            W.sub_(out.dW, alpha=cfg.lr)
            if not spec.fit_decoder:
                run.D.sub_(out.dD, alpha=dec_lr)
            if run.W_t is not None:
                tau = cfg.momentum(t + 1)
                run.W_t.mul_(tau).add_(W, alpha=1.0 - tau)
        if t < cfg.steps:
            hooks.advance(len(runs))  # one step of every variant
    return {run.phase: MRPResult(W=run.W, D=run.D) for run in runs}


# --------------------------------------------------------------------------- fine-tuning


@dataclass
class FinetuneResult:
    W: torch.Tensor  # [R, d, K]
    head: net.LinearHead


def finetune(
    W0: torch.Tensor, data: MultiViewData, cfg: FinetuneConfig, netc: NetConfig, k: int, gens: RunGens,
    hooks: Hooks, log_every: int, ops: steps.PatchOps = steps.EAGER,
) -> FinetuneResult:
    """Pretrained encoder + linear head on the labelled data.

    lp_ft: train the head on the frozen encoder (linear probe), then everything
    with a small encoder lr; ft: everything from a random head; lp: head only.
    """
    q, thr = netc.q, netc.threshold
    with torch.no_grad():
        h_full = steps.encode(data.X, W0, q, thr, ops)  # [R, N, K]
    head = net.init_linear_head(h_full, k, cfg.standardize, gens.head if cfg.mode == "ft" else None)
    W = W0.clone()

    if cfg.mode in ("lp", "lp_ft"):
        guard = Guard("linear probing", "finetune.lp_lr")
        for t in range(cfg.lp_steps + 1):
            idx = _batch_idx(gens.batch, data.n, cfg.batch_size, W.device)
            if idx is None:
                h, y = h_full, data.y
            else:
                rows = torch.arange(idx.shape[0]).unsqueeze(1)
                h, y = h_full[rows, idx], data.y.expand(idx.shape[0], -1)[rows, idx]
            loss, dH, db = steps.head(h, y, head)
            guard.check(t, loss, weight_norm(head.H, runs=True))
            if _is_log_step(t, cfg.lp_steps, log_every):
                hooks.log("lp", t, {"W": W, "loss": loss, "head": head})
            if t == cfg.lp_steps:
                break
            head.H.sub_(dH, alpha=cfg.lp_lr)
            head.b.sub_(db, alpha=cfg.lp_lr)
            hooks.advance()

    if cfg.mode in ("ft", "lp_ft"):
        guard = Guard("fine-tuning", "finetune.ft_lr")
        Xt = _full_set_t(data, cfg.batch_size)
        for t in range(cfg.ft_steps + 1):
            idx = _batch_idx(gens.batch, data.n, cfg.batch_size, W.device)
            X, y, Xt_b = _select(data, idx, Xt)
            loss, dW, dH, db = steps.finetune(X, y, W, head, q, thr, ops, Xt_b)
            guard.check(t, loss, weight_norm(W, head.H, runs=True))
            if _is_log_step(t, cfg.ft_steps, log_every):
                hooks.log("ft", t, {"W": W, "loss": loss, "head": head})
            if t == cfg.ft_steps:
                break
            W.sub_(dW, alpha=cfg.ft_lr)
            head.H.sub_(dH, alpha=cfg.ft_head_lr)
            head.b.sub_(db, alpha=cfg.ft_head_lr)
            hooks.advance()

    return FinetuneResult(W=W, head=head)


def finetune_steps(ft: FinetuneConfig) -> dict[str, int]:
    """Steps of linear probing and of full fine-tuning that ``ft.mode`` runs (0 for a phase it skips)."""
    return {"lp": ft.lp_steps if ft.mode in ("lp", "lp_ft") else 0,
            "ft": ft.ft_steps if ft.mode in ("ft", "lp_ft") else 0}


