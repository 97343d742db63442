"""One theory experiment: SL from scratch vs MRP -> fine-tuning, R seeds at once.

``run(cfg)`` trains and measures and returns a ``TheoryResult`` (no files);
the run folder is written by ``mrplab.theory.run_folder``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from mrplab import memory, runtime
from mrplab.config import TheoryConfig
from mrplab.runtime import resolve_device
from mrplab.rng import generator
from mrplab.theory import claims, net, probes, steps
from mrplab.theory.data import MultiViewData, TheoryData, make_data
from mrplab.theory.train import RunGens, finetune, finetune_steps, pretrain_mrp_variants, train_sl


def _tolist(t: torch.Tensor) -> list:
    return t.detach().float().cpu().tolist()


class Recorder:
    """The train loops' hooks: probes every logged step and forwards progress."""

    def __init__(self, cfg: TheoryConfig, data: TheoryData, emit: Callable[[dict], None], advance: Callable[[int], None],
                 share: runtime.CoreShare | None = None, ops: steps.PatchOps = steps.EAGER):
        self.cfg, self.data, self.emit, self._advance, self.share = cfg, data, emit, advance, share
        self.ops = ops  # the run's kernels, for the probes' forward passes
        self.thr = cfg.capture_threshold
        self.history: dict[str, list[dict]] = {"sl": [], "mrp": [], **{f"mrp_{c}": [] for c in CONTROLS}, "lp": [], "ft": []}
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
            mem = torch.cat([probes.noise_memorisation(net.preact(steps.run_rows(train_set.X, s), W[s], native=True),
                                                       train_set.runs(s), C[s], self.ops.noise_max)
                             for s in steps.chunks(train_set.X, W)])
            rec["noise_memorisation"] = _tolist(mem)
            if phase in ("sl", "lp", "ft"):
                h = steps.encode(self.data.test.X, W, q, thr_act, self.ops)
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
    W_controls: dict[str, torch.Tensor]  # MRP under each control run (CONTROLS), by name
    per_seed: list[dict]
    verdicts: list[dict]
    history: dict[str, list[dict]]
    timings: dict[str, float] = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)  # threads, precision, compile: what was used and why; FLOPs


def _eval_view_errors(logits: torch.Tensor, test: MultiViewData) -> dict[str, torch.Tensor]:
    acc = probes.accuracy_by_view(logits, test)
    return {"err": 1 - acc["acc"], "err_multi": 1 - acc["acc_multi"], "err_single": 1 - acc["acc_single"]}


THRESHOLD_CURVE = (0.5, 1.0, 2.0, 4.0)  # C3a read at these multiples of the capture threshold

# Control runs of MRP: same init, data and masks, one thing changed (config.MRPConfig.controls).
#   fitted_decoder    the decoder at its least-squares optimum every step: does growth need a lagging decoder?
#   shuffled_pairing  sample n is given sample n+1's target: does growth need the sample's own masked content?
CONTROLS = {"fitted_decoder": {"fit_decoder": True}, "shuffled_pairing": {"shuffled": True}}


def measure(cfg: TheoryConfig, data: TheoryData, W_init, W_sl, W_mrp, W_ft, head,
            W_controls: dict[str, torch.Tensor] | None = None, sl_steps=None, sl_fitted=None,
            ops: steps.PatchOps = steps.EAGER) -> list[dict]:
    """Per-seed metrics that the claims read, from the final weights (names: theory/metrics.py);
    ``ops``: the kernels the encoder's forward passes use (the run's own)."""
    with torch.no_grad():
        mrp = _mrp_metrics(cfg, data, W_init, W_mrp, W_controls or {}, ops)
        sl = _sl_metrics(cfg, data, W_init, W_sl, sl_steps, sl_fitted)
        ft = _ft_capture_metrics(cfg, data, W_mrp, W_ft)
        err = _error_metrics(cfg, data, W_sl, W_ft, head, ops)
    return [{"seed": seed, **mrp[r], **sl[r], **ft[r], **err[r]} for r, seed in enumerate(cfg.seeds)]


def _mrp_metrics(cfg: TheoryConfig, data: TheoryData, W_init, W_mrp, W_controls: dict, ops: steps.PatchOps) -> list[dict]:
    """Capture, purity, alignment, growth and collapse of the MRP encoder, and of each control run."""
    bank, thr, q, thr_act = data.bank, cfg.capture_threshold, cfg.net.q, cfg.net.threshold
    shown = bank.covered  # [k_total, L] features the pretraining data shows
    n_shown = int(shown.sum())
    C_mrp = probes.capture_matrix(W_mrp, bank)
    cap = probes.captured(C_mrp, thr)  # [R, k_total, L]
    purity = probes.pure_kernels(C_mrp, thr)
    per_kernel = probes.kernel_purity(C_mrp, thr)  # [R, K]
    align0, align = probes.alignment(W_init, bank), probes.alignment(W_mrp, bank)
    norm0 = W_init.float().norm(dim=1)  # [R, K]
    growth = (W_mrp.float().norm(dim=1) / norm0).mean(-1)  # [R]
    health0 = probes.representation_health(steps.encode(data.pretrain.X, W_init, q, thr_act, ops))
    health = probes.representation_health(steps.encode(data.pretrain.X, W_mrp, q, thr_act, ops))
    ctrl = {name: (probes.captured(probes.capture_matrix(W_controls[name], bank), thr),
                   probes.alignment(W_controls[name], bank), (W_controls[name].float().norm(dim=1) / norm0).mean(-1))
            for name in CONTROLS if name in W_controls}
    nan = float("nan")
    mean_over_shown = lambda t: float(t[shown].mean())  # noqa: E731
    rows = []
    for r in range(W_mrp.shape[0]):
        captured_shown = int((cap[r] & shown).sum())
        capturing = per_kernel[r][per_kernel[r] > 0]
        n_capturing = int(purity["capturing"][r])
        spread_ratio = float(health["spread"][r] / health0["spread"][r].clamp(min=1e-30))
        eff_rank = float(health["effective_rank"][r])
        rows.append({
            "mrp_captured": int(cap[r].sum()),
            "mrp_captured_shown": captured_shown,
            "n_features_shown": n_shown,
            "mrp_captured_share": captured_shown / max(n_shown, 1),
            "mrp_captured_half": int(captured_shown >= 0.5 * n_shown),
            "mrp_captured_hidden": int((cap[r] & ~shown).sum()),
            "mrp_max_features_per_kernel": int(per_kernel[r].max()),
            "mrp_max_features_per_capturing_kernel": float(capturing.max()) if capturing.numel() else nan,
            "mrp_kernels_capturing": n_capturing,
            "mrp_pure_kernels": int(purity["pure"][r]),
            "mrp_fused_kernels": int(purity["fused"][r]),
            "mrp_pure_kernel_share": int(purity["pure"][r]) / n_capturing if n_capturing else nan,
            "mrp_features_held_by_pure_share": float((purity["held_by_pure"][r] & shown).sum()) / max(n_shown, 1),
            "mrp_alignment_init": mean_over_shown(align0[r]),
            "mrp_alignment": mean_over_shown(align[r]),
            "mrp_norm_growth": float(growth[r]),
            "mrp_spread_ratio": spread_ratio,
            "mrp_effective_rank": eff_rank,
            "mrp_collapsed": int(not math.isfinite(spread_ratio) or spread_ratio < 0.1 or eff_rank < 1.5),
            **{key: val for name in CONTROLS for key, val in (
                (f"mrp_{name}_captured_share",
                 float((ctrl[name][0][r] & shown).sum()) / max(n_shown, 1) if name in ctrl else nan),
                (f"mrp_{name}_alignment", mean_over_shown(ctrl[name][1][r]) if name in ctrl else nan),
                (f"mrp_{name}_norm_growth", float(ctrl[name][2][r]) if name in ctrl else nan),
            )},
        })
    return rows


def _sl_metrics(cfg: TheoryConfig, data: TheoryData, W_init, W_sl, sl_steps, sl_fitted) -> list[dict]:
    """What SL from scratch captured, the lottery, C3a at several thresholds, and how long it trained."""
    bank, thr, k, m = data.bank, cfg.capture_threshold, data.bank.k, cfg.net.m
    C0, C_sl = probes.capture_matrix(W_init, bank), probes.capture_matrix(W_sl, bank)
    lot = probes.sl_lottery(C0, C_sl, k, m, thr)
    curve = {f: probes.share_classes_one_feature(C_sl, k, m, f * thr) for f in THRESHOLD_CURVE}
    cap = probes.captured(C_sl, thr)
    rows = []
    for r in range(W_sl.shape[0]):
        per_class = lot["captured_per_class"][r]
        rows.append({
            "sl_captured": int(cap[r, :k].sum()),
            "sl_captured_per_class_mean": float(per_class.float().mean()),
            "sl_share_classes_one_feature": float((per_class == 1).float().mean()),
            **{f"sl_share_classes_one_feature_at_{f:g}x": float(curve[f][r]) for f in THRESHOLD_CURVE},
            "sl_lottery_hit_rate": float(lot["lottery_hit_rate"][r]),
            # per class: the feature l that won SL, and the one the initial correlations predicted
            "sl_winner_per_class": [int(x) if c > 0 else -1 for x, c in zip(lot["winner"][r].tolist(), per_class.tolist())],
            "sl_predicted_winner_per_class": lot["predicted"][r].tolist(),
            "sl_steps": int(sl_steps[r]) if sl_steps is not None else cfg.sl.steps,
            "sl_fitted": int(sl_fitted[r]) if sl_fitted is not None else -1,
        })
    return rows


def _ft_capture_metrics(cfg: TheoryConfig, data: TheoryData, W_mrp, W_ft) -> list[dict]:
    """Features the fine-tuned encoder holds, and the share of MRP's downstream features it kept."""
    bank, thr, k = data.bank, cfg.capture_threshold, data.bank.k
    cap_mrp = probes.captured(probes.capture_matrix(W_mrp, bank), thr)
    cap_ft = probes.captured(probes.capture_matrix(W_ft, bank), thr)
    down = torch.zeros_like(bank.covered)
    down[:k] = True
    rows = []
    for r in range(W_ft.shape[0]):
        base = cap_mrp[r] & down
        kept = float((cap_ft[r] & base).sum()) / max(int(base.sum()), 1) if base.any() else float("nan")
        rows.append({"ft_captured": int(cap_ft[r, :k].sum()), "ft_retained_share": kept})
    return rows


def _error_metrics(cfg: TheoryConfig, data: TheoryData, W_sl, W_ft, head, ops: steps.PatchOps) -> list[dict]:
    """Test errors of SL and MRP+FT, overall and per view, and the single-view gap."""
    q, thr_act, k, m = cfg.net.q, cfg.net.threshold, data.bank.k, cfg.net.m
    sl = _eval_view_errors(net.sl_logits(steps.encode(data.test.X, W_sl, q, thr_act, ops), k, m), data.test)
    ft = _eval_view_errors(head(steps.encode(data.test.X, W_ft, q, thr_act, ops)), data.test)
    return [{"sl_err": float(sl["err"][r]), "sl_err_multi": float(sl["err_multi"][r]),
             "sl_err_single": float(sl["err_single"][r]), "ft_err": float(ft["err"][r]),
             "ft_err_multi": float(ft["err_multi"][r]), "ft_err_single": float(ft["err_single"][r]),
             "single_view_gap": float(sl["err_single"][r] - ft["err_single"][r])} for r in range(W_sl.shape[0])]


def growth_drive(per_seed: list[dict]) -> str:
    """One paragraph: what grew the run's MRP features, read off the control runs.

    fitted_decoder: with the decoder at its least-squares optimum every step, a kernel's norm cannot
    grow in the polynomial phase (a fitted linear decoder absorbs any rescaling of the encoder), so
    the control shows whether features still reach the threshold, or at least whether the kernels
    turn toward them ("turned": the mean alignment got at least halfway from its value at init to a
    pure feature direction, cos = 1). shuffled_pairing: each sample is asked for another sample's
    target; features that still grow do not come from predicting the sample's own masked content.
    """
    def mean(key: str) -> float:
        vals = [m[key] for m in per_seed if not math.isnan(m.get(key, math.nan))]
        return sum(vals) / len(vals) if vals else math.nan

    c_main = mean("mrp_captured_share")
    if not c_main > 0:
        return f"MRP captured no feature (captured share {c_main:.2f}), so there is no growth to attribute."
    c_fit, c_shuf = mean("mrp_fitted_decoder_captured_share"), mean("mrp_shuffled_pairing_captured_share")
    out = []
    if not math.isnan(c_shuf):
        if c_shuf <= 0.5 * c_main:
            out.append(f"The features grow from predicting each sample's own masked content: with every sample "
                       f"given another sample's target the same run captures {c_shuf:.2f} of the features "
                       f"(as trained: {c_main:.2f}).")
        elif c_shuf >= c_main - 1e-9:
            out.append(f"The features do not need the sample's own masked content: with every sample given another "
                       f"sample's target the run captures as much ({c_shuf:.2f} vs {c_main:.2f}); they grow by "
                       f"self-amplification of the kernels' initial correlations, not by reconstruction.")
        else:
            out.append(f"The features partly need the sample's own masked content: with every sample given another "
                       f"sample's target the run captures {c_shuf:.2f} of the features (as trained: {c_main:.2f}).")
    if not math.isnan(c_fit):
        a0, a_main, a_fit = mean("mrp_alignment_init"), mean("mrp_alignment"), mean("mrp_fitted_decoder_alignment")
        g_fit = mean("mrp_fitted_decoder_norm_growth")
        nums = (f"captured share {c_fit:.2f}, kernel norms x{g_fit:.2f}, feature alignment {a_fit:.2f} "
                f"(at init {a0:.2f}, as trained {a_main:.2f})")
        if c_fit >= c_main - 1e-9:
            out.append(f"They reach the capture threshold with the decoder fitted at every step too ({nums}).")
        elif a_fit >= a0 + 0.5 * (1.0 - a0):
            out.append(f"With the decoder fitted at every step the kernels turn toward the features but cannot grow "
                       f"({nums}): the decoder's lag is what lets their norms grow.")
        else:
            out.append(f"With the decoder fitted at every step the kernels neither grow nor turn toward the features "
                       f"({nums}): the growth needs a decoder that lags its optimum (it starts at the identity and "
                       f"learns slowly), which leaves the student under-predicting the masked content.")
    if not out:
        return "No control run (mrp.controls is empty), so the growth drive is not identified."
    return " ".join(out)


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
    result.runtime["huge_pages"] = runtime.huge_pages()
    return result


def matmul_shapes(cfg: TheoryConfig) -> list[tuple[int, int, int]]:
    """The engine's matmuls (m, k, n) at a training step (the shapes the precision probe measures): for
    shared data one X[N*P, d] @ W[d, c*K] per chunk of c runs; for per-run data X[N*P, d] @ W[d, K] per
    run, and MRP with its V - 1 controls under the stop-gradient teacher X[N*P, d] @ [d, V*K] per run
    (steps.mrp_variants)."""
    K, P, d, N = cfg.data.k * cfg.net.m, cfg.data.P, cfg.data.d, cfg.data.n_train
    if cfg.data.share_across_runs and len(cfg.seeds) > 1:
        return [(N * P, d, K * _step_chunks(cfg)[0].stop)]
    V = 1 + len(controls(cfg))
    wide = [(cfg.data.n_pretrain * P, d, V * K)] if V > 1 and not cfg.mrp.ema_teacher else []
    return [(N * P, d, K), *wide]


def _step_chunks(cfg: TheoryConfig) -> list[slice]:
    """steps.run_chunks of a training step on the labelled set (the shape the runtime probes use)."""
    return steps.run_chunks(len(cfg.seeds), cfg.data.n_train * cfg.data.P * cfg.data.k * cfg.net.m)


def choose_runtime(cfg: TheoryConfig, device: torch.device) -> tuple[runtime.Choice, tuple, bool]:
    """Precision and compilation for this run (measured or cached, runtime.py). Returns
    (choice, the compile cache key of its kernels, whether the compile probe ran in this process)."""
    K, P, N = cfg.data.k * cfg.net.m, cfg.data.P, cfg.data.n_train
    chunks = _step_chunks(cfg)
    c = chunks[0].stop
    precision, p_why, rates = runtime.choose_precision(cfg.precision, device, matmul_shapes(cfg))
    # every phase but linear probing runs the elementwise kernels once per step and once more at its end
    calls = len(chunks) * sum(n + 1 for phase, n in planned_phase_steps(cfg).items() if phase != "lp" and n > 0)
    shape = (c, N, P, K)
    q, thr = cfg.net.q, cfg.net.threshold
    dtype, key = runtime.dtype_of(precision), ("ops", steps.backend_for(device), precision, shape)
    compiled, c_why, probed = runtime.choose_compile(
        cfg.compile, device, key, calls, lambda: steps.time_eager_ops(shape, q, thr, dtype, device),
        lambda: steps.time_compiled_ops(shape, q, thr, dtype, device))
    return runtime.Choice(precision, p_why, compiled, c_why, rates), key, probed


def memory_parts(cfg: TheoryConfig) -> dict[str, float]:
    """Upper-end bytes of a run's largest allocations (fp32; mrplab/memory.py checks them against free memory)."""
    d, P, R = cfg.data.d, cfg.data.P, len(cfg.seeds)
    K, F = cfg.data.k * cfg.net.m, (cfg.data.k + cfg.data.extra_pretrain_classes) * cfg.data.L
    sizes = (cfg.data.n_pretrain, cfg.data.n_train, cfg.data.n_test)
    sets = 1 if cfg.data.share_across_runs else R
    N = max(sizes)
    per_run = N * P * K  # one run's activations at the largest split
    chunk = steps.run_chunks(R, per_run)[0].stop
    return {
        "data": 4.0 * sets * sum(sizes) * P * d,
        # beside the data (written in place, data.make_data): the fp32 patches, their signal part and the
        # coefficients of the split being sampled
        "sampling": 4.0 * N * P * (2 * d + F),
        "step temporaries": 4.0 * (12 * min(chunk, R) * per_run + 2 * min(chunk, R) * N * P * d),
        "weights": 4.0 * 8 * R * d * K,
    }


HOST_PARTS = ("data", "sampling")  # sampled on the host (then moved)
DEVICE_PARTS = ("data", "step temporaries", "weights")  # what a step on the device holds


def check_memory(cfg: TheoryConfig, device: torch.device, available: dict[str, int] | None = None) -> None:
    """memory_parts against free memory: all on the CPU; on CUDA the host's and the device's parts apart."""
    parts = memory_parts(cfg)
    memory.check_run({k: parts[k] for k in HOST_PARTS}, {k: parts[k] for k in DEVICE_PARTS},
                     "data.d, data.n_pretrain / n_train / n_test or the seeds (or set data.share_across_runs=true)",
                     device, available)


def _run(cfg, emit, advance, on_runtime, share: runtime.CoreShare) -> TheoryResult:
    device = resolve_device(cfg.device)
    check_memory(cfg, device)
    t0 = time.perf_counter()
    flops0 = dict(runtime.matmul_flops.by_shape)
    choice, compile_key, probed_now = choose_runtime(cfg, device)
    info = {**share.record(), **choice.record()}
    on_runtime(info)
    t_choice = time.perf_counter()
    # patches in the run's precision (bf16: the matmul inputs; everything computed from Z stays fp32)
    data = make_data(cfg.data, cfg.seeds, runtime.dtype_of(choice.precision))
    data = TheoryData(bank=data.bank, pretrain=data.pretrain.to(device), train=data.train.to(device),
                      test=data.test.to(device))
    data.bank.V = data.bank.V.to(device)
    data.bank.covered = data.bank.covered.to(device)
    t_data = time.perf_counter()

    K = cfg.data.k * cfg.net.m
    seeds = cfg.seeds
    W_init = net.init_kernels([generator(s, "init") for s in seeds], cfg.data.d, K, cfg.net.sigma_0).to(device)
    ops = steps.FirstCallTimer(steps.ops(choice.compile))
    rec = Recorder(cfg, data, emit, advance, share, ops)
    log_every = cfg.probes.log_every

    def gens(phase: str) -> RunGens:
        return RunGens(
            mask=[generator(s, f"{phase}:mask") for s in seeds],  # CPU streams: the same masks on any device
            batch=[generator(s, f"{phase}:batch") for s in seeds],
            head=[generator(s, f"{phase}:head") for s in seeds],
        )

    sl = train_sl(W_init, data.train, cfg.sl, cfg.net, cfg.data.k, gens("sl"), rec, log_every, ops)
    W_sl = sl.W
    t_sl = time.perf_counter()
    variants = {"mrp": {}, **{f"mrp_{name}": CONTROLS[name] for name in controls(cfg)}}
    trained = pretrain_mrp_variants(W_init, data.pretrain, cfg.mrp, cfg.net, gens("mrp"), rec, log_every, ops, variants)
    mrp = trained["mrp"]
    W_controls = {name: trained[f"mrp_{name}"].W for name in controls(cfg)}  # same init, data and masks; one thing changed
    t_mrp = time.perf_counter()
    ft = finetune(mrp.W, data.train, cfg.finetune, cfg.net, cfg.data.k, gens("ft"), rec, log_every, ops)
    t_ft = time.perf_counter()

    per_seed = measure(cfg, data, W_init, W_sl, mrp.W, ft.W, ft.head, W_controls, sl.steps, sl.fitted, ops)
    with torch.no_grad():
        for r, m in enumerate(per_seed):
            m["noise_memorisation_sl"] = rec.history["sl"][-1]["noise_memorisation"][r]
            m["noise_memorisation_mrp"] = rec.history["mrp"][-1]["noise_memorisation"][r]
    verdicts = claims.evaluate(per_seed, cfg.data.L, cfg.data.mu_test)
    timings = {"runtime_choice_s": t_choice - t0, "data_s": t_data - t_choice, "sl_s": t_sl - t_data,
               "mrp_s": t_mrp - t_sl, "finetune_s": t_ft - t_mrp, "probes_s": rec.seconds,
               "total_s": time.perf_counter() - t0}
    if choice.compile and ops.first_call_s is not None:
        info["compile_first_call_s"] = ops.first_call_s
        if not probed_now and cfg.compile == "auto":  # what a run with warm caches pays
            runtime.note_compile_cost(device, compile_key, ops.first_call_s)
    info["threads_seen"] = sorted(set(share.seen))
    by_shape = runtime.matmul_flops.since(flops0)
    info["matmul_flops"] = sum(by_shape.values())
    info["matmul_flops_by_shape"] = {"x".join(map(str, shape)): f for shape, f in sorted(by_shape.items())}
    return TheoryResult(cfg=cfg, data=data, W_init=W_init, W_sl=W_sl, W_mrp=mrp.W, D_mrp=mrp.D, W_ft=ft.W,
                        head=ft.head, W_controls=W_controls, per_seed=per_seed, verdicts=verdicts, history=rec.history,
                        timings=timings,
                        runtime=info)


def controls(cfg: TheoryConfig) -> list[str]:
    """The control runs this config asks for, less any that would repeat MRP itself."""
    same = {"fitted_decoder": cfg.mrp.decoder_fit == "lstsq", "shuffled_pairing": cfg.mrp.target_pairing == "shuffled"}
    return [c for c in CONTROLS if c in cfg.mrp.controls and not same[c]]


def planned_phase_steps(cfg: TheoryConfig) -> dict[str, int]:
    """Steps each phase trains, in training order (SL's are a minimum when sl.until_fit)."""
    return {"sl": cfg.sl.steps, "mrp": cfg.mrp.steps, **{f"mrp_{c}": cfg.mrp.steps for c in controls(cfg)},
            **finetune_steps(cfg.finetune)}


def planned_steps(cfg: TheoryConfig) -> int:
    return sum(planned_phase_steps(cfg).values())
