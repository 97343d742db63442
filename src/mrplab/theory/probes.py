"""Probes: which kernel captured which feature, purity, noise memorisation, per-view accuracy.

"Kernel r captures feature v_{i,l}" is read off the capture matrix
C[r, i, l] = <w_r, v_{i,l}>; feature (i, l) is captured when
Phi_{i,l} = max_r C[r, i, l] reaches the capture threshold.

The default threshold is the smoothed ReLU's threshold rho_t: a kernel with
<w_r, v> >= rho_t has left the polynomial phase and answers a patch that holds
the feature with weight ~1 linearly, i.e. it fires on that feature. Initial
correlations are ~sigma_0 * sqrt(2 ln K) (about 0.05 rho_t by default), so
crossing rho_t is a ~20x growth that noise fitting does not produce along a
feature direction. The threshold used is written into summary.json.
"""

from __future__ import annotations

from typing import Callable

import torch

from mrplab.theory.data import FeatureBank, MultiViewData


def capture_matrix(W: torch.Tensor, bank: FeatureBank) -> torch.Tensor:
    """C[r, k, i, l] = <w_{r,k}, v_{i,l}>: [R, K, k_total, L]."""
    return torch.einsum("rdk,ild->rkil", W.float(), bank.V.to(W.device))


def phi(C: torch.Tensor) -> torch.Tensor:
    """Phi_{i,l} = max over kernels of C: [R, k_total, L]."""
    return C.amax(dim=1)


def captured(C: torch.Tensor, thr: float) -> torch.Tensor:
    """Bool [R, k_total, L]: some kernel correlates with the feature at least thr."""
    return phi(C) >= thr


def kernel_purity(C: torch.Tensor, thr: float) -> torch.Tensor:
    """How many features each kernel captures: [R, K] counts."""
    return (C >= thr).flatten(2).sum(-1)


def noise_max(Z: torch.Tensor, coef: torch.Tensor, Cf: torch.Tensor) -> torch.Tensor:
    """max over samples, patches and kernels of Z - coef @ Cf: [R]. Z [R, N, P, K] (any float dtype, any
    layout), coef [Rc, N, P, F] (Rc = 1: shared by the runs, or R), Cf [R, F, K]. Computed as -min(signal - Z)
    in place in the fp32 signal (negation is exact: the same number as max(Z - signal), one buffer)."""
    R = Z.shape[0]
    signal = torch.matmul(coef.expand(R, *coef.shape[1:]).flatten(1, 2), Cf).view(Z.shape)  # [R, N, P, K]
    return signal.sub_(Z).flatten(1).amin(-1).neg()


def noise_memorisation(Z: torch.Tensor, data: MultiViewData, C: torch.Tensor,
                       kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = noise_max) -> torch.Tensor:
    """max over samples, patches and kernels of <w_r, xi_p>: [R].

    Z = X W [R, N, P, K] (any float dtype, any layout) is already at hand; the feature part of it
    is coef @ C, so the noise part is Z - coef @ C without forming xi. ``kernel`` computes that max:
    noise_max, or the run's fused pass (steps.PatchOps.noise_max: one read of Z, no [R, N, P, K]
    buffer; its sums over features round in their own order, so it agrees to float rounding).
    """
    R, K = C.shape[0], C.shape[1]
    return kernel(Z, data.coef, C.reshape(R, K, -1).transpose(1, 2))


def accuracy_by_view(logits: torch.Tensor, data: MultiViewData) -> dict[str, torch.Tensor]:
    """Test accuracy per run, overall and split by view: each [R] (nan where a split is empty)."""
    R = logits.shape[0]
    correct = (logits.argmax(-1) == data.y.expand(R, -1)).float()  # [R, N]
    single = data.single_view.expand(R, -1)
    out = {"acc": correct.mean(-1)}
    for name, sel in (("acc_multi", ~single), ("acc_single", single)):
        n = sel.sum(-1)
        out[name] = torch.where(n > 0, (correct * sel).sum(-1) / n.clamp(min=1), torch.full_like(n, float("nan"), dtype=torch.float))
    return out


def sl_lottery(C0: torch.Tensor, C1: torch.Tensor, k: int, m: int, thr: float) -> dict[str, torch.Tensor]:
    """Which feature of each class won SL, and was it the one with the larger initial correlation?

    C0, C1: capture matrices at init and at the end, [R, K, k_total, L]. Only
    class i's own kernels (r = i*m .. i*m+m-1) feed F_i, so the lottery is read
    on them. Returns per run and class: captured count, winner, predicted
    winner (argmax of the initial own-kernel correlation), and per run the share
    of classes with a winner whose winner was predicted.
    """
    R, K, _, L = C0.shape
    idx = torch.arange(k)
    own0 = C0[:, :, :k, :].reshape(R, k, m, k, L)[:, idx, :, idx, :]  # [k, R, m, L]
    own1 = C1[:, :, :k, :].reshape(R, k, m, k, L)[:, idx, :, idx, :]
    init_phi = own0.amax(2).permute(1, 0, 2)  # [R, k, L]
    final_phi = own1.amax(2).permute(1, 0, 2)  # [R, k, L]
    n_captured = (final_phi >= thr).sum(-1)  # [R, k]
    winner = final_phi.argmax(-1)  # [R, k]
    predicted = init_phi.argmax(-1)
    has_winner = n_captured >= 1
    hit = (winner == predicted) & has_winner
    share = hit.sum(-1).float() / has_winner.sum(-1).clamp(min=1).float()
    share = torch.where(has_winner.any(-1), share, torch.full_like(share, float("nan")))
    return {
        "captured_per_class": n_captured,
        "winner": winner,
        "predicted": predicted,
        "lottery_hit_rate": share,
        "init_phi": init_phi,
        "final_phi": final_phi,
    }


def alignment(W: torch.Tensor, bank: FeatureBank) -> torch.Tensor:
    """cos(w_r, v_{i,l}) maximised over kernels, per feature: [R, k_total, L].

    The direction part of capture: it can grow while the kernels' norms do not (as under the
    fitted-decoder control). At init it is ~sqrt(2 ln K / d) (0.17 at K = 80, d = 300)."""
    Wn = W.float() / W.float().norm(dim=1, keepdim=True).clamp(min=1e-30)
    return capture_matrix(Wn, bank).amax(dim=1)


def pure_kernels(C: torch.Tensor, thr: float) -> dict[str, torch.Tensor]:
    """Kernels that capture exactly one feature (pure) versus several (fused).

    C [R, K, k_total, L]. Returns per run: capturing, pure and fused kernel counts [R], and
    held_by_pure [R, k_total, L] bool: some pure kernel captures the feature.
    """
    hits = C >= thr  # [R, K, k_total, L]
    count = hits.flatten(2).sum(-1)  # [R, K]
    pure = count == 1
    held = (hits & pure[:, :, None, None]).any(1)
    return {"capturing": (count > 0).sum(-1), "pure": pure.sum(-1), "fused": (count > 1).sum(-1),
            "held_by_pure": held}


def representation_health(h: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse diagnostics of encoder outputs h [R, N, K]: per run the spread (mean over kernels of
    the std over samples) and the effective rank (participation ratio of the centred outputs'
    singular values: K for K equal independent directions, 1 for one direction)."""
    hc = (h - h.mean(1, keepdim=True)).double()
    spread = hc.pow(2).mean(1).sqrt().mean(-1)  # [R]
    s2 = torch.linalg.svdvals(hc).pow(2)  # [R, min(N, K)]
    rank = s2.sum(-1).pow(2) / s2.pow(2).sum(-1).clamp(min=1e-300)
    return {"spread": spread.float(), "effective_rank": torch.where(s2.sum(-1) > 0, rank, torch.zeros_like(rank)).float()}


def share_classes_one_feature(C: torch.Tensor, k: int, m: int, thr: float) -> torch.Tensor:
    """Share of classes whose own kernels capture exactly one of their features at threshold thr: [R]."""
    lot = sl_lottery(C, C, k, m, thr)
    return (lot["captured_per_class"] == 1).float().mean(-1)
