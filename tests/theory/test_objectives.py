"""Masks and losses: polarity, ratio, normalisation, and agreement with references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mrplab.rng import generator
from mrplab.theory import net
from mrplab.theory.objectives import cross_entropy, mae_pixel_loss, make_mask, make_run_masks, mrp_teacher_loss


NORM = {True: "per_kernel", False: "per_run"}


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
def test_make_mask_ratio_and_polarity(ratio):
    n = 200 * 50
    m = make_mask((200, 50), ratio, generator(0, "mask"))
    assert m.dtype == torch.bool and m.shape == (200, 50)
    frac = m.float().mean().item()  # True = masked, so the True fraction is the mask ratio
    assert abs(frac - ratio) <= 4 * math.sqrt(ratio * (1 - ratio) / n)


def test_make_mask_determinism():
    a = make_mask((30, 20), 0.5, generator(1, "mask"))
    b = make_mask((30, 20), 0.5, generator(1, "mask"))
    c = make_mask((30, 20), 0.5, generator(2, "mask"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # a higher ratio from the same stream masks a superset (same uniforms, larger cut)
    hi = make_mask((30, 20), 0.8, generator(1, "mask"))
    assert (hi | ~a).all()


def test_mask_polarity_in_encoder():
    """The student sees ~mask: a masked patch contributes nothing to its code."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1, 4, 6, 5, generator=g)
    W = torch.randn(1, 5, 3, generator=g)
    mask = make_mask((1, 4, 6), 0.5, generator(0, "mask"))
    h_student = net.encode(X, W, 3, 1.0, keep=~mask)
    X_visible = X.clone()
    X_visible[mask] = 0.0
    torch.testing.assert_close(h_student, net.encode(X_visible, W, 3, 1.0))


def test_make_run_masks_shape_and_independence():
    gens = [generator(s, "mask") for s in (0, 1, 2)]
    M = make_run_masks(gens, 400, 25, 0.5)
    assert M.shape == (3, 400, 25) and M.dtype == torch.bool
    # run r's mask is what its own generator alone makes
    torch.testing.assert_close(M[1], make_mask((400, 25), 0.5, generator(1, "mask")), rtol=0, atol=0)
    # independent across runs: agreement ~ r^2 + (1-r)^2 = 0.5
    n = 400 * 25
    for a, b in ((0, 1), (0, 2), (1, 2)):
        agree = (M[a] == M[b]).float().mean().item()
        assert abs(agree - 0.5) <= 4 * math.sqrt(0.25 / n)


# --------------------------------------------------------------------------- teacher loss


def test_teacher_loss_zero_when_exact():
    t = _rand(3, 10, 4, seed=1)
    for power in (0.0, 0.5, 1.0):
        for per_kernel in (True, False):
            out = mrp_teacher_loss(t.clone(), t, power, NORM[per_kernel])
            assert out.shape == (3,)
            assert (out == 0).all()


def test_teacher_loss_plain_is_mean_squared_error_sum():
    p, t = _rand(2, 7, 5, seed=2), _rand(2, 7, 5, seed=3)
    ref = (p - t).pow(2).sum(-1).mean(-1)  # sum over kernels, mean over samples, per run
    for per_kernel in (True, False):
        torch.testing.assert_close(mrp_teacher_loss(p, t, 0.0, NORM[per_kernel]), ref, rtol=1e-12, atol=0)
    # runs are separate: changing run 0 does not change run 1's loss
    p2 = p.clone()
    p2[0] += 1.0
    torch.testing.assert_close(mrp_teacher_loss(p2, t)[1], ref[1])


@pytest.mark.parametrize("per_kernel", [True, False])
def test_teacher_loss_scale_free_at_power_one(per_kernel):
    p, t = _rand(2, 9, 4, seed=4), _rand(2, 9, 4, seed=5)
    base = mrp_teacher_loss(p, t, 1.0, NORM[per_kernel])
    for c in (1e-3, 0.37, 25.0):
        torch.testing.assert_close(mrp_teacher_loss(c * p, c * t, 1.0, NORM[per_kernel]), base, rtol=1e-9, atol=0)
    # general power: the loss scales like c^(2 - 2 power)
    for power in (0.0, 0.5, 2 / 3):
        b = mrp_teacher_loss(p, t, power, NORM[per_kernel])
        torch.testing.assert_close(mrp_teacher_loss(10 * p, 10 * t, power, NORM[per_kernel]), b * 10 ** (2 - 2 * power),
                                   rtol=1e-9, atol=0)


def test_teacher_loss_per_kernel_vs_per_run():
    p, t = _rand(2, 9, 4, seed=6), _rand(2, 9, 4, seed=7)
    t[:, :, 2] *= 10.0  # kernels with very different target scales
    sq = (p - t).pow(2).mean(1)  # [R, K]
    ms = t.pow(2).mean(1)  # [R, K]
    for power in (0.5, 1.0):
        per_kernel = (sq / ms.pow(power)).sum(-1)
        per_run = sq.sum(-1) / ms.sum(-1).pow(power)
        torch.testing.assert_close(mrp_teacher_loss(p, t, power, "per_kernel"), per_kernel, rtol=1e-10, atol=0)
        torch.testing.assert_close(mrp_teacher_loss(p, t, power, "per_run"), per_run, rtol=1e-10, atol=0)
        assert not torch.allclose(per_kernel, per_run, rtol=1e-3)
    # per kernel: rescaling one kernel's pred and target together leaves the loss unchanged at power 1
    p2, t2 = p.clone(), t.clone()
    p2[:, :, 1] *= 7.0
    t2[:, :, 1] *= 7.0
    torch.testing.assert_close(mrp_teacher_loss(p2, t2, 1.0, "per_kernel"), mrp_teacher_loss(p, t, 1.0, "per_kernel"), rtol=1e-10, atol=0)
    assert not torch.allclose(mrp_teacher_loss(p2, t2, 1.0, "per_run"), mrp_teacher_loss(p, t, 1.0, "per_run"), rtol=1e-3)


def test_teacher_loss_divisor_is_detached():
    """The divisor rescales the step, never its direction: d loss / d pred = 2 (pred - t) / (N ms^power)."""
    R, N, K = 2, 6, 3
    p = _rand(R, N, K, seed=8).requires_grad_(True)
    t = _rand(R, N, K, seed=9).requires_grad_(True)  # even a target that carries grad is not differentiated in ms
    power = 0.5
    mrp_teacher_loss(p, t, power, "per_kernel").sum().backward()
    ms = t.detach().pow(2).mean(1, keepdim=True)  # [R, 1, K]
    torch.testing.assert_close(p.grad, 2 * (p.detach() - t.detach()) / N / ms.pow(power), rtol=1e-10, atol=0)
    torch.testing.assert_close(t.grad, -p.grad, rtol=1e-10, atol=0)


# --------------------------------------------------------------------------- MAE pixel loss


@pytest.mark.parametrize("Rd", [1, 2])
def test_mae_target_is_sum_of_masked_patches(Rd):
    R, N, P, d = 2, 5, 6, 4
    X = _rand(Rd, N, P, d, seed=10)
    mask = make_run_masks([generator(s, "mask") for s in range(R)], N, P, 0.5)
    assert mask.any() and (~mask).any()
    pred = _rand(R, N, d, seed=11)
    Xr = X.expand(R, N, P, d)
    target = torch.zeros(R, N, d, dtype=X.dtype)
    for r in range(R):
        for n in range(N):
            for p in range(P):
                if mask[r, n, p]:
                    target[r, n] += Xr[r, n, p]
    torch.testing.assert_close(mae_pixel_loss(pred, X, mask), (pred - target).pow(2).sum(-1).mean(-1))
    # the exact target gives zero loss
    assert (mae_pixel_loss(target, X, mask) == 0).all()
    # a per-run normalised variant divides by the run's target mean square
    ms = target.pow(2).mean(1).sum(-1)
    torch.testing.assert_close(mae_pixel_loss(pred, X, mask, 1.0), (pred - target).pow(2).mean(1).sum(-1) / ms)


def test_mae_loss_ignores_visible_patches():
    R, N, P, d = 2, 4, 5, 3
    X = _rand(R, N, P, d, seed=12)
    mask = torch.zeros(R, N, P, dtype=torch.bool)
    mask[:, :, :2] = True  # patches 0, 1 masked; 2..4 visible
    pred = _rand(R, N, d, seed=13)
    base = mae_pixel_loss(pred, X, mask)
    X2 = X.clone()
    X2[:, :, 2:] += 100.0  # change only visible patches
    torch.testing.assert_close(mae_pixel_loss(pred, X2, mask), base, rtol=0, atol=0)
    X3 = X.clone()
    X3[1, :, 0] += 1.0  # change a masked patch of run 1 only
    out = mae_pixel_loss(pred, X3, mask)
    assert out[0] == base[0]
    assert (out[1] - base[1]).abs() > 0.1


# --------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("Rd", [1, 3])
def test_cross_entropy_matches_torch_per_run(Rd):
    R, N, k = 3, 11, 4
    logits = _rand(R, N, k, seed=14)
    y = torch.randint(0, k, (Rd, N), generator=torch.Generator().manual_seed(15))
    out = cross_entropy(logits, y)
    assert out.shape == (R,)
    for r in range(R):
        yr = y[0] if Rd == 1 else y[r]
        torch.testing.assert_close(out[r], F.cross_entropy(logits[r], yr), rtol=1e-12, atol=1e-12)
    # uniform logits: log k
    torch.testing.assert_close(cross_entropy(torch.zeros(R, N, k), y), torch.full((R,), math.log(k)))
