"""The analysed network: smoothed ReLU, conv encoder, decoder and heads."""

from __future__ import annotations

import pytest
import torch

from mrplab.rng import generator
from mrplab.theory import net

QS = [2, 3, 4, 5]
THRS = [0.5, 1.0, 2.0]


def _points_away_from_kinks(thr: float, dtype=torch.float64) -> torch.Tensor:
    """Points on all three pieces, at least 0.05*thr from the kinks at 0 and thr."""
    below = torch.tensor([-3.0, -1.0, -0.3, -0.05], dtype=dtype) * thr
    inside = torch.linspace(0.05, 0.95, 19, dtype=dtype) * thr
    above = torch.tensor([1.05, 1.3, 2.0, 4.0, 10.0], dtype=dtype) * thr
    return torch.cat([below, inside, above])


# --------------------------------------------------------------------------- smoothed ReLU values


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("thr", THRS)
def test_smoothed_relu_values_on_each_piece(q, thr):
    z = _points_away_from_kinks(thr)
    out = net.smoothed_relu(z, q, thr)
    expected = torch.where(
        z <= 0, torch.zeros_like(z), torch.where(z <= thr, z**q / (q * thr ** (q - 1)), z - (1 - 1 / q) * thr)
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # piece by piece with scalars, independent of the vectorised formula above
    assert net.smoothed_relu(torch.tensor(-0.7 * thr, dtype=torch.float64), q, thr).item() == 0.0
    zi = 0.6 * thr
    assert net.smoothed_relu(torch.tensor(zi, dtype=torch.float64), q, thr).item() == pytest.approx(
        zi**q / (q * thr ** (q - 1)), rel=1e-12
    )
    za = 3.0 * thr
    assert net.smoothed_relu(torch.tensor(za, dtype=torch.float64), q, thr).item() == pytest.approx(
        za - (1 - 1 / q) * thr, rel=1e-12
    )


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("thr", THRS)
def test_smoothed_relu_continuous_at_kinks(q, thr):
    eps = 1e-9
    at = lambda v: net.smoothed_relu(torch.tensor(v, dtype=torch.float64), q, thr).item()  # noqa: E731
    assert at(0.0) == 0.0
    assert abs(at(eps) - at(-eps)) < 1e-8
    assert at(thr) == pytest.approx(thr / q, rel=1e-12)
    assert abs(at(thr + eps) - at(thr - eps)) < 1e-8
    # the derivative is continuous too: (z/thr)^(q-1) -> 1 at thr, -> 0 at 0
    g = lambda v: net.smoothed_relu_grad(torch.tensor(v, dtype=torch.float64), q, thr).item()  # noqa: E731
    assert g(thr - eps) == pytest.approx(1.0, abs=1e-6)
    assert g(thr + eps) == 1.0
    assert g(-eps) == 0.0
    assert g(eps) == pytest.approx(0.0, abs=1e-6)


def test_smoothed_relu_is_monotone_and_below_relu():
    z = torch.linspace(-2, 5, 2001, dtype=torch.float64)
    for q in QS:
        out = net.smoothed_relu(z, q, 1.0)
        assert (out.diff() >= 0).all()
        assert (out <= z.clamp(min=0) + 1e-12).all()  # the polynomial piece sits under the ReLU


# --------------------------------------------------------------------------- the derivative


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("thr", THRS)
def test_grad_matches_autograd(q, thr):
    z = _points_away_from_kinks(thr).requires_grad_(True)
    net.smoothed_relu(z, q, thr).sum().backward()
    torch.testing.assert_close(net.smoothed_relu_grad(z.detach(), q, thr), z.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("thr", THRS)
def test_grad_matches_central_differences(q, thr):
    z = _points_away_from_kinks(thr)
    h = 1e-6
    fd = (net.smoothed_relu(z + h, q, thr) - net.smoothed_relu(z - h, q, thr)) / (2 * h)
    torch.testing.assert_close(net.smoothed_relu_grad(z, q, thr), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("thr", THRS)
def test_grad_closed_form(q, thr):
    z = _points_away_from_kinks(thr)
    expected = torch.where(z <= 0, torch.zeros_like(z), torch.where(z <= thr, (z / thr) ** (q - 1), torch.ones_like(z)))
    torch.testing.assert_close(net.smoothed_relu_grad(z, q, thr), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- act: the autograd.Function


@pytest.mark.parametrize("q", [2, 3, 5])
@pytest.mark.parametrize("thr", THRS)
def test_act_forward_and_backward(q, thr):
    z = _points_away_from_kinks(thr)
    g_out = torch.linspace(-1.0, 2.0, z.numel(), dtype=torch.float64)
    zz = z.clone().requires_grad_(True)
    out = net.act(zz, q, thr)
    torch.testing.assert_close(out.detach(), net.smoothed_relu(z, q, thr), rtol=0, atol=0)
    out.backward(g_out)
    torch.testing.assert_close(zz.grad, g_out * net.smoothed_relu_grad(z, q, thr), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("thr", [0.5, 2.0])
def test_act_gradcheck(q, thr):
    z = _points_away_from_kinks(thr).reshape(4, 7).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: net.act(t, q, thr), (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_act_gradient_zero_for_negative_and_inside_float32():
    z = torch.tensor([-1.0, -1e-3, 0.25, 0.5, 2.0], requires_grad=True)
    net.act(z, 3, 1.0).sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor([0.0, 0.0, 0.0625, 0.25, 1.0]))


# --------------------------------------------------------------------------- encoder


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def test_preact_shared_equals_per_run_and_einsum():
    R, N, P, d, K = 3, 5, 4, 7, 6
    X = _rand(1, N, P, d, seed=1)
    W = _rand(R, d, K, seed=2)
    shared = net.preact(X, W)
    per_run = net.preact(X.expand(R, N, P, d), W)
    ref = torch.einsum("npd,rdk->rnpk", X[0], W)
    assert shared.shape == (R, N, P, K)
    torch.testing.assert_close(shared, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_run, ref, rtol=1e-12, atol=1e-12)
    # kernels of different runs must not be mixed: run 1's output only depends on W[1]
    W2 = W.clone()
    W2[0] += 1.0
    W2[2] -= 1.0
    torch.testing.assert_close(net.preact(X, W2)[1], shared[1], rtol=0, atol=0)


def test_preact_per_run_data():
    R, N, P, d, K = 2, 3, 4, 5, 6
    X = _rand(R, N, P, d, seed=3)
    W = _rand(R, d, K, seed=4)
    torch.testing.assert_close(net.preact(X, W), torch.einsum("rnpd,rdk->rnpk", X, W), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("Rd", [1, 2])
def test_encode_with_keep_equals_zeroed_patches(Rd):
    R, N, P, d, K = 2, 6, 5, 8, 4
    q, thr = 3, 0.7
    X = _rand(Rd, N, P, d, seed=5)
    W = _rand(R, d, K, seed=6)
    keep = torch.rand(R, N, P, generator=torch.Generator().manual_seed(7)) < 0.6
    assert keep.any() and (~keep).any()
    h = net.encode(X, W, q, thr, keep=keep)
    Xz = X.expand(R, N, P, d) * keep.unsqueeze(-1).to(X.dtype)  # masked patches zeroed, per run
    h_ref = net.encode(Xz, W, q, thr)
    assert h.shape == (R, N, K)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    # and against the definition: sum over kept patches of act(<w, x>)
    Z = torch.einsum("rnpd,rdk->rnpk", X.expand(R, N, P, d), W)
    ref = (net.smoothed_relu(Z, q, thr) * keep.unsqueeze(-1)).sum(2)
    torch.testing.assert_close(h, ref, rtol=1e-12, atol=1e-12)
    per_patch = net.encode(X, W, q, thr, keep=keep, per_patch=True)
    assert per_patch.shape == (R, N, P, K)
    torch.testing.assert_close(per_patch.sum(2), h, rtol=1e-12, atol=1e-12)
    assert (per_patch[~keep] == 0).all()
    # keeping everything equals no mask
    torch.testing.assert_close(net.encode(X, W, q, thr, keep=torch.ones_like(keep)), net.encode(X, W, q, thr))


def test_init_kernels_independent_of_batching_and_std():
    d, K, sigma_0 = 300, 40, 0.023
    W3 = net.init_kernels([generator(s, "init") for s in (0, 1, 2)], d, K, sigma_0)
    W1 = net.init_kernels([generator(1, "init")], d, K, sigma_0)
    assert W3.shape == (3, d, K)
    torch.testing.assert_close(W3[1], W1[0], rtol=0, atol=0)
    assert not torch.equal(W3[0], W3[1])
    for r in range(3):
        assert W3[r].std().item() == pytest.approx(sigma_0, rel=0.04)
        assert abs(W3[r].mean().item()) < 4 * sigma_0 / (d * K) ** 0.5


# --------------------------------------------------------------------------- decoder and heads


def test_decoder_init_shapes_and_identity():
    R, K = 3, 5
    D = net.init_decoder(R, K, "full")
    assert D.shape == (R, K, K)
    torch.testing.assert_close(D, torch.eye(K).expand(R, K, K))
    D[0, 0, 1] = 7.0  # runs own separate storage
    assert D[1, 0, 1] == 0.0
    Dd = net.init_decoder(R, K, "diag")
    assert Dd.shape == (R, K)
    assert (Dd == 1).all()
    h = _rand(R, 4, K, seed=8, dtype=torch.float32)
    torch.testing.assert_close(net.decode(h, net.init_decoder(R, K, "full")), h)
    torch.testing.assert_close(net.decode(h, Dd), h)


def test_decode_full_and_diag():
    R, N, K = 2, 4, 3
    h = _rand(R, N, K, seed=9)
    D = _rand(R, K, K, seed=10)
    torch.testing.assert_close(net.decode(h, D), torch.einsum("rnk,rkj->rnj", h, D))
    Dd = _rand(R, K, seed=11)
    torch.testing.assert_close(net.decode(h, Dd), h * Dd[:, None, :])


def test_sl_logits_sums_class_kernels():
    R, N, k, m = 2, 3, 4, 3
    h = _rand(R, N, k * m, seed=12)
    logits = net.sl_logits(h, k, m)
    assert logits.shape == (R, N, k)
    ref = torch.zeros(R, N, k, dtype=h.dtype)
    for i in range(k):
        for j in range(m):
            ref[:, :, i] += h[:, :, i * m + j]
    torch.testing.assert_close(logits, ref, rtol=1e-12, atol=1e-12)
    # a kernel of class 2 moves only class 2's logit
    h2 = h.clone()
    h2[:, :, 2 * m + 1] += 5.0
    diff = net.sl_logits(h2, k, m) - logits
    torch.testing.assert_close(diff[:, :, 2], torch.full((R, N), 5.0, dtype=h.dtype))
    assert (diff[:, :, [0, 1, 3]].abs() < 1e-12).all()


def test_init_linear_head_standardisation():
    R, N, K, k = 2, 200, 5, 3
    g = torch.Generator().manual_seed(13)
    scales = torch.tensor([[0.1, 1.0, 3.0, 0.0, 2.0], [5.0, 0.5, 0.5, 1.0, 0.01]])
    offsets = torch.tensor([[1.0, -2.0, 0.0, 4.0, 3.0], [0.0, 10.0, -1.0, 2.0, 0.5]])
    h = torch.randn(R, N, K, generator=g) * scales[:, None, :] + offsets[:, None, :]
    head = net.init_linear_head(h, k, standardize=True)
    assert head.center.shape == (R, 1, K) and head.scale.shape == (R, 1, 1)
    torch.testing.assert_close(head.center, h.mean(1, keepdim=True))
    hs = (h - head.center) / head.scale
    torch.testing.assert_close(hs.mean(1), torch.zeros(R, K), atol=1e-5, rtol=0)
    torch.testing.assert_close(hs.pow(2).mean(dim=(1, 2)), torch.ones(R), atol=1e-5, rtol=0)
    # one scale per run: relative kernel magnitudes are preserved (not unit variance per kernel)
    ratio_before = (h.std(1)[:, 2] / h.std(1)[:, 1])
    ratio_after = (hs.std(1)[:, 2] / hs.std(1)[:, 1])
    torch.testing.assert_close(ratio_after, ratio_before, rtol=1e-4, atol=0)
    assert hs[0, :, 3].abs().max() < 1e-6  # a dead kernel stays at zero, not blown up
    # zeros head, zero bias: the logits are zero
    assert head.H.shape == (R, K, k) and (head.H == 0).all() and (head.b == 0).all()
    assert (head(h) == 0).all()


def test_init_linear_head_plain_and_random():
    R, N, K, k = 3, 10, 6, 4
    h = _rand(R, N, K, seed=14, dtype=torch.float32)
    head = net.init_linear_head(h, k, standardize=False)
    assert (head.center == 0).all() and (head.scale == 1).all()
    H = torch.ones(R, K, k)
    b = torch.arange(k, dtype=torch.float32).expand(R, k)
    out = net.LinearHead(H=H, b=b, center=head.center, scale=head.scale)(h)
    torch.testing.assert_close(out, h.sum(-1, keepdim=True) + b[:, None, :])
    big_K = 400
    hb = _rand(3, 10, big_K, seed=15, dtype=torch.float32)
    r3 = net.init_linear_head(hb, k, True, [generator(s, "head") for s in (0, 1, 2)])
    r1 = net.init_linear_head(hb[1:2], k, True, [generator(1, "head")])
    torch.testing.assert_close(r3.H[1], r1.H[0], rtol=0, atol=0)
    assert r3.H.std().item() == pytest.approx(1 / big_K**0.5, rel=0.08)


def test_init_linear_head_random_follows_dtype():
    h = _rand(2, 10, 4, seed=16, dtype=torch.float64)
    head = net.init_linear_head(h, 3, True, [generator(s, "head") for s in (0, 1)])
    assert head.H.dtype == torch.float64
    assert head(h).shape == (2, 10, 3)
