"""theory/native.py: the C++ kernels called directly (no eager fallback in the way) against net.py's
definitions in float64, in every layout, dtype and q they take, and their rounding against torch's."""

from __future__ import annotations

import pytest
import torch

from mrplab.theory import native, net, probes, steps
from tests.theory.helpers import reference_patch_ops


def _z(layout: str, dtype, R=3, N=7, P=5, K=19, thr=1.3, seed=0):
    """Z on all three pieces of the activation: [R, N, P, K] contiguous, a view of [N, P, R, K] (shared
    data), or every other patch of a larger tensor (not dense: empty_like gives dZ other strides)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "per_run":
        return (torch.randn(R, N, P, K, generator=g) * thr).to(dtype)
    if layout == "shared":
        return (torch.randn(N, P, R, K, generator=g) * thr).to(dtype).permute(2, 0, 1, 3)
    return (torch.randn(R, N, 2 * P, K, generator=g) * thr).to(dtype)[:, :, ::2]


@pytest.mark.parametrize("q", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["per_run", "shared", "strided"])
def test_native_kernels_match_the_definitions(layout, dtype, q):
    thr = 1.3
    Z = _z(layout, dtype, thr=thr)
    R, N, P, K = Z.shape
    g = torch.Generator().manual_seed(1)
    keep, dh = torch.rand(R, N, P, generator=g) < 0.5, torch.randn(R, N, K, generator=g)
    out = native.pool(Z, keep, q, thr)
    assert out is not None, "the native kernels declined a q they are built for"
    h_vis, h_all = out
    dZ = native.grad(Z, keep, dh, q, thr)
    r_vis, r_all, r_dz = reference_patch_ops(Z, keep, dh, q, thr)
    torch.testing.assert_close(h_vis.double(), r_vis, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_all.double(), r_all, rtol=1e-5, atol=1e-5)
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-5  # dZ is rounded to Z's dtype
    torch.testing.assert_close(dZ.double(), r_dz, rtol=tol, atol=1e-6)
    assert dZ.dtype == dtype and dZ.stride() == torch.empty_like(Z).stride()
    assert (dZ[~keep] == 0).all()
    same, again = native.pool(Z, None, q, thr)
    assert same is again and torch.equal(same, h_all)  # one sum order with and without a mask
    everywhere = reference_patch_ops(Z, torch.ones_like(keep), dh, q, thr)[2]
    torch.testing.assert_close(native.grad(Z, None, dh, q, thr).double(), everywhere, rtol=tol, atol=1e-6)


@pytest.mark.parametrize("q", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("layout", ["per_run", "shared", "strided"])
def test_native_sl_step_matches_the_definition(layout, q):
    """native.sl against net.py in float64: loss, dZ and fitted, per-run and shared labels, fp32 and bf16 Z
    (K = 18 = 3 classes x 6 kernels)."""
    thr, k, m = 1.3, 3, 6
    for dtype in (torch.float32, torch.bfloat16):
        Z = _z(layout, dtype, K=k * m, thr=thr)
        R, N = Z.shape[:2]
        for y in (torch.randint(0, k, (R, N), generator=torch.Generator().manual_seed(7)),
                  torch.randint(0, k, (1, N), generator=torch.Generator().manual_seed(8))):
            loss, dZ, fitted = native.sl(Z, y, q, thr, k, m)
            z = Z.double().requires_grad_(True)
            logits = net.sl_logits(net.smoothed_relu(z, q, thr).sum(2), k, m)
            ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y.expand(R, N), reduction="none").mean(-1)
            ref.sum().backward()
            torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
            tol = 8e-3 if dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(dZ.double(), z.grad, rtol=tol, atol=1e-6 * z.grad.abs().max().item())
            assert dZ.dtype == dtype and dZ.stride() == torch.empty_like(Z).stride()
            assert torch.equal(fitted, (logits.argmax(-1) == y).all(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["per_run", "shared", "strided"])
def test_native_noise_max_matches_the_definition(layout, dtype):
    """native.noise_max = max(Z - coef @ Cf) in float64, with full register blocks (P = 16 patches, K = 32
    kernels) and ragged ones (P = 5, K = 19), per-run and shared coefficients; NaN propagates per run."""
    for P, K in ((16, 32), (5, 19)):
        Z = _z(layout, dtype, P=P, K=K)
        R, N = Z.shape[:2]
        g = torch.Generator().manual_seed(5)
        Cf = torch.randn(R, 6, K, generator=g)
        for coef in (torch.rand(R, N, P, 6, generator=g), torch.rand(1, N, P, 6, generator=g)):
            got = native.noise_max(Z, coef, Cf)
            signal = torch.matmul(coef.double().expand(R, N, P, 6).flatten(1, 2), Cf.double()).view(R, N, P, K)
            want = (Z.double() - signal).flatten(1).amax(-1)
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(got, probes.noise_max(Z, coef, Cf), rtol=1e-6, atol=1e-5)
    Zn = Z.clone()
    Zn[1, N - 1, P - 1, K - 1] = float("nan")
    got = native.noise_max(Zn, coef, Cf)
    assert got[1].isnan() and not got[0].isnan() and got[0] == native.noise_max(Z, coef, Cf)[0]


def test_native_bf16_rounding_is_torchs_bit_for_bit():
    """q = 2: dZ = u * dh is one fp32 product in both, so the bf16 bits must agree exactly, ties and
    infinities included; NaN stays NaN (torch's own vector and scalar paths write different NaN bits)."""
    g = torch.Generator().manual_seed(3)
    Z = torch.rand(2, 64, 4, 33, generator=g).to(torch.bfloat16)  # u = z on [0, 1): no clamp rounding
    Z[0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    dh = torch.randn(2, 64, 33, generator=g)
    dh[0, 0, 4:8] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 2**-130])  # ties and a denormal
    Z[0, 0, 0, 4:8] = 2.0  # u = 1: dZ = dh, so the first three are exact halfway cases
    want = (Z.float().clamp(0.0, 1.0) * dh.unsqueeze(2)).to(torch.bfloat16)
    got = native.grad(Z, None, dh, 2, 1.0)
    nan = want.isnan()
    assert nan.sum() == Z.isnan().sum() == 1 and torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_native_results_do_not_depend_on_the_thread_count():
    Z = _z("per_run", torch.float32, R=2, N=33)
    g = torch.Generator().manual_seed(2)
    keep, dh = torch.rand(2, 33, 5, generator=g) < 0.5, torch.randn(2, 33, 19, generator=g)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append((*native.pool(Z, keep, 4, 1.3), native.grad(Z, keep, dh, 4, 1.3),
                         *native.sl(Z, torch.arange(66).view(2, 33) % 19, 4, 1.3, 19, 1),
                         *native.diag_loss(dh.abs(), dh.roll(1, 1).abs(), dh[:, 0], 0.75, True),
                         native.noise_max(Z, torch.rand(2, 33, 5, 3, generator=torch.Generator().manual_seed(6)),
                                          torch.randn(2, 3, 19, generator=torch.Generator().manual_seed(7)))))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_what_the_native_kernels_do_not_take_runs_eagerly():
    """A q beyond the built ones, float64, or a Z strided along K: ops(True) gives the eager numbers."""
    Z = _z("per_run", torch.float32)
    g = torch.Generator().manual_seed(4)
    keep, dh = torch.rand(*Z.shape[:3], generator=g) < 0.5, torch.randn(*Z.shape[:2], Z.shape[3], generator=g)
    assert native.pool(Z, keep, 7, 1.3) is None and native.grad(Z, keep, dh, 7, 1.3) is None
    h, D = dh.abs(), dh[:, 0]
    assert native.diag_loss(h.double(), h.double(), D.double(), 0.75) is None
    for a, b in zip(steps.ops(True).diag_loss(h.double(), h.double() + 1, D.double(), 0.75),
                    steps.diag_loss(h.double(), h.double() + 1, D.double(), 0.75)):
        assert a.dtype == torch.float64 and torch.equal(a, b)
    assert native.pool(Z, keep, 3.5, 1.3) is None and native.grad(Z, keep, dh, 3.5, 1.3) is None
    assert all(torch.equal(a, b) for a, b in zip(native.pool(Z, keep, 4.0, 1), native.pool(Z, keep, 4, 1.0)))
    fused = steps.ops(True)
    wide = torch.randn(3, 7, 5, 38, generator=g)
    for z, q in ((Z, 7), (Z.double(), 4), (wide[..., ::2], 4)):
        assert not native.supports(z) or q == 7
        for a, b in zip(fused.pool(z, keep, q, 1.3), steps.EAGER.pool(z, keep, q, 1.3)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused.grad(z, keep, dh, q, 1.3), steps.patch_grad(z, keep, dh, q, 1.3),
                                   rtol=1e-6, atol=1e-6)
    coef, Cf = torch.rand(3, 7, 5, 2, generator=g), torch.randn(3, 2, 19, generator=g)
    assert native.noise_max(Z.double(), coef, Cf) is None
    assert torch.equal(fused.noise_max(Z.double(), coef, Cf), probes.noise_max(Z.double(), coef, Cf))


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache and no library loaded in this process (restored afterwards)."""
    monkeypatch.setenv("MRPLAB_CACHE_DIR", str(tmp_path / "cache"))
    native._load.cache_clear()
    yield tmp_path
    native._load.cache_clear()


def _check_kernels_work():
    Z = _z("per_run", torch.float32)
    keep = torch.rand(*Z.shape[:3], generator=torch.Generator().manual_seed(5)) < 0.5
    r_vis, r_all, _ = reference_patch_ops(Z, keep, torch.zeros(*Z.shape[:2], Z.shape[3]), 4, 1.3)
    h_vis, h_all = native.pool(Z, keep, 4, 1.3)
    torch.testing.assert_close(h_all.double(), r_all, rtol=1e-5, atol=1e-5)


def test_a_compiler_without_openmp_still_builds_the_kernels(fresh_build, monkeypatch):
    """Apple's clang rejects -fopenmp: the build without OpenMP (one thread per call) is used instead."""
    real = native.compiler()
    cxx = fresh_build / "bin" / "c++"
    cxx.parent.mkdir()
    cxx.write_text("#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = -fopenmp ] && "
                   "{ echo \"clang: error: unsupported option '-fopenmp'\" >&2; exit 1; }; done\n"
                   f"exec {real} \"$@\"\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    _check_kernels_work()
    assert len(list((fresh_build / "cache" / "kernels").glob("*.so"))) == 1


def test_a_damaged_build_is_built_anew(fresh_build):
    """A file that does not load (cut short, or from another system) is rebuilt in place. (A fresh path:
    a library this process already loaded would be answered from the loader's own table.)"""
    path, command = native.library_path(native.compiler(), native.flag_sets()[0])
    path.write_bytes(b"not a shared library")
    lib = native._open(path, command)
    assert path.read_bytes()[:4] == b"\x7fELF" and lib.mrplab_pool is not None


def test_an_unwritable_cache_builds_in_the_temporary_folder(fresh_build, monkeypatch):
    blocker = fresh_build / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MRPLAB_CACHE_DIR", str(blocker / "cache"))  # under a file: no folder can be made
    monkeypatch.setattr("tempfile.tempdir", str(fresh_build))
    _check_kernels_work()
    assert len(list(fresh_build.glob("mrplab-kernels-*/*.so"))) == 1


@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_compact16_packs_the_kept_columns_run_after_run(simd, shared):
    """native.compact16 (steps.Visible's packed patches) against torch's gather, with AVX-512 VBMI2's compress
    (where this CPU has it) and with the portable loop: a width that is no multiple of 32, a run with no kept
    column, one with every column kept, and the rest random; every run's columns land from its start on."""
    c, d, M = 4, 5, 77
    g = torch.Generator().manual_seed(3)
    A = torch.randn(1 if shared else c, d, M, generator=g).to(torch.bfloat16)
    keep = torch.rand(c, M, generator=g) < 0.5
    keep[1] = False
    keep[2] = True
    counts = keep.sum(1).tolist()
    starts = [sum(counts[:r]) for r in range(c)]
    out = torch.full((d, sum(counts) + 1), 5.0, dtype=torch.bfloat16)
    assert native.compact16(A, keep, starts, out, simd=simd)
    for r in range(c):
        want = A[0 if shared else r][:, keep[r]]
        assert torch.equal(out[:, starts[r]:starts[r] + counts[r]], want), r
    assert not native.compact16(A.float(), keep, starts, out.float())  # bf16 only: fp32 gathers rows
    assert not native.compact16(A, keep, starts, out[:, :-1].contiguous())  # no spare column: declined
