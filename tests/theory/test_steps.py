"""Hand-derived gradients (theory/steps.py) against autograd through the reference functions."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from mrplab.rng import generator
from mrplab.theory import net, steps
from mrplab.theory.objectives import (cross_entropy, fit_decoder, mae_pixel_loss, make_run_masks, mrp_teacher_loss,
                                      normalise_target)
from tests.theory.helpers import reference_patch_ops, wide_matmul_is_exact

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


@pytest.mark.parametrize("kernels", ["eager", "pure"])
def test_patch_ops_are_the_smoothed_relu_and_its_derivative(kernels):
    """On every piece of the activation, for every q and threshold: pool = act, grad = act' (one patch, dh = 1)."""
    ops = steps.EAGER if kernels == "eager" else steps.PatchOps(steps.pool_patches, steps.patch_grad)
    z = torch.linspace(-2, 3, 1001, dtype=torch.float64).view(1, -1, 1, 1)  # [R, N, P, K]
    ones = torch.ones(1, 1001, 1, dtype=torch.float64)
    for q in (2, 3, 4, 5):
        for thr in (0.5, 1.0, 2.0):
            a, a_all = ops.pool(z, None, q, thr)
            torch.testing.assert_close(a.flatten(), net.smoothed_relu(z, q, thr).flatten(), rtol=1e-12, atol=1e-12)
            assert a_all is a
            g = ops.grad(z, None, ones, q, thr)  # eager: act' kept from the pool of the same z
            torch.testing.assert_close(g, net.smoothed_relu_grad(z, q, thr), rtol=1e-12, atol=1e-12)
            assert torch.equal(ops.grad(z, None, ones, q, thr), g)  # and recomputed without a pool before it


@pytest.mark.parametrize("Rd", [1, R])
def test_weight_grad_is_the_transpose_of_preact(Rd):
    X, W, _, _ = _setup(Rd)
    dZ = torch.randn(R, N, P, K, dtype=torch.float64)
    Wr = W.clone().requires_grad_(True)
    (net.preact(X, Wr) * dZ).sum().backward()
    _close(net.weight_grad(X, dZ).double(), Wr.grad, 1e-10)
    Xt = X.reshape(Rd, N * P, -1).transpose(1, 2).contiguous()  # the layout transposed_patches gives
    _close(net.weight_grad(X, dZ, Xt=Xt).double(), Wr.grad, 1e-10)


def test_transposed_patches_only_where_they_pay_and_give_the_same_steps():
    """bf16 on the CPU keeps X^T for the weight gradient (same step, to bf16 rounding); fp32 keeps nothing."""
    X, W, y, mask = _setup(R)
    assert net.transposed_patches(X.float()) is None
    Xb = X.to(torch.bfloat16)
    Xt = net.transposed_patches(Xb)
    assert Xt.shape == (R, X.shape[-1], N * P) and Xt.is_contiguous()
    for with_t, without in ((steps.sl(Xb, y, W.float(), Q, THR, k, m, Xt=Xt), steps.sl(Xb, y, W.float(), Q, THR, k, m)),
                            (steps.mrp(Xb, W.float(), net.init_decoder(R, K, "diag"), mask, Q, THR, steps.MRPSpec(), Xt=Xt),
                             steps.mrp(Xb, W.float(), net.init_decoder(R, K, "diag"), mask, Q, THR, steps.MRPSpec()))):
        dw_t, dw = (with_t[1], without[1]) if isinstance(with_t, tuple) else (with_t.dW, without.dW)
        torch.testing.assert_close(dw_t, dw, rtol=2e-2, atol=1e-6 * float(dw.abs().max()))


@pytest.mark.parametrize("Rd", [1, R])
def test_sl_gradient_matches_autograd(Rd):
    X, W, y, _ = _setup(Rd)
    Wr = W.clone().requires_grad_(True)
    ref = cross_entropy(net.sl_logits(net.encode(X, Wr, Q, THR), k, m), y)
    ref.sum().backward()
    loss, dW, _ = steps.sl(X, y, W, Q, THR, k, m)
    torch.testing.assert_close(loss, ref.detach())
    _close(dW.double(), Wr.grad)


def _decoder(kind: str, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "full":
        return net.init_decoder(R, K, "full").double() + 0.1 * torch.randn(R, K, K, generator=g, dtype=torch.float64)
    return net.init_decoder(R, K, "diag").double() + 0.1 * torch.randn(R, K, generator=g, dtype=torch.float64)


def _teacher_target(X, W_teacher, mask, scope, norm):
    """The reference target: the teacher's code on the full input, pooled over all or the masked patches."""
    t = net.encode(X, W_teacher, Q, THR, keep=None if scope == "all" else mask).detach()
    return normalise_target(t, norm)


@pytest.mark.parametrize("decoder", ["full", "diag"])
@pytest.mark.parametrize("norm,power", [("none", 0.0), ("per_kernel", 0.75), ("per_kernel", 1.0), ("per_run", 0.75),
                                        ("per_sample", 0.0)])
@pytest.mark.parametrize("scope", ["all", "masked"])
@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("Rd", [1, R])
def test_mrp_teacher_gradient_matches_autograd(decoder, norm, power, scope, ema, Rd):
    """Per-run data, and data shared by the runs (whose weight gradient runs over the visible patches only)."""
    X, W, _, mask = _setup(Rd)
    D = _decoder(decoder)
    W_t = (W + 0.05 * torch.randn_like(W)) if ema else None
    Wr, Dr = W.clone().requires_grad_(True), D.clone().requires_grad_(True)
    h_s = net.encode(X, Wr, Q, THR, keep=~mask)
    target = _teacher_target(X, W_t if ema else Wr, mask, scope, norm)
    ref = mrp_teacher_loss(net.decode(h_s, Dr), target, power, norm)
    ref.sum().backward()
    out = steps.mrp(X, W, D, mask, Q, THR, steps.MRPSpec("teacher", scope, norm, power), W_t)
    torch.testing.assert_close(out.loss, ref.detach())
    _close(out.dW.double(), Wr.grad)
    _close(out.dD, Dr.grad)


@pytest.mark.parametrize("decoder", ["full", "diag"])
@pytest.mark.parametrize("scope", ["all", "masked"])
@pytest.mark.parametrize("norm", ["per_kernel", "per_sample"])
def test_fitted_decoder_step_is_the_gradient_of_the_profiled_loss(decoder, scope, norm):
    """Under the control the decoder is the least-squares optimum D*(W); the step's dW is the gradient
    of min_D loss(W, D), through D* too (autograd through the solve): the envelope theorem, checked."""
    X, W, _, mask = _setup(R)
    Wr = W.clone().requires_grad_(True)
    h_s = net.encode(X, Wr, Q, THR, keep=~mask)
    target = _teacher_target(X, W, mask, scope, norm)
    D_star = fit_decoder(h_s, target, decoder)  # differentiable in h_s
    ref = mrp_teacher_loss(net.decode(h_s, D_star), target, 0.75, norm)
    ref.sum().backward()
    out = steps.mrp(X, W, _decoder(decoder), mask, Q, THR, steps.MRPSpec("teacher", scope, norm, 0.75, True))
    torch.testing.assert_close(out.D, D_star.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.loss, ref.detach())
    _close(out.dW.double(), Wr.grad)


@pytest.mark.parametrize("decoder", ["full", "diag"])
def test_fitted_decoder_is_the_least_squares_solution(decoder):
    g = torch.Generator().manual_seed(3)
    h = torch.rand(R, 40, K, generator=g, dtype=torch.float64)
    t = h @ torch.randn(K, K, generator=g, dtype=torch.float64) + 0.3 * torch.randn(R, 40, K, generator=g,
                                                                                  dtype=torch.float64)
    D = fit_decoder(h, t, decoder)
    for r in range(R):
        if decoder == "full":
            direct = torch.linalg.lstsq(h[r], t[r]).solution  # [K, K]
            torch.testing.assert_close(D[r], direct, rtol=1e-5, atol=1e-8)
        else:
            for j in range(K):
                direct = torch.linalg.lstsq(h[r, :, j : j + 1], t[r, :, j : j + 1]).solution  # [1, 1]
                torch.testing.assert_close(D[r, j], direct[0, 0], rtol=1e-10, atol=1e-12)
    # a kernel that never fires gets D = 0, not nan
    h[0, :, 2] = 0
    assert fit_decoder(h, t, "diag")[0, 2] == 0


@pytest.mark.parametrize("decoder", ["full", "diag"])
@pytest.mark.parametrize("scope", ["all", "masked"])
def test_fitted_decoder_leaves_no_radial_gradient_in_the_polynomial_phase(decoder, scope):
    """In the polynomial phase h(c W) = c^q h(W): a fitted linear decoder absorbs any rescaling of the
    encoder, so the loss is flat along W and the control's gradient is orthogonal to W (Euler). This is
    why the control cannot grow a kernel's norm; only its direction can move."""
    X, W, _, mask = _setup(R, scale=0.02)  # every |z| << thr
    assert net.preact(X, W).abs().max() < THR
    out = steps.mrp(X, W, _decoder(decoder), mask, Q, THR, steps.MRPSpec("teacher", scope, "per_kernel", 0.75, True))
    for r in range(R):
        cos = (out.dW[r] * W[r]).sum() / (out.dW[r].norm() * W[r].norm())
        assert abs(float(cos)) < 1e-6, float(cos)
    if scope == "masked":
        return
    # with a lagging decoder (identity at the start of training) the same step grows the kernels:
    # the all-patch target exceeds what the visible patches give
    lag = steps.mrp(X, W, net.init_decoder(R, K, decoder).double(), mask, Q, THR,
                    steps.MRPSpec("teacher", scope, "per_kernel", 0.75))
    assert all(float((lag.dW[r] * W[r]).sum()) < 0 for r in range(R))  # descent direction has a radial part


@pytest.mark.parametrize("scope", ["masked", "all"])
@pytest.mark.parametrize("fit", [False, True])
def test_mae_pixel_gradient_matches_autograd(scope, fit):
    X, W, _, mask = _setup(1)
    Wr = W.clone().requires_grad_(True)
    h_s = net.encode(X, Wr, Q, THR, keep=~mask)
    if fit:
        sel = mask if scope == "masked" else torch.ones_like(mask)
        t = torch.einsum("rnp,rnpd->rnd", sel.double(), X.expand(R, *X.shape[1:]))
        Dr = fit_decoder(h_s.detach(), t, "full").requires_grad_(True)
    else:
        Dr = (0.1 * torch.randn(R, K, d, dtype=torch.float64)).requires_grad_(True)
    ref = mae_pixel_loss(torch.bmm(h_s, Dr), X, mask, 0.75, scope)
    ref.sum().backward()
    out = steps.mrp(X, W, Dr.detach().clone(), mask, Q, THR, steps.MRPSpec("pixels", scope, "per_run", 0.75, fit))
    torch.testing.assert_close(out.loss, ref.detach())
    torch.testing.assert_close(out.D, Dr.detach(), rtol=1e-5, atol=1e-6)
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


def _assert_falls_back_to_eager_with_one_warning(ops, message):
    z, keep, dh = torch.randn(2, 3, 4, 5), torch.rand(2, 3, 4) < 0.5, torch.randn(2, 3, 5)
    with pytest.warns(RuntimeWarning, match=message):
        h_vis, h_all = ops.pool(z, keep, 3, 1.0)
    e_vis, e_all = steps.EAGER.pool(z, keep, 3, 1.0)
    assert torch.equal(h_vis, e_vis) and torch.equal(h_all, e_all)
    with pytest.warns(RuntimeWarning, match=message):
        assert torch.equal(ops.grad(z, keep, dh, 3, 1.0), steps.EAGER.grad(z, keep, dh, 3, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each kernel warns once, later calls are eager
        ops.pool(z, keep, 3, 1.0)
        ops.grad(z, keep, dh, 3, 1.0)


def test_failed_torch_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    """A machine where torch.compile cannot build a kernel still runs, with the eager numbers."""
    def broken_compile(fn, **kw):
        def fails(*a):
            raise RuntimeError("no C++ compiler found\ndetails")
        return fails

    steps.fused.cache_clear()
    steps._compiled_fns.cache_clear()
    monkeypatch.setattr(torch, "compile", broken_compile)
    try:
        _assert_falls_back_to_eager_with_one_warning(steps.fused("inductor"), "no C\\+\\+ compiler found")
    finally:
        steps.fused.cache_clear()
        steps._compiled_fns.cache_clear()


def test_failed_native_build_falls_back_to_eager_with_one_warning(monkeypatch, tmp_path):
    """A compiler that fails (here a stand-in that prints an error and exits 1) leaves the run on the eager
    kernels after one warning per kernel that quotes the compiler's first line; nothing half-built is kept."""
    from mrplab.theory import native

    cxx = tmp_path / "bin" / "c++"
    cxx.parent.mkdir()
    cxx.write_text("#!/bin/sh\necho 'cc1plus: fatal error: out of memory' >&2\nexit 1\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("MRPLAB_CACHE_DIR", str(tmp_path / "cache"))
    steps.fused.cache_clear()
    native._load.cache_clear()
    try:
        _assert_falls_back_to_eager_with_one_warning(steps.fused("native"), "c\\+\\+ failed: cc1plus: fatal error")
        assert list((tmp_path / "cache" / "kernels").iterdir()) == []
        with pytest.raises(native.BuildError, match="fatal error"):  # what the compile probe sees
            steps.time_compiled_ops((1, 4, 3, 5), 3, 1.0)
    finally:
        steps.fused.cache_clear()
        native._load.cache_clear()


def test_native_kernels_are_built_once_per_machine(monkeypatch, tmp_path):
    """The first process builds the library into the cache folder; a later one loads it without compiling."""
    from mrplab.theory import native

    monkeypatch.setenv("MRPLAB_CACHE_DIR", str(tmp_path))
    native._load.cache_clear()
    try:
        native.library()
        built = list((tmp_path / "kernels").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"
        native._load.cache_clear()  # as a new process would
        monkeypatch.setattr(native, "build", lambda *a: pytest.fail("built again"))
        native.library()
    finally:
        native._load.cache_clear()


KINDS = ["eager", "compiled", "inductor"]  # compiled: what compile=true runs here (the native kernels on the CPU)


def _kernels(kind: str) -> steps.PatchOps:
    return {"eager": steps.EAGER, "compiled": steps.ops(True), "inductor": steps.fused("inductor")}[kind]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["per_run", "shared"])
@pytest.mark.parametrize("kind", KINDS)
def test_patch_ops_match_the_reference_in_both_layouts(kind, layout, dtype):
    """pool and grad on Z as the matmul writes it: [R, N, P, K], or for shared data a view of [N, P, R, K];
    dZ comes back in the matmul's dtype and layout (so the weight-gradient matmul reads it without a copy)."""
    R, N, P, K, q, thr = 3, 7, 5, 6, 4, 1.0
    g = torch.Generator().manual_seed(1)
    base = torch.randn(N, P, R, K, generator=g) * 0.8 * thr  # values on all three pieces of the activation
    Z = (base.permute(2, 0, 1, 3) if layout == "shared" else base.permute(2, 0, 1, 3).contiguous()).to(dtype)
    keep, dh = torch.rand(R, N, P, generator=g) < 0.6, torch.randn(R, N, K, generator=g)
    ops = _kernels(kind)
    h_vis, h_all = ops.pool(Z, keep, q, thr)
    dZ = ops.grad(Z, keep, dh, q, thr)
    r_vis, r_all, r_dz = reference_patch_ops(Z, keep, dh, q, thr)
    torch.testing.assert_close(h_vis.double(), r_vis, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_all.double(), r_all, rtol=1e-5, atol=1e-6)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # dZ is rounded to the matmul's dtype
    torch.testing.assert_close(dZ.double(), r_dz, rtol=tol, atol=1e-6)
    assert h_vis.dtype == torch.float32 and dZ.dtype == dtype
    assert dZ.stride() == Z.stride()
    same, _ = ops.pool(Z, None, q, thr)
    torch.testing.assert_close(same, h_all, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("Rd", [1, R])
def test_encode_with_the_run_kernels_is_the_reference_encoder(kind, Rd):
    """steps.encode (probes and evaluation) through the run's pool kernel equals net.encode, in fp32
    and from bf16 patches (whose matmul rounds Z to bf16, as a bf16 run's steps see it)."""
    X, W, _, _ = _setup(Rd)
    ops = _kernels(kind)
    ref = net.encode(X, W, Q, THR)
    _close(steps.encode(X.float(), W.float(), Q, THR, ops).double(), ref, 1e-5)
    Xb = X.to(torch.bfloat16)
    ref_b = net.smoothed_relu(net.preact(Xb, W.float(), native=True).double(), Q, THR).sum(2)
    h_b = steps.encode(Xb, W.float(), Q, THR, ops)
    assert h_b.dtype == torch.float32
    _close(h_b.double(), ref_b, 1e-5)
    assert (h_b.double() - ref).abs().max() > 1e-4 * ref.abs().max()  # bf16 rounding is visible: the check can fail


@pytest.mark.parametrize("decoder", ["full", "diag"])
def test_shuffled_pairing_gradient_matches_autograd(decoder):
    """The pairing control: sample n is asked for sample n+1's target (a detached teacher code)."""
    X, W, _, mask = _setup(R)
    D = _decoder(decoder)
    Wr, Dr = W.clone().requires_grad_(True), D.clone().requires_grad_(True)
    h_s = net.encode(X, Wr, Q, THR, keep=~mask)
    target = _teacher_target(X, Wr, mask, "all", "per_kernel").roll(-1, dims=1)
    ref = mrp_teacher_loss(net.decode(h_s, Dr), target, 0.75, "per_kernel")
    ref.sum().backward()
    out = steps.mrp(X, W, D, mask, Q, THR, steps.MRPSpec("teacher", "all", "per_kernel", 0.75, shuffled=True))
    torch.testing.assert_close(out.loss, ref.detach())
    _close(out.dW.double(), Wr.grad)
    _close(out.dD, Dr.grad)
    same = steps.mrp(X, W, D, mask, Q, THR, steps.MRPSpec("teacher", "all", "per_kernel", 0.75))
    assert not torch.allclose(same.dW, out.dW)


@pytest.mark.parametrize("fit", [False, True])
@pytest.mark.parametrize("power", [0.0, 0.75])
@pytest.mark.parametrize("kind", KINDS)
def test_diag_loss_kernels_match_the_reference(kind, power, fit):
    """The diagonal decoder's loss and gradients (the default MRP objective; with ``fit`` the fitted-decoder
    control's) through the run's kernels, in fp32, against the eager function in float64 (which the MRP
    gradient tests check against autograd), on codes as small as the polynomial phase makes them; K = 19
    leaves a partial block of kernels, and kernel 3 never fires (its fitted decoder is 0)."""
    g = torch.Generator().manual_seed(5)
    h, t = torch.rand(3, 41, 19, generator=g) * 1e-4, torch.rand(3, 41, 19, generator=g) * 1e-4
    h[:, :, 3] = 0.0
    D = torch.randn(3, 19, generator=g)
    got = _kernels(kind).diag_loss(h, t, D, power, fit)
    want = steps.diag_loss(h.double(), t.double(), D.double(), power, fit)
    dD_scale = steps.diag_loss(h.double(), t.double(), D.double(), power)[1].abs().max().item()
    for name, a, b in zip(("loss", "dD", "dh", "D"), got, want):
        assert a.dtype == torch.float32
        if fit and name == "dD":  # zero at the least-squares optimum: only rounding is left
            assert a.abs().max() < 1e-5 * dD_scale and b.abs().max() < 1e-9 * dD_scale
            continue
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6 * b.abs().max().item())
    loss, dD, dh, used = want
    assert loss.min() > 0 and dh.abs().max() > 0 and (fit or dD[:, torch.arange(19) != 3].abs().min() > 0)
    assert torch.equal(used, D.double()) != fit and (used[:, 3] == 0).all() == fit


@pytest.mark.parametrize("kind", KINDS)
def test_mrp_step_with_the_run_kernels_is_the_eager_step(kind):
    """A default MRP step (diagonal decoder, per-kernel divisor) and its shuffled control, fp32, through the
    run's kernels: the same loss and gradients as eagerly."""
    X, W, _, mask = _setup(R)
    X, W = X.float(), W.float()
    D = _decoder("diag").float()
    for spec in (steps.MRPSpec(), steps.MRPSpec(shuffled=True), steps.MRPSpec(norm="none"),
                 steps.MRPSpec(fit_decoder=True)):
        out = steps.mrp(X, W, D, mask, Q, THR, spec, None, _kernels(kind))
        ref = steps.mrp(X, W, D, mask, Q, THR, spec, None, steps.EAGER)
        pairs = [(out.loss, ref.loss), (out.dW, ref.dW), (out.D, ref.D)]
        if not spec.fit_decoder:  # dD is 0 at the fitted optimum up to rounding (and unused)
            pairs.append((out.dD, ref.dD))
        for a, b in pairs:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())


def test_logged_variances_are_torchs_sample_variance():
    x = torch.randn(3, 50, 7, generator=torch.Generator().manual_seed(6)) * 2 + 5
    torch.testing.assert_close(steps._sample_var(x), x.var(dim=1).mean(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Rd", [1, R])
@pytest.mark.parametrize("kind", KINDS)
def test_sl_step_with_the_run_kernels_is_the_reference(kind, Rd, dtype):
    """The supervised step through the run's kernels (fused in one pass on the CPU), per-run or shared data
    and labels, fp32 or bf16 patches: loss, dW and fitted as autograd gets them through net.py on the same
    (rounded) matmul output."""
    X, W, y, _ = _setup(Rd, scale=0.3)
    Xc = X.to(dtype)
    Wr = W.float().clone().requires_grad_(True)
    Z = net.preact(Xc, Wr, native=True).double()  # the matmul as the step runs it, then float64
    ref = cross_entropy(net.sl_logits(net.smoothed_relu(Z, Q, THR).sum(2), k, m), y)
    ref.sum().backward()
    logits = net.sl_logits(net.smoothed_relu(Z.detach(), Q, THR).sum(2), k, m)
    loss, dW, fitted = steps.sl(Xc, y, W.float(), Q, THR, k, m, _kernels(kind))
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    _close(dW.double(), Wr.grad.double(), 2e-2 if dtype == torch.bfloat16 else 1e-5)  # dZ rounds to bf16
    assert torch.equal(fitted, (logits.argmax(-1) == y).all(-1))
    # a label set that every sample of run 0 gets right (from the reference's own argmax): fitted flips
    y_fit = logits.argmax(-1)[:1].expand(Rd, N) if Rd == 1 else logits.argmax(-1)
    assert steps.sl(Xc, y_fit, W.float(), Q, THR, k, m, _kernels(kind))[2][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_grad_writes_into_a_slice_of_a_larger_buffer(kind, dtype):
    """grad(..., out=) on one run's block of variants ([V, N, P, K] inside [N, P, V, K], as steps.mrp_variants
    passes it): the same dZ as without ``out``, written into that slice only."""
    R, N, P, V, K, q, thr = 2, 7, 5, 3, 6, 4, 1.0
    g = torch.Generator().manual_seed(2)
    Zw = (torch.randn(R, N, P, V * K, generator=g) * 0.8).to(dtype)
    Z = Zw.view(R, N, P, V, K).permute(0, 3, 1, 2, 4)[1]  # run 1's variants
    keep, dh = (torch.rand(N, P, generator=g) < 0.6).expand(V, N, P), torch.randn(V, N, K, generator=g)
    buf = torch.full_like(Zw, 7.0)
    out = buf.view(R, N, P, V, K).permute(0, 3, 1, 2, 4)[1]
    ops = _kernels(kind)
    got = ops.grad(Z, keep, dh, q, thr, out=out)
    assert got.data_ptr() == out.data_ptr() and got.stride() == out.stride()
    assert torch.equal(out, ops.grad(Z, keep, dh, q, thr))
    assert (buf[0] == 7.0).all()  # run 0's part of the buffer is untouched
    assert not (out == 7.0).any()
    _, _, want = reference_patch_ops(Z, keep, dh, q, thr)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=1e-6)


def _variant_case(target: str, decoder: str, Rd: int, R_: int, dtype: torch.dtype, seed: int = 3):
    """Patches, kernels, decoders and specs of MRP with its two controls (fitted decoder, shuffled pairing)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(Rd, N, P, d, generator=g).to(dtype)
    Ws = [0.6 * torch.randn(R_, d, K, generator=g) for _ in range(3)]
    if target == "pixels":
        Ds = [0.1 * torch.randn(R_, K, d, generator=g) for _ in range(3)]
    else:
        Ds = [(torch.eye(K).expand(R_, K, K) if decoder == "full" else torch.ones(R_, K))
              + 0.1 * torch.randn(R_, K, K if decoder == "full" else 1, generator=g).squeeze(-1) for _ in range(3)]
    base = steps.MRPSpec(target, "masked" if target == "pixels" else "all", "per_kernel", 0.75)
    specs = [base, dataclasses.replace(base, fit_decoder=True), dataclasses.replace(base, shuffled=True)]
    mask = make_run_masks([generator(s, "m") for s in range(R_)], N, P, 0.5)
    return X, Ws, Ds, mask, specs


@pytest.mark.parametrize("target,decoder", [("teacher", "diag"), ("teacher", "full"), ("pixels", "full")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("data", ["per_run", "shared_one_run", "shared"])
@pytest.mark.parametrize("kind", ["eager", "compiled"])
def test_mrp_variants_equal_each_variant_alone(kind, data, dtype, target, decoder, monkeypatch):
    """MRP and its controls in one step (one matmul V*K wide per run, one kernel call per run) give each
    variant's loss, gradients, decoder and logged variances as its own step does: bitwise where this BLAS
    computes a column of the wide product as the narrow one (helpers.wide_matmul_is_exact), else to rounding.
    Per-run data in three chunks of one run; shared data for R > 1 steps each variant on its own."""
    R_ = 1 if data == "shared_one_run" else 3
    X, Ws, Ds, mask, specs = _variant_case(target, decoder, R_ if data == "per_run" else 1, R_, dtype)
    ops = _kernels(kind)
    widths = []
    preact = net.preact
    monkeypatch.setattr(net, "preact", lambda X_, W_, **kw: widths.append(W_.shape[-1]) or preact(X_, W_, **kw))
    monkeypatch.setattr(steps, "CHUNK_ELEMS", N * P * K * 3)  # one run per chunk (its three variants)
    together = steps.mrp_variants(X, Ws, Ds, mask, Q, THR, specs, ops)
    batched = data != "shared"
    assert widths == ([3 * K] * R_ if batched else [K] * 3)
    exact = not batched or wide_matmul_is_exact(X, Ws)
    if batched:  # each variant alone in the same chunks of one run (a batched bmm or least-squares fit over c
        monkeypatch.setattr(steps, "CHUNK_ELEMS", N * P * K)  # runs can round differently from c = 1: seen under AVX2)
    for W, D, spec, got in zip(Ws, Ds, specs, together):
        want = steps.mrp(X, W, D, mask, Q, THR, spec, None, ops)
        for name in ("loss", "dW", "dD", "D", "pred_var", "target_var"):
            a, b = getattr(got, name), getattr(want, name)
            if b is None:
                assert a is None and target == "pixels"
            elif exact:
                assert torch.equal(a, b), name
            elif not (name == "dD" and spec.fit_decoder):  # 0 at the fitted optimum up to rounding (and unused)
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())
    assert not torch.allclose(together[0].dW, together[2].dW)  # the variants differ: the check can fail


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_visible_weight_grad_is_the_product_over_every_patch(kind, dtype, monkeypatch):
    """Shared data: the grad pass writes exactly the visible patches' rows of dZ, run after run, into the
    compacted buffer (and nothing for the masked ones), and the weight gradient from it is X^T dZ over every
    patch, to the rounding of its own blocking. Run 0 sees no patch, run 1 every patch."""
    c, N_, P_, d_, K_, q, thr = 3, 9, 7, 11, 6, 4, 1.0
    monkeypatch.setattr(steps, "VISIBLE_ROWS_STEP", 8)  # rows rounded up to a multiple of 8: padding inside N * P
    g = torch.Generator().manual_seed(5)
    X = torch.randn(1, N_, P_, d_, generator=g).to(dtype)
    keep = torch.rand(c, N_, P_, generator=g) < 0.5
    keep[0], keep[1] = False, True
    Z = (torch.randn(N_, P_, c, K_, generator=g) * 0.8 * thr).to(dtype).permute(2, 0, 1, 3)  # shared layout
    dh = torch.randn(c, N_, K_, generator=g)
    ops = _kernels(kind)
    vis = ops.visible(X, net.transposed_patches(X), keep)
    assert vis.columns == (kind == "compiled" and dtype == torch.bfloat16)  # the packed layout where it is built
    assert vis.counts == keep.flatten(1).sum(1).tolist() and vis.counts[:2] == [0, N_ * P_]
    step = steps.VISIBLE_ROWS_STEP
    assert vis.widths == [min(-(-n // step) * step, N_ * P_) for n in vis.counts]
    dense = ops.grad(Z, keep, dh, q, thr)
    buf = vis.buffer(K_)
    got = ops.grad(Z, keep, dh, q, thr, out=buf, rows=vis.rows(K_))
    assert got.data_ptr() == buf.data_ptr()
    for r, (start, n, w) in enumerate(zip(vis.starts, vis.counts, vis.widths)):  # every row written, in order
        assert torch.equal(buf[start:start + n], dense[r][keep[r]]) and (buf[start + n:start + w] == 0).all()
    dW = vis.weight_grad(buf, torch.float32)
    want = net.weight_grad(X, dense, torch.float32)
    assert (dW[0] == 0).all()
    torch.testing.assert_close(dW, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["eager", "compiled"])
def test_mrp_counts_the_products_it_runs(kind, monkeypatch):
    """The FLOP count of one MRP step (benchmarks' efficiency): on the CPU, per-run data and data shared by
    several runs alike multiply every patch in the forward and the visible patches only (rounded up to the rows
    step) in the weight gradient; where ``pays_visible`` says no, every patch in both."""
    from mrplab.runtime import matmul_flops
    monkeypatch.setattr(steps, "VISIBLE_ROWS_STEP", 4)
    X1, W, _, mask = _setup(1)
    X1, W = X1.to(torch.bfloat16), W.float()
    D = _decoder("diag").float()
    keep_counts = (~mask).flatten(1).sum(1).tolist()
    forward = 2 * N * P * d * K * R
    visible = sum(2 * (-(-n // 4) * 4) * d * K for n in keep_counts)
    for X, pays in [(X1.expand(R, -1, -1, -1).contiguous(), True), (X1, True), (X1.expand(R, -1, -1, -1), False)]:
        if not pays:
            monkeypatch.setattr(steps, "pays_visible", lambda X, keep: False)
        before = dict(matmul_flops.by_shape)
        steps.mrp(X, W, D, mask, Q, THR, steps.MRPSpec(), None, _kernels(kind), net.transposed_patches(X))
        counted = sum(matmul_flops.since(before).values())
        assert counted == forward + (visible if pays else forward), (X.shape[0], pays, counted)
    assert sum(-(-n // 4) * 4 for n in keep_counts) < N * P * R  # the masks hide patches: the two counts differ


@pytest.mark.parametrize("kind", ["eager", "compiled"])
def test_shared_data_chunks_of_one_shape_keep_their_own_visible_patches(kind, monkeypatch):
    """MRP and its controls on data shared by 4 runs in two chunks of the same shape (one buffer of packed patches,
    filled chunk by chunk and shared by the three variants of each): the same step as in one chunk, run by run."""
    R_ = 4
    X, Ws, Ds, mask, specs = _variant_case("teacher", "diag", 1, R_, torch.bfloat16)
    ops = _kernels(kind)
    Xt = net.transposed_patches(X)
    whole = steps.mrp_variants(X, Ws, Ds, mask, Q, THR, specs, ops, Xt)
    monkeypatch.setattr(steps, "CHUNK_ELEMS", N * P * K * 2)  # two runs per chunk
    assert len(steps.chunks(X, Ws[0])) == 2
    halves = steps.mrp_variants(X, Ws, Ds, mask, Q, THR, specs, ops, Xt)
    for a, b in zip(halves, whole):
        torch.testing.assert_close(a.dW, b.dW, rtol=1e-6, atol=0)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=0)
    assert not torch.allclose(whole[0].dW[0], whole[0].dW[2])  # the runs differ: a mix-up would show
