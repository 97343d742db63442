"""End to end on small sizes: the measured outcome, reproducibility, and batching independence."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mrplab import config
from mrplab.theory import experiment, steps
from mrplab.runtime import native_bf16

_NATIVE_BF16, _BF16_WHY = native_bf16(torch.device("cpu"))
needs_native_bf16 = pytest.mark.skipif(
    not _NATIVE_BF16, reason=f"skipped: bf16 is emulated on this CPU ({_BF16_WHY}), so a bf16 run is slow here; "
    "precision=auto never picks it on such a CPU")


# k=5 classes at d=300: big enough for the SL lottery to show (at d<=100 SL learns both
# features of every class), small enough to run in ~40 s on 2 cores.
SMALL = [
    "data.k=5", "data.d=300", "data.n_pretrain=800", "data.n_train=500", "data.n_test=600",
    "sl.steps=1000", "mrp.steps=1000", "finetune.lp_steps=200", "finetune.ft_steps=100",
    "net.m=6", "net.q=4", "seeds=[0,1]", "threads=2", "precision=fp32", "compile=false",
]

# a tiny config for properties that do not need the regime; threads pinned, since exact comparisons
# need one reduction order (with threads null a run re-divides the cores when other mrplab processes start)
TINY = [
    "data.k=4", "data.d=64", "data.P=12", "data.n_pretrain=200", "data.n_train=150", "data.n_test=200",
    "sl.steps=60", "mrp.steps=60", "finetune.lp_steps=30", "finetune.ft_steps=20", "probes.log_every=20",
    "precision=fp32", "compile=false", "threads=2",
]


@pytest.fixture(scope="module")
def small_result():
    return experiment.run(config.load(None, SMALL))


def test_mrp_captures_more_than_sl_and_ft_wins_on_single_view(small_result):
    n_features = 5 * 2
    for m in small_result.per_seed:
        # MRP captures every feature; SL loses the lottery for some classes
        assert m["mrp_captured_shown"] == n_features, m
        assert m["sl_captured"] < m["mrp_captured_shown"], m
        # fine-tuning keeps what MRP captured
        assert m["ft_retained_share"] == 1.0
        assert m["ft_captured"] >= m["mrp_captured_shown"]
        # multi-view test data is easy for both; single-view data separates them
        assert m["sl_err_multi"] <= 0.02 and m["ft_err_multi"] <= 0.02
        assert m["ft_err_single"] <= 0.05
        assert m["sl_err_single"] >= m["ft_err_single"] + 0.15
        # the lottery: SL's winner is the feature with the larger initial correlation
        assert m["sl_lottery_hit_rate"] >= 0.75


def test_verdicts_are_computed_from_the_per_seed_numbers(small_result):
    by_id = {v["id"]: v for v in small_result.verdicts}
    assert set(by_id) == {"C1", "C2", "C3a", "C3b", "C4a", "C4b", "C5a", "C5b", "C6", "C7"}
    for v in small_result.verdicts:
        expected = [float(m[v["metric"]]) for m in small_result.per_seed]
        assert v["per_seed"] == expected
        assert v["verdict"] in ("PASS", "FAIL", "N/A")
    assert by_id["C1"]["verdict"] == "PASS"
    assert by_id["C6"]["verdict"] == "PASS"
    assert by_id["C4b"]["verdict"] == "PASS"


def test_the_controls_show_what_grows_the_features(small_result):
    """MRP's features reach the threshold only (a) with a decoder that learns by gradient descent and (b) when
    each sample is asked for its own masked content. Fitted decoder (same init, data, masks): the kernels keep
    their norms (a fitted linear decoder absorbs any rescaling of the encoder) and capture nothing. Targets
    paired with another sample: nothing is captured either. If MRP's features grew without reconstruction
    (self-amplification), or the controls did not change what they claim to, this fails."""
    for m in small_result.per_seed:
        assert m["mrp_captured_share"] == 1.0 and m["mrp_norm_growth"] > 5.0, m
        assert m["mrp_fitted_decoder_captured_share"] == 0.0, m
        assert abs(m["mrp_fitted_decoder_norm_growth"] - 1.0) < 0.01, m
        assert m["mrp_shuffled_pairing_captured_share"] == 0.0, m
        # directions: trained kernels align with features; the fitted-decoder control's stay near their start
        assert m["mrp_alignment"] > 0.8 > m["mrp_alignment_init"] + 0.3, m
        assert abs(m["mrp_fitted_decoder_alignment"] - m["mrp_alignment_init"]) < 0.1, m
        assert m["mrp_collapsed"] == 0
    drive = experiment.growth_drive(small_result.per_seed)
    assert "own masked content" in drive and "lags its optimum" in drive


def test_history_logs_probes_over_training(small_result):
    h = small_result.history
    assert [r["step"] for r in h["mrp"]][:2] == [0, 50] and h["mrp"][-1]["step"] == 1000
    first, last = h["mrp"][0], h["mrp"][-1]
    assert first["n_captured"] == [0.0, 0.0]  # deep polynomial phase at init
    assert last["n_captured"] == [10.0, 10.0]
    assert all("test_acc_single" in r for r in h["sl"] + h["lp"] + h["ft"])
    assert all(v > 0 for v in last["target_var"])
    for c in ("mrp_fitted_decoder", "mrp_shuffled_pairing"):
        assert [r["step"] for r in h[c]] == [r["step"] for r in h["mrp"]]  # the control runs, logged alike


def test_same_config_and_seed_reproduce_identical_numbers():
    cfg = config.load(None, TINY + ["seeds=[3,4]"])
    a = experiment.run(cfg)
    b = experiment.run(cfg)
    assert json.dumps(a.per_seed) == json.dumps(b.per_seed)  # nan-aware exact comparison
    assert json.dumps(a.verdicts) == json.dumps(b.verdicts)
    assert torch.equal(a.W_mrp, b.W_mrp) and torch.equal(a.W_sl, b.W_sl) and torch.equal(a.W_ft, b.W_ft)


def test_a_seed_gives_the_same_run_alone_or_batched():
    alone = experiment.run(config.load(None, TINY + ["seeds=[4]"]))
    batched = experiment.run(config.load(None, TINY + ["seeds=[3,4]"]))
    # same data, init and masks for seed 4; only the matmul batching differs
    torch.testing.assert_close(alone.W_init[0], batched.W_init[1], rtol=0, atol=0)
    for name in ("W_sl", "W_mrp", "W_ft"):
        torch.testing.assert_close(getattr(alone, name)[0], getattr(batched, name)[1], rtol=1e-4, atol=1e-6)
    for key in ("sl_err_single", "ft_err_single", "sl_captured", "mrp_captured"):
        assert math.isclose(alone.per_seed[0][key], batched.per_seed[1][key], abs_tol=1e-3)


def test_the_run_records_its_matmul_flops_by_shape(small_result):
    """What the efficiency benchmark holds each FLOP to: MRP with its two controls multiplies [N*P, d] @ [d, 3K]
    per run forward and, on the CPU, its weight gradient over the run's visible patches only ([rows, d] with rows
    the visible count rounded up to steps.VISIBLE_ROWS_STEP: about half of N*P at mask ratio 0.5); SL and
    fine-tuning [N*P, d] @ [d, K]; the shapes add up to the total."""
    rt = small_result.runtime
    by_shape = rt["matmul_flops_by_shape"]
    assert sum(by_shape.values()) == rt["matmul_flops"] > 0
    K, P = 5 * 6, 16
    mrp_steps, R = 1000 + 1, 2
    dense = mrp_steps * R * (2 * 800 * P * 300 * 3 * K)  # one product of every patch per run and step
    assert by_shape[f"{800 * P}x300x{3 * K}"] == dense  # the forward alone
    visible = {k: f for k, f in by_shape.items() if k.endswith(f"x300x{3 * K}") and k != f"{800 * P}x300x{3 * K}"}
    rows = [int(k.split("x")[0]) for k in visible]
    assert visible and all(m % steps.VISIBLE_ROWS_STEP == 0 and m < 800 * P for m in rows)
    assert 0.45 < sum(visible.values()) / dense < 0.55  # half the patches visible, rounded up to the row step
    assert f"{500 * P}x300x{K}" in by_shape and not any(k.endswith(f"x{2 * K}") for k in by_shape)


def test_matmul_shapes_are_the_products_the_steps_run():
    """The precision probe's shapes: SL's per run, and MRP's with its controls side by side (not under an EMA
    teacher, whose variants step one by one); shared data: one product per chunk of runs."""
    shapes = experiment.matmul_shapes
    assert shapes(config.load(None, [])) == [(16000, 300, 80), (16000, 300, 240)]
    assert shapes(config.load(None, ["mrp.controls=[fitted_decoder]", "data.n_pretrain=500"])) == [
        (16000, 300, 80), (8000, 300, 160)]
    assert shapes(config.load(None, ["mrp.controls=[]"])) == [(16000, 300, 80)]
    assert shapes(config.load(None, ["mrp.teacher_momentum=0.9"])) == [(16000, 300, 80)]
    assert shapes(config.load(None, ["data.share_across_runs=true", "seeds=[0,1,2,3]"])) == [(16000, 300, 320)]


def test_shared_data_uses_one_data_set_for_all_runs():
    res = experiment.run(config.load(None, TINY + ["seeds=[0,1]", "data.share_across_runs=true"]))
    assert res.data.train.X.shape[0] == 1
    # different inits on the same data still train to different kernels
    assert not torch.equal(res.W_mrp[0], res.W_mrp[1])


@needs_native_bf16
def test_bf16_matches_fp32_verdicts_and_captures(small_result):
    """precision=bf16 (bf16 patches and matmul inputs) reproduces fp32's outcome on the small config."""
    bf = experiment.run(config.load(None, SMALL + ["precision=bf16"]))
    assert bf.data.train.X.dtype == torch.bfloat16
    assert [v["verdict"] for v in bf.verdicts] == [v["verdict"] for v in small_result.verdicts]
    for m32, m16 in zip(small_result.per_seed, bf.per_seed):
        for key in ("mrp_captured", "sl_captured", "ft_captured"):
            assert abs(m32[key] - m16[key]) <= 1, (key, m32[key], m16[key])
        assert abs(m32["ft_err_single"] - m16["ft_err_single"]) <= 0.03
        assert abs(m32["sl_err_single"] - m16["sl_err_single"]) <= 0.1


def test_compiled_activation_gives_the_same_run():
    """compile=true fuses the smoothed ReLU with torch.compile; the numbers must not change."""
    same_n = ["data.n_pretrain=150", "data.n_train=150"]  # one training shape: one compilation
    eager = experiment.run(config.load(None, TINY + same_n + ["seeds=[0]"]))
    fused = experiment.run(config.load(None, TINY + same_n + ["seeds=[0]", "compile=true"]))
    for name in ("W_sl", "W_mrp", "W_ft"):
        torch.testing.assert_close(getattr(fused, name), getattr(eager, name), rtol=1e-5, atol=1e-7)
    assert json.dumps(fused.verdicts) == json.dumps(eager.verdicts)


def _planted_measure(W_mrp_of):
    """experiment.measure on TINY data with MRP kernels planted from the init: (W_init, per-seed metrics)."""
    from mrplab.rng import generator
    from mrplab.theory import net
    from mrplab.theory.data import make_data

    cfg = config.load(None, TINY + ["seeds=[0,1]"])
    data = make_data(cfg.data, cfg.seeds)
    K = cfg.data.k * cfg.net.m
    W0 = net.init_kernels([generator(s, "init") for s in cfg.seeds], cfg.data.d, K, 0.3)
    head = net.init_linear_head(net.encode(data.train.X, W0, cfg.net.q, cfg.net.threshold), cfg.data.k, True)
    return experiment.measure(cfg, data, W0, W0, W_mrp_of(W0), W0, head)


def test_collapse_is_detected_on_planted_collapsed_encoders():
    healthy = _planted_measure(lambda W0: 2.0 * W0)
    assert [m["mrp_collapsed"] for m in healthy] == [0, 0]
    # shrunk: outputs fall to (1/10)^q of their spread at init
    shrunk = _planted_measure(lambda W0: 0.1 * W0)
    assert [m["mrp_collapsed"] for m in shrunk] == [1, 1]
    assert all(m["mrp_spread_ratio"] < 1e-3 for m in shrunk)
    # one direction: every kernel a copy of kernel 0 (effective rank 1)
    same = _planted_measure(lambda W0: 3.0 * W0[:, :, :1].expand_as(W0).clone())
    assert [m["mrp_collapsed"] for m in same] == [1, 1]
    assert all(m["mrp_effective_rank"] < 1.01 for m in same)
    # and every claim that reads the MRP encoder is N/A on such a run
    from mrplab.theory import claims

    by_id = {v["id"]: v for v in claims.evaluate(same, 2, 0.5)}
    assert all(by_id[c]["verdict"] == "N/A" for c in ("C1", "C2", "C4a", "C4b", "C6", "C7"))
