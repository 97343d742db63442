"""Hand-derived gradients (theory/steps.py) against autograd through the reference functions."""

from __future__ import annotations

import warnings

import pytest
import torch

from mrplab.rng import generator
from mrplab.theory import net, steps
from mrplab.theory.objectives import cross_entropy, make_run_masks, mae_pixel_loss, mrp_teacher_loss

R, N, P, d, k, m = 2, 12, 6, 10, 3, 2
K = k * m
Q, THR = 4, 1.0


def _setup(Rd: int, seed: int = 0, scale: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(Rd, N, P, d, generator=g, dtype=torch.float64)
    # weights large enough that patches land on all three pieces of the smoothed ReLU
    W = scale * torch.randn(R, d, K, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (Rd, N), generator=g)
    mask = make_run_masks([generator(s, "m") for s in range(R)], N, P, 0.5)
    return X, W, y, mask


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5):
    err = (a - b).abs().max() / b.abs().max().clamp(min=1e-30)
    assert err < rel, float(err)


def test_act_and_grad_matches_reference():
    z = torch.linspace(-2, 3, 1001, dtype=torch.float64)
    for q in (2, 3, 4, 5):
        for thr in (0.5, 1.0, 2.0):
            a, g = net.act_and_grad(z, q, thr)
            torch.testing.assert_close(a, net.smoothed_relu(z, q, thr), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(g, net.smoothed_relu_grad(z, q, thr), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("Rd", [1, R])
def test_weight_grad_is_the_transpose_of_preact(Rd):
    X, W, _, _ = _setup(Rd)
    dZ = torch.randn(R, N, P, K, dtype=torch.float64)
    Wr = W.clone().requires_grad_(True)
    (net.preact(X, Wr) * dZ).sum().backward()
    _close(net.weight_grad(X, dZ).double(), Wr.grad, 1e-10)


@pytest.mark.parametrize("Rd", [1, R])
def test_sl_gradient_matches_autograd(Rd):
    X, W, y, _ = _setup(Rd)
    Wr = W.clone().requires_grad_(True)
    ref = cross_entropy(net.sl_logits(net.encode(X, Wr, Q, THR), k, m), y)
    ref.sum().backward()
    loss, dW = steps.sl(X, y, W, Q, THR, k, m)
    torch.testing.assert_close(loss, ref.detach())
    _close(dW.double(), Wr.grad)


@pytest.mark.parametrize("decoder", ["full", "diag"])
@pytest.mark.parametrize("power,per_kernel", [(0.0, True), (0.75, True), (0.75, False), (1.0, True)])
@pytest.mark.parametrize("ema", [False, True])
def test_mrp_teacher_gradient_matches_autograd(decoder, power, per_kernel, ema):
    X, W, _, mask = _setup(R)
    D = net.init_decoder(R, K, decoder).double() + 0.1 * torch.randn(R, K, K if decoder == "full" else 1,
                                                                      dtype=torch.float64).squeeze(-1)
    W_t = (W + 0.05 * torch.randn_like(W)) if ema else None
    Wr, Dr = W.clone().requires_grad_(True), D.clone().requires_grad_(True)
    h_s = net.encode(X, Wr, Q, THR, keep=~mask)
    target = net.encode(X, W_t if ema else Wr, Q, THR).detach()
    ref = mrp_teacher_loss(net.decode(h_s, Dr), target, power, per_kernel)
    ref.sum().backward()
    out = steps.mrp(X, W, D, mask, Q, THR, "teacher", power, per_kernel, W_t)
    torch.testing.assert_close(out.loss, ref.detach())
    _close(out.dW.double(), Wr.grad)
    _close(out.dD, Dr.grad)


def test_mae_pixel_gradient_matches_autograd():
    X, W, _, mask = _setup(1)
    D = 0.1 * torch.randn(R, K, d, dtype=torch.float64)
    Wr, Dr = W.clone().requires_grad_(True), D.clone().requires_grad_(True)
    ref = mae_pixel_loss(torch.bmm(net.encode(X, Wr, Q, THR, keep=~mask), Dr), X, mask, 0.75)
    ref.sum().backward()
    out = steps.mrp(X, W, D, mask, Q, THR, "pixels", 0.75, False)
    torch.testing.assert_close(out.loss, ref.detach())
    _close(out.dW.double(), Wr.grad)
    _close(out.dD, Dr.grad)


def test_finetune_and_head_gradients_match_autograd():
    X, W, y, _ = _setup(R)
    h0 = net.encode(X, W, Q, THR)
    hd = net.init_linear_head(h0, k, True, [generator(s, "head") for s in range(R)])
    Wr = W.clone().requires_grad_(True)
    H, b = hd.H.clone().requires_grad_(True), hd.b.clone().requires_grad_(True)
    ref_head = net.LinearHead(H=H, b=b, center=hd.center, scale=hd.scale)
    ref = cross_entropy(ref_head(net.encode(X, Wr, Q, THR)), y)
    ref.sum().backward()
    loss, dW, dH, db = steps.finetune(X, y, W, hd, Q, THR)
    torch.testing.assert_close(loss, ref.detach())
    _close(dW.double(), Wr.grad)
    _close(dH, H.grad)
    _close(db, b.grad)
    H.grad = None
    b.grad = None
    cross_entropy(ref_head(h0), y).sum().backward()
    _, dH2, db2 = steps.head(h0, y, hd)
    _close(dH2, H.grad)
    _close(db2, b.grad)


def test_failed_compilation_falls_back_to_eager_with_one_warning(monkeypatch):
    """A machine where torch.compile cannot build a kernel still runs, with the eager numbers."""
    from mrplab.theory import net, steps

    def broken_compile(fn, **kw):
        def fails(*a):
            raise RuntimeError("no C++ compiler found\ndetails")
        return fails

    steps.activation.cache_clear()
    steps._compiled_act.cache_clear()
    monkeypatch.setattr(torch, "compile", broken_compile)
    try:
        act = steps.activation(True)
        z = torch.randn(2, 3, 4, 5)
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
            a, g = act(z, 3, 1.0)
        ea, eg = net.act_and_grad(z, 3, 1.0)
        assert torch.equal(a, ea) and torch.equal(g, eg)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the warning is given once, later calls are eager
            act(z, 3, 1.0)
    finally:
        steps.activation.cache_clear()
        steps._compiled_act.cache_clear()
