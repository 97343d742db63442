"""One theory experiment: SL from scratch vs MRP -> fine-tuning, R seeds at once.

``run(cfg)`` trains and measures and returns a ``TheoryResult`` (no files);
the run folder is written by ``mrplab.report.run_folder``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from mrplab import runtime
from mrplab.config import TheoryConfig
from mrplab.runtime import resolve_device
from mrplab.rng import generator
from mrplab.theory import claims, net, probes, steps
from mrplab.theory.data import MultiViewData, TheoryData, make_data
from mrplab.theory.train import RunGens, finetune, pretrain_mrp, total_steps, train_sl


def _tolist(t: torch.Tensor) -> list:
    return t.detach().float().cpu().tolist()


class Recorder:
    """The train loops' hooks: probes every logged step and forwards progress."""

    def __init__(self, cfg: TheoryConfig, data: TheoryData, emit: Callable[[dict], None], advance: Callable[[int], None],
                 share: runtime.CoreShare | None = None):
        self.cfg, self.data, self.emit, self._advance, self.share = cfg, data, emit, advance, share
        self.thr = cfg.capture_threshold
        self.history: dict[str, list[dict]] = {"sl": [], "mrp": [], "mrp_control": [], "lp": [], "ft": []}
        self.seconds = 0.0  # time spent probing (inside the phases' times)

    def advance(self, n: int = 1) -> None:
        if self.share is not None:
            self.share.refresh()  # another mrplab process may have started or ended: re-divide the cores
        self._advance(n)

    def log(self, phase: str, step: int, state: dict) -> None:
        t0 = time.perf_counter()
        try:
            self._log(phase, step, state)
        finally:
            self.seconds += time.perf_counter() - t0

    def _log(self, phase: str, step: int, state: dict) -> None:
        cfg, bank = self.cfg, self.data.bank
        q, thr_act = cfg.net.q, cfg.net.threshold
        W = state["W"]
        C = probes.capture_matrix(W, bank)  # [R, K, k_total, L]
        ph = probes.phi(C)  # [R, k_total, L]
        rec: dict = {"phase": phase, "step": step, "loss": _tolist(state["loss"])}
        rec["phi"] = _tolist(ph)
        rec["n_captured"] = _tolist(probes.captured(C, self.thr).flatten(1).sum(-1))
        rec["max_features_per_kernel"] = _tolist(probes.kernel_purity(C, self.thr).amax(-1))
        train_set = self.data.pretrain if phase.startswith("mrp") else self.data.train
        with torch.no_grad():
            mem = torch.cat([probes.noise_memorisation(net.preact(steps.run_rows(train_set.X, s), W[s]),
                                                       train_set.runs(s), C[s])
                             for s in steps.chunks(train_set.X, W)])
            rec["noise_memorisation"] = _tolist(mem)
            if phase in ("sl", "lp", "ft"):
                h = steps.encode(self.data.test.X, W, q, thr_act)
                logits = net.sl_logits(h, bank.k, cfg.net.m) if phase == "sl" else state["head"](h)
                for key, v in probes.accuracy_by_view(logits, self.data.test).items():
                    rec[f"test_{key}"] = _tolist(v)
        for key in ("target_var", "pred_var"):
            if key in state:
                rec[key] = _tolist(state[key])
        self.history[phase].append(rec)
        self.emit(rec)


@dataclass
class TheoryResult:
    cfg: TheoryConfig
    data: TheoryData
    W_init: torch.Tensor
    W_sl: torch.Tensor
    W_mrp: torch.Tensor
    D_mrp: torch.Tensor
    W_ft: torch.Tensor
    head: net.LinearHead
    W_control: torch.Tensor | None  # MRP under the fitted-decoder control, None when not run
    per_seed: list[dict]
    verdicts: list[dict]
    history: dict[str, list[dict]]
    timings: dict[str, float] = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)  # threads, precision, compile: what was used and why; FLOPs


def _eval_view_errors(logits: torch.Tensor, test: MultiViewData) -> dict[str, torch.Tensor]:
    acc = probes.accuracy_by_view(logits, test)
    return {"err": 1 - acc["acc"], "err_multi": 1 - acc["acc_multi"], "err_single": 1 - acc["acc_single"]}


THRESHOLD_CURVE = (0.5, 1.0, 2.0, 4.0)  # C3a read at these multiples of the capture threshold


def measure(cfg: TheoryConfig, data: TheoryData, W_init, W_sl, W_mrp, W_ft, head, W_control=None,
            sl_steps=None, sl_fitted=None) -> list[dict]:
    """Per-seed metrics that the claims read, from the final weights."""
    bank, thr = data.bank, cfg.capture_threshold
    q, thr_act, k, m = cfg.net.q, cfg.net.threshold, bank.k, cfg.net.m
    with torch.no_grad():
        C0, C_sl, C_mrp, C_ft = (probes.capture_matrix(W, bank) for W in (W_init, W_sl, W_mrp, W_ft))
        lot = probes.sl_lottery(C0, C_sl, k, m, thr)
        curve = {f: probes.share_classes_one_feature(C_sl, k, m, f * thr) for f in THRESHOLD_CURVE}
        sl_err = _eval_view_errors(net.sl_logits(steps.encode(data.test.X, W_sl, q, thr_act), k, m), data.test)
        ft_err = _eval_view_errors(head(steps.encode(data.test.X, W_ft, q, thr_act)), data.test)
        shown = bank.covered  # [k_total, L] features the pretraining data shows
        cap_mrp = probes.captured(C_mrp, thr)  # [R, k_total, L]
        cap_ft = probes.captured(C_ft, thr)
        cap_sl = probes.captured(C_sl, thr)
        down = torch.zeros_like(shown)
        down[:k] = True
        purity = probes.pure_kernels(C_mrp, thr)
        per_kernel = probes.kernel_purity(C_mrp, thr)  # [R, K]
        align0, align = probes.alignment(W_init, bank), probes.alignment(W_mrp, bank)
        norm0 = W_init.float().norm(dim=1)  # [R, K]
        growth = (W_mrp.float().norm(dim=1) / norm0).mean(-1)  # [R]
        health0 = probes.representation_health(steps.encode(data.pretrain.X, W_init, q, thr_act))
        health = probes.representation_health(steps.encode(data.pretrain.X, W_mrp, q, thr_act))
        if W_control is not None:
            cap_ctrl = probes.captured(probes.capture_matrix(W_control, bank), thr)
            align_ctrl = probes.alignment(W_control, bank)
            growth_ctrl = (W_control.float().norm(dim=1) / norm0).mean(-1)
    out = []
    for r, seed in enumerate(cfg.seeds):
        n_shown = int(shown.sum())
        mrp_cap_shown = int((cap_mrp[r] & shown).sum())
        kept_base = cap_mrp[r] & down
        retained = float((cap_ft[r] & kept_base).sum()) / max(int(kept_base.sum()), 1) if kept_base.any() else float("nan")
        capturing = per_kernel[r][per_kernel[r] > 0]
        n_capturing = int(purity["capturing"][r])
        spread_ratio = float(health["spread"][r] / health0["spread"][r].clamp(min=1e-30))
        eff_rank = float(health["effective_rank"][r])
        mean_over_shown = lambda t: float(t[shown].mean())  # noqa: E731
        row = {
            "seed": seed,
            "mrp_captured": int(cap_mrp[r].sum()),
            "mrp_captured_shown": mrp_cap_shown,
            "n_features_shown": n_shown,
            "mrp_captured_share": mrp_cap_shown / max(n_shown, 1),
            "mrp_captured_half": int(mrp_cap_shown >= 0.5 * n_shown),
            "mrp_captured_hidden": int((cap_mrp[r] & ~shown).sum()),
            "mrp_max_features_per_kernel": int(per_kernel[r].max()),
            "mrp_max_features_per_capturing_kernel": float(capturing.max()) if capturing.numel() else float("nan"),
            "mrp_kernels_capturing": n_capturing,
            "mrp_pure_kernels": int(purity["pure"][r]),
            "mrp_fused_kernels": int(purity["fused"][r]),
            "mrp_pure_kernel_share": int(purity["pure"][r]) / n_capturing if n_capturing else float("nan"),
            "mrp_features_held_by_pure_share": float((purity["held_by_pure"][r] & shown).sum()) / max(n_shown, 1),
            "mrp_alignment_init": mean_over_shown(align0[r]),
            "mrp_alignment": mean_over_shown(align[r]),
            "mrp_norm_growth": float(growth[r]),
            "mrp_spread_ratio": spread_ratio,
            "mrp_effective_rank": eff_rank,
            "mrp_collapsed": int(not math.isfinite(spread_ratio) or spread_ratio < 0.1 or eff_rank < 1.5),
            "mrp_control_captured_share": (float((cap_ctrl[r] & shown).sum()) / max(n_shown, 1)
                                           if W_control is not None else float("nan")),
            "mrp_control_alignment": mean_over_shown(align_ctrl[r]) if W_control is not None else float("nan"),
            "mrp_control_norm_growth": float(growth_ctrl[r]) if W_control is not None else float("nan"),
            "sl_captured": int(cap_sl[r, :k].sum()),
            "sl_captured_per_class_mean": float(lot["captured_per_class"][r].float().mean()),
            "sl_share_classes_one_feature": float((lot["captured_per_class"][r] == 1).float().mean()),
            **{f"sl_share_classes_one_feature_at_{f:g}x": float(curve[f][r]) for f in THRESHOLD_CURVE},
            "sl_lottery_hit_rate": float(lot["lottery_hit_rate"][r]),
            # per class: the feature l that won SL, and the one the initial correlations predicted
            "sl_winner_per_class": [int(x) if c > 0 else -1 for x, c in
                                    zip(lot["winner"][r].tolist(), lot["captured_per_class"][r].tolist())],
            "sl_predicted_winner_per_class": lot["predicted"][r].tolist(),
            "sl_steps": int(sl_steps[r]) if sl_steps is not None else cfg.sl.steps,
            "sl_fitted": int(sl_fitted[r]) if sl_fitted is not None else -1,
            "ft_captured": int(cap_ft[r, :k].sum()),
            "ft_retained_share": retained,
            "sl_err": float(sl_err["err"][r]),
            "sl_err_multi": float(sl_err["err_multi"][r]),
            "sl_err_single": float(sl_err["err_single"][r]),
            "ft_err": float(ft_err["err"][r]),
            "ft_err_multi": float(ft_err["err_multi"][r]),
            "ft_err_single": float(ft_err["err_single"][r]),
            "single_view_gap": float(sl_err["err_single"][r] - ft_err["err_single"][r]),
        }
        out.append(row)
    return out


def growth_drive(per_seed: list[dict]) -> str:
    """One sentence: which drive the run's MRP features came from, read off the fitted-decoder control.

    With the decoder at its least-squares optimum every step, a kernel's norm cannot grow in the
    polynomial phase (a fitted linear decoder absorbs any rescaling of the encoder), so what the
    control can still show is direction: kernels that turn toward features are pulled there by
    predicting masked content from visible content. "Turned toward" means the mean alignment got at
    least halfway from its value at init to a pure feature direction (cos = 1).
    """
    ctrl = [m for m in per_seed if not math.isnan(m["mrp_control_captured_share"])]
    if not ctrl:
        return "The fitted-decoder control was not run (mrp.control=false), so the growth drive is not identified."
    mean = lambda key: sum(m[key] for m in ctrl) / len(ctrl)  # noqa: E731
    c_main, c_ctrl = mean("mrp_captured_share"), mean("mrp_control_captured_share")
    a0, a_main, a_ctrl = mean("mrp_alignment_init"), mean("mrp_alignment"), mean("mrp_control_alignment")
    g_ctrl = mean("mrp_control_norm_growth")
    nums = (f"captured share {c_main:.2f} as trained vs {c_ctrl:.2f} under the fitted-decoder control; kernel "
            f"norms x{g_ctrl:.2f} under the control; feature alignment {a0:.2f} at init, {a_main:.2f} as trained, "
            f"{a_ctrl:.2f} under the control")
    turned = a_ctrl >= a0 + 0.5 * (1.0 - a0)
    if c_main == 0:
        return f"MRP captured no feature, so there is no growth to attribute ({nums})."
    if c_ctrl >= c_main - 1e-9:
        return (f"The features grow by masked reconstruction: they reach the capture threshold with the decoder "
                f"fitted at every step too ({nums}).")
    if turned:
        return (f"Masked reconstruction chose the features and the decoder's lag grew them: under the fitted-decoder "
                f"control the kernels turned toward the features but their norms could not grow ({nums}).")
    return (f"The features came from the decoder's lag, not from masked reconstruction: under the fitted-decoder "
            f"control the kernels neither grew nor turned toward the features ({nums}).")


def run(
    cfg: TheoryConfig,
    emit: Callable[[dict], None] = lambda rec: None,
    advance: Callable[[int], None] = lambda n: None,
    on_runtime: Callable[[dict], None] = lambda info: None,
) -> TheoryResult:
    """Train SL, MRP and fine-tuning for every seed and measure the claims.

    ``on_runtime`` is told the threads, precision and compilation the run uses
    (and why) before training starts.
    """
    allocator = runtime.keep_freed_memory()
    with runtime.CoreShare(cfg.threads) as share:
        result = _run(cfg, emit, advance, on_runtime, share)
    result.runtime["allocator"] = allocator
    return result


def choose_runtime(cfg: TheoryConfig, device: torch.device) -> tuple[runtime.Choice, tuple[int, ...], bool]:
    """Precision and compilation for this run (measured or cached, runtime.py). Returns
    (choice, the activation's chunk shape, whether the compile probe ran in this process)."""
    R, K, P, d = len(cfg.seeds), cfg.data.k * cfg.net.m, cfg.data.P, cfg.data.d
    N = cfg.data.n_train
    chunks = steps.run_chunks(R, N * P * K)
    c = chunks[0].stop - chunks[0].start
    shared = cfg.data.share_across_runs
    shapes = [(N * P, d, K * (c if shared else 1))]  # one matmul of the engine: X[N*P, d] @ W[d, K] per run
    precision, p_why, rates = runtime.choose_precision(cfg.precision, device, shapes)
    ft = cfg.finetune
    calls = len(chunks) * (cfg.sl.steps + cfg.mrp.steps * (2 if run_control(cfg) else 1) + 2
                           + (ft.ft_steps + 1 if ft.mode in ("ft", "lp_ft") else 0))
    shape = (c, N, P, K)
    q, thr = cfg.net.q, cfg.net.threshold
    compiled, c_why, probed = runtime.choose_compile(
        cfg.compile, device, ("act", shape), calls,
        lambda: steps.time_eager_act(shape, q, thr), lambda: steps.time_compiled_act(shape, q, thr))
    return runtime.Choice(precision, p_why, compiled, c_why, rates), shape, probed


def _run(cfg, emit, advance, on_runtime, share: runtime.CoreShare) -> TheoryResult:
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    flops0 = runtime.matmul_flops.total
    choice, act_shape, probed_now = choose_runtime(cfg, device)
    info = {**share.record(), **choice.record()}
    on_runtime(info)
    t_choice = time.perf_counter()
    data = make_data(cfg.data, cfg.seeds)
    data = TheoryData(bank=data.bank, pretrain=data.pretrain.to(device), train=data.train.to(device),
                      test=data.test.to(device))
    if choice.precision == "bf16":
        for ds in (data.pretrain, data.train, data.test):
            ds.X = ds.X.to(torch.bfloat16)  # matmul inputs in bf16; everything computed from Z stays fp32
    data.bank.V = data.bank.V.to(device)
    data.bank.covered = data.bank.covered.to(device)
    t_data = time.perf_counter()

    K = cfg.data.k * cfg.net.m
    seeds = cfg.seeds
    W_init = net.init_kernels([generator(s, "init") for s in seeds], cfg.data.d, K, cfg.net.sigma_0).to(device)
    rec = Recorder(cfg, data, emit, advance, share)
    log_every = cfg.probes.log_every

    def gens(phase: str) -> RunGens:
        return RunGens(
            mask=[generator(s, f"{phase}:mask", device) for s in seeds],
            batch=[generator(s, f"{phase}:batch") for s in seeds],
            head=[generator(s, f"{phase}:head") for s in seeds],
        )

    act = steps.FirstCallTimer(steps.activation(choice.compile))
    sl = train_sl(W_init, data.train, cfg.sl, cfg.net, cfg.data.k, gens("sl"), rec, log_every, act)
    W_sl = sl.W
    t_sl = time.perf_counter()
    mrp = pretrain_mrp(W_init, data.pretrain, cfg.mrp, cfg.net, gens("mrp"), rec, log_every, act)
    W_control = None
    if run_control(cfg):  # same init, data and masks; only the decoder differs
        W_control = pretrain_mrp(W_init, data.pretrain, cfg.mrp, cfg.net, gens("mrp"), rec, log_every, act,
                                 fit_decoder=True, phase="mrp_control").W
    t_mrp = time.perf_counter()
    ft = finetune(mrp.W, data.train, cfg.finetune, cfg.net, cfg.data.k, gens("ft"), rec, log_every, act)
    t_ft = time.perf_counter()

    per_seed = measure(cfg, data, W_init, W_sl, mrp.W, ft.W, ft.head, W_control, sl.steps, sl.fitted)
    with torch.no_grad():
        for r, m in enumerate(per_seed):
            m["noise_memorisation_sl"] = rec.history["sl"][-1]["noise_memorisation"][r]
            m["noise_memorisation_mrp"] = rec.history["mrp"][-1]["noise_memorisation"][r]
    verdicts = claims.evaluate(per_seed, cfg.data.L, cfg.data.mu_test)
    timings = {"runtime_choice_s": t_choice - t0, "data_s": t_data - t_choice, "sl_s": t_sl - t_data,
               "mrp_s": t_mrp - t_sl, "finetune_s": t_ft - t_mrp, "probes_s": rec.seconds,
               "total_s": time.perf_counter() - t0}
    if choice.compile and act.first_call_s is not None:
        info["compile_first_call_s"] = act.first_call_s
        if not probed_now and cfg.compile == "auto":  # what a run with warm caches pays
            runtime.note_compile_cost(device, ("act", act_shape), act.first_call_s)
    info["threads_seen"] = sorted(set(share.seen))
    info["matmul_flops"] = runtime.matmul_flops.total - flops0
    return TheoryResult(cfg=cfg, data=data, W_init=W_init, W_sl=W_sl, W_mrp=mrp.W, D_mrp=mrp.D, W_ft=ft.W,
                        head=ft.head, W_control=W_control, per_seed=per_seed, verdicts=verdicts, history=rec.history, timings=timings,
                        runtime=info)


def run_control(cfg: TheoryConfig) -> bool:
    """The fitted-decoder control runs beside MRP unless turned off or MRP itself fits its decoder."""
    return cfg.mrp.control and cfg.mrp.decoder_fit == "sgd"


def planned_steps(cfg: TheoryConfig) -> int:
    return total_steps(cfg.sl, cfg.mrp, cfg.finetune) + (cfg.mrp.steps if run_control(cfg) else 0)
