"""The theory engine on an accelerator (CUDA) against the CPU.

The CUDA paths differ from the CPU's: torch.compile fuses the passes over Z (the CPU runs mrplab's C++ kernels),
MRP's weight gradient runs over every patch with per-run data and over the gathered visible rows with shared
data (the CPU packs them), masks are drawn on the CPU and copied over, and the runtime probe synchronises the
device. These tests hold each step to the CPU's eager numbers on the same inputs, a run to the CPU run of the
same seeds (the same masks and inits, so the same run to rounding), and the default's automatic choices to the
CPU's verdicts. Where torch sees no CUDA device they are skipped with the reason. MRPLAB_TEST_ACCEL=cpu runs
them with the CPU in the accelerator's place: a check of the tests themselves, not of a device.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from mrplab import config
from mrplab.rng import generator
from mrplab.runtime import matmul_flops, native_bf16
from mrplab.theory import experiment, net, steps
from mrplab.theory.objectives import make_run_masks
from tests.theory.test_experiment import SMALL, TINY  # precision fp32, compile false, threads 2; later keys win

ACCEL = torch.device(os.environ.get("MRPLAB_TEST_ACCEL", "cuda"))
_HERE = ACCEL.type == "cpu" or (ACCEL.type == "cuda" and torch.cuda.is_available())
pytestmark = pytest.mark.skipif(
    not _HERE, reason=f"skipped: no {ACCEL.type} device here; these tests hold the engine's {ACCEL.type} paths to "
    "the CPU (MRPLAB_TEST_ACCEL=cpu runs them on the CPU as a check of the tests)")

R, N, P, d, k, m = 3, 24, 8, 16, 3, 3
K = k * m
Q, THR = 4, 1.0


def _case(Rd: int, dtype: torch.dtype, seed: int = 7):
    """CPU inputs of one step: patches [Rd, N, P, d], labels, kernels of MRP and its two controls, their diagonal
    decoders, specs, masks [R, N, P] from the runs' mask streams. Weights large enough that patches land on all
    three pieces of the smoothed ReLU."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(Rd, N, P, d, generator=g).to(dtype)
    y = torch.randint(0, k, (Rd, N), generator=g)
    Ws = [0.6 * torch.randn(R, d, K, generator=g) for _ in range(3)]
    Ds = [torch.ones(R, K) + 0.1 * torch.randn(R, K, generator=g) for _ in range(3)]
    base = steps.MRPSpec("teacher", "all", "per_kernel", 0.75)
    specs = [base, dataclasses.replace(base, fit_decoder=True), dataclasses.replace(base, shuffled=True)]
    mask = make_run_masks([generator(s, "mrp:mask") for s in range(R)], N, P, 0.5)
    return X, y, Ws, Ds, specs, mask


def _on(t):
    return [x.to(ACCEL) for x in t] if isinstance(t, list) else t.to(ACCEL)


def _close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    """got (on the accelerator) against want (CPU): largest difference relative to want's largest entry."""
    err = float((got.detach().cpu().double() - want.double()).abs().max() / want.abs().max().clamp(min=1e-30))
    assert err < rel, f"{what}: {err:.2e} relative to its largest entry (at most {rel:.0e})"


def _kernels(kind: str) -> steps.PatchOps:
    return steps.EAGER if kind == "eager" else steps.ops(True)


DTYPES = [torch.float32, torch.bfloat16]


def _skip_unless_native(dtype: torch.dtype) -> None:
    native, why = native_bf16(ACCEL)
    if dtype == torch.bfloat16 and not native:
        pytest.skip(f"skipped: bf16 is emulated on {ACCEL.type} here ({why})")


def _tolerance(dtype: torch.dtype) -> float:
    """fp32: the two devices' sums in their own orders. bf16: Z rounded to bf16 on each, where the two products
    can round an entry to neighbouring values; Z in fp32 against bf16 on the CPU moved these steps' outputs by
    at most 0.8 % of their largest entry (fitted decoders' dD left out: 0 up to rounding)."""
    return 1e-4 if dtype == torch.float32 else 2e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("data", ["per_run", "shared"])
@pytest.mark.parametrize("kind", ["eager", "compiled"])
def test_mrp_step_with_its_controls_is_the_cpu_step(kind, data, dtype, monkeypatch):
    """MRP with the fitted-decoder and shuffled-pairing controls (steps.mrp_variants, as training calls it): loss,
    weight and decoder gradients, and the fitted decoder as the CPU's eager step gives them; on CUDA per-run data
    multiplies every patch in the weight gradient and shared data the visible ones only (steps.pays_visible), as
    the FLOP count shows."""
    _skip_unless_native(dtype)
    monkeypatch.setattr(steps, "VISIBLE_ROWS_STEP", 8)  # a run's visible rows rounded to 8, not to all N * P
    X, _, Ws, Ds, specs, mask = _case(R if data == "per_run" else 1, dtype)
    want = steps.mrp_variants(X, Ws, Ds, mask, Q, THR, specs, steps.EAGER)
    Xa = _on(X)
    before = dict(matmul_flops.by_shape)
    got = steps.mrp_variants(Xa, _on(Ws), _on(Ds), _on(mask), Q, THR, specs, _kernels(kind),
                             net.transposed_patches(Xa))
    counted = sum(matmul_flops.since(before).values())
    forward = 2 * N * P * d * K * 3 * R  # three variants, every patch
    visible = sum(2 * min(-(-n // steps.VISIBLE_ROWS_STEP) * steps.VISIBLE_ROWS_STEP, N * P) * d * K * 3
                  for n in (~mask).flatten(1).sum(1).tolist())
    assert visible < forward  # the two paths count differently: the check can fail
    assert counted == forward + (visible if ACCEL.type == "cpu" or data == "shared" else forward), counted
    tol = _tolerance(dtype)
    for v, (a, b) in enumerate(zip(got, want)):
        assert a.dW.device.type == ACCEL.type
        _close(a.loss, b.loss, tol, f"variant {v} loss")
        _close(a.dW, b.dW, tol, f"variant {v} dW")
        if specs[v].fit_decoder:
            _close(a.D, b.D, tol, f"variant {v} fitted decoder")
        else:
            _close(a.dD, b.dD, tol, f"variant {v} dD")
    assert not torch.allclose(want[0].dW, want[2].dW)  # the variants differ: a mix-up would show


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("data", ["per_run", "shared"])
@pytest.mark.parametrize("kind", ["eager", "compiled"])
def test_sl_finetune_and_encoder_are_the_cpu_ones(kind, data, dtype):
    _skip_unless_native(dtype)
    X, y, Ws, _, _, _ = _case(R if data == "per_run" else 1, dtype)
    W, ops, tol = Ws[0], _kernels(kind), _tolerance(dtype)
    Xa, Wa = _on(X), _on(W)
    Xt = net.transposed_patches(Xa)
    loss, dW, fitted = steps.sl(X, y, W, Q, THR, k, m)
    loss_a, dW_a, fitted_a = steps.sl(Xa, _on(y), Wa, Q, THR, k, m, ops, Xt)
    _close(loss_a, loss, tol, "SL loss")
    _close(dW_a, dW, tol, "SL dW")
    assert torch.equal(fitted_a.cpu(), fitted)
    h, h_a = steps.encode(X, W, Q, THR), steps.encode(Xa, Wa, Q, THR, ops)
    _close(h_a, h, tol, "encoder outputs")
    head = net.init_linear_head(h, k, True)  # its head starts at 0, where the encoder's gradient is 0: give it one
    head = dataclasses.replace(head, H=torch.randn(head.H.shape, generator=torch.Generator().manual_seed(1)))
    head_a = net.LinearHead(*(_on(getattr(head, f.name)) for f in dataclasses.fields(head)))
    want = steps.finetune(X, y, W, head, Q, THR)
    got = steps.finetune(Xa, _on(y), Wa, head_a, Q, THR, ops, Xt)
    assert want[1].abs().max() > 0  # the encoder's gradient: the check can fail
    for name, a, b in zip(("loss", "dW", "dH", "db"), got, want):
        _close(a, b, tol, f"fine-tuning {name}")


@pytest.mark.parametrize("extra", [["seeds=[0,1]"], ["seeds=[0,1,2]", "data.share_across_runs=true"]])
def test_a_run_on_the_accelerator_is_the_cpu_run(extra):
    """Same config and seeds on both devices (the accelerator with its fused kernels, the CPU eager): the same
    inits, data and masks, so the same kernels after every phase to rounding, and the same per-seed counts."""
    cpu = experiment.run(config.load(None, TINY + extra + ["compile=false"]))
    acc = experiment.run(config.load(None, TINY + extra + [f"device={ACCEL.type}", "compile=true"]))
    assert acc.W_mrp.device.type == ACCEL.type and acc.runtime["compile"] is True
    for name in ("W_sl", "W_mrp", "W_ft"):
        _close(getattr(acc, name), getattr(cpu, name), 1e-3, name)
    for name, W in cpu.W_controls.items():
        _close(acc.W_controls[name], W, 1e-3, f"W under the {name} control")
    for a, b in zip(acc.per_seed, cpu.per_seed):
        for key in ("sl_captured", "mrp_captured", "ft_captured", "sl_steps"):
            assert a[key] == b[key], (key, a[key], b[key])
        for key in ("sl_err_single", "ft_err_single", "sl_err_multi", "ft_err_multi"):
            assert abs(a[key] - b[key]) <= 0.01, (key, a[key], b[key])


def test_the_default_choices_on_the_accelerator_keep_the_cpu_verdicts(tmp_path, monkeypatch):
    """precision and compile auto on the accelerator, probed afresh: the choice and its reason recorded, bf16 only
    where the device has it natively, and the verdicts and captured counts (within 1 per seed) of the CPU's
    fp32 run."""
    monkeypatch.setenv("MRPLAB_CACHE_DIR", str(tmp_path))
    cpu = experiment.run(config.load(None, SMALL + ["precision=fp32", "compile=false"]))
    acc = experiment.run(config.load(None, SMALL + [f"device={ACCEL.type}", "precision=auto", "compile=auto"]))
    rt = acc.runtime
    assert rt["precision"] in ("fp32", "bf16") and rt["precision_reason"].startswith("auto: ")
    assert rt["compile_reason"].startswith("auto: ")
    if rt["precision"] == "bf16":
        assert native_bf16(ACCEL)[0], rt["precision_reason"]
    assert [v["verdict"] for v in acc.verdicts] == [v["verdict"] for v in cpu.verdicts]
    for a, b in zip(acc.per_seed, cpu.per_seed):
        for key in ("mrp_captured", "sl_captured", "ft_captured"):
            assert abs(a[key] - b[key]) <= 1, (key, a[key], b[key])


def test_vision_pretraining_on_the_accelerator_starts_as_the_cpu_run(tmp_path, monkeypatch):
    """The vision track's MAE pretraining on the accelerator in fp32, seed for seed: the same init, batches,
    augmentation and masks (CPU streams), so the first step's loss is the CPU's to rounding (a GPU may run the
    patch embedding's convolution in TF32); every loss finite, and the run trains (the loss falls). Then
    precision auto there: the choice and its reason recorded, bf16 only where the device has it natively."""
    from mrplab.vision import train
    from tests.vision.test_train import tiny

    monkeypatch.setenv("MRPLAB_CACHE_DIR", str(tmp_path / "cache"))
    runs = {}
    for name, extra in (("cpu", []), ("acc", [f"device={ACCEL.type}"])):
        seen: list[dict] = []
        train.run(tiny("pretrain.epochs=2", *extra), "pretrain", tmp_path / name, on_record=seen.append)
        runs[name] = [r["loss"] for r in seen if "loss" in r]
    cpu, acc = runs["cpu"], runs["acc"]
    assert len(acc) == len(cpu) >= 4 and all(torch.isfinite(torch.tensor(acc)))
    assert abs(acc[0] - cpu[0]) <= 1e-3 * abs(cpu[0]), (acc[0], cpu[0])
    assert acc[-1] < acc[0]
    res = train.run(tiny("pretrain.epochs=1", f"device={ACCEL.type}", "precision=auto"), "pretrain",
                    tmp_path / "auto")
    assert res.runtime["precision"] in ("fp32", "bf16") and res.runtime["precision_reason"]
    if res.runtime["precision"] == "bf16":
        assert native_bf16(ACCEL)[0], res.runtime["precision_reason"]
