"""The theory engine side by side with this machine's matmul limit and a naive autograd baseline.

One process, one table, written to benchmarks/results/engine.json:

- limit: fp32 and bf16 matmul GFLOP/s at the engine's own shapes (forward
  X[N*P, d] @ W[d, K] per run, and the weight gradient X^T dZ);
- naive: benchmarks/naive_reference.py (nn.Module + autograd, one run at a time);
- engine: mrplab's steps (theory/steps.py) with all R runs batched, fp32 and bf16:
  steps/s, achieved GFLOP/s (SL and the naive baseline: 4 N P d K R flops a
  step, the forward and the weight-gradient matmuls; the stop-gradient teacher
  shares the forward; the engine's MRP: the products its step runs, as a run
  counts them, runtime.matmul_flops: on the CPU its weight gradient multiplies
  the visible patches only), fraction of the limit, and the peak resident memory during the steps
  against the size of the data tensors;
- batching: R = 8 seeds in one batched step vs 8 sequential single-run steps.

Huge pages are requested as the CLI requests them; the batching part also keeps freed blocks as
experiment.run does (without that, glibc unmaps every buffer over its mmap threshold and each step
of R = 8 faults ~40 MB back in).

    .venv/bin/python benchmarks/engine.py            # default and large configs
    .venv/bin/python benchmarks/engine.py --quick    # default config only
    .venv/bin/python benchmarks/engine.py --bf16     # the bf16 rows also where the CPU emulates bf16

Where the CPU has no native bf16 (runtime.native_bf16: no avx512_bf16 or amx_bf16 flag) the bf16
rows are left out and the result says why (`bf16_skipped`): emulated, the large config's bf16
steps ran for over an hour on an AVX2-only CPU, and precision=auto never picks bf16 there.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from mrplab.cli import _request_huge_pages  # imports no torch

_request_huge_pages()  # the allocator settings a run has (with runtime.keep_freed_memory in main)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import naive_reference  # noqa: E402

from mrplab import config, runtime  # noqa: E402
from mrplab.rng import generator  # noqa: E402
from mrplab.theory import net, steps  # noqa: E402
from mrplab.theory.data import make_data  # noqa: E402
from mrplab.theory.objectives import make_run_masks  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "engine.json"
CONFIGS = {
    "default": [],
    "large": ["data.k=20", "data.d=1024", "data.n_pretrain=8192", "data.n_train=8192", "data.n_test=2",
              "data.P=32", "seeds=[0]"],
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory while the block runs (sampled every 2 ms)."""

    def __enter__(self):
        self.peak, self._stop = _rss(), False
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self):
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, _rss())


def timeit(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def matmul_limit(NP: int, d: int, K: int, dtype: torch.dtype) -> float:
    """The engine's matmul pair at one run's shapes, measured as runs measure their limit (runtime.py)."""
    return runtime.matmul_gflops([(NP, d, K)], dtype, torch.device("cpu"))


def bench_config(name: str, overrides: list[str], reps: int, bf16: bool) -> dict:
    cfg = config.load(None, overrides)
    dc = cfg.data
    R, K = len(cfg.seeds), dc.k * cfg.net.m
    q, thr = cfg.net.q, cfg.net.threshold
    rss_before_data = _rss()  # the interpreter, torch and anything earlier: not the run's memory
    data = make_data(dc, cfg.seeds)
    X, y = data.train.X, data.train.y  # [R, N, P, d]
    N, P, d = X.shape[1:]
    data_bytes = sum(ds.X.numel() * ds.X.element_size() + ds.coef.numel() * 4 for ds in (data.pretrain, data.train, data.test))
    flops = 4 * N * P * d * K * R
    W0 = net.init_kernels([generator(s, "init") for s in cfg.seeds], d, K, cfg.net.sigma_0) * 10
    masks = make_run_masks([generator(s, "mask") for s in cfg.seeds], N, P, cfg.mrp.mask_ratio)
    D = net.init_decoder(R, K, cfg.net.decoder)
    out: dict = {"config": name, "overrides": overrides, "R": R, "N": N, "P": P, "d": d, "K": K,
                 "flops_per_step": flops, "data_bytes": data_bytes}

    out["limit_fp32_gflops"] = matmul_limit(N * P, d, K, torch.float32)
    if bf16:
        out["limit_bf16_gflops"] = matmul_limit(N * P, d, K, torch.bfloat16)

    # naive baseline: one run at a time, autograd
    g = torch.Generator().manual_seed(0)
    models = [naive_reference.SmoothedReLUConvNet(d, K, q, thr, cfg.net.sigma_0 * 10, g) for _ in range(R)]
    t_sl = timeit(lambda: [naive_reference.sl_step(mdl, X[r], y[r], dc.k, cfg.net.m, 1e-3) for r, mdl in enumerate(models)], reps)
    t_mrp = timeit(lambda: [naive_reference.mrp_step(mdl, X[r], 0.5, 1e-3, g) for r, mdl in enumerate(models)], reps)
    out["naive"] = {"sl_steps_per_s": 1 / t_sl, "mrp_steps_per_s": 1 / t_mrp,
                    "sl_gflops": flops / t_sl / 1e9, "mrp_gflops": flops / t_mrp / 1e9}

    fused = steps.ops(True)
    paths = (("engine_fp32", X, steps.EAGER), ("engine_fp32_compiled", X, fused),
             ("engine_bf16", X.to(torch.bfloat16), steps.EAGER),
             ("engine_bf16_compiled", X.to(torch.bfloat16), fused))
    for path, Xp, act in (p for p in paths if bf16 or "bf16" not in p[0]):
        W = W0.clone()
        Xt = net.transposed_patches(Xp)  # as training passes it (full-batch steps): bf16's weight gradient reads it
        # compile (once per shape) outside the timed and memory-watched region
        steps.sl(Xp, y, W, q, thr, dc.k, cfg.net.m, ops=act, Xt=Xt)
        counted = runtime.matmul_flops.total
        steps.mrp(Xp, W, D, masks, q, thr, steps.MRPSpec(), ops=act, Xt=Xt)
        mrp_flops = runtime.matmul_flops.total - counted  # the same masks at every step: the same products
        base = _rss()
        with PeakRSS() as mem:
            t_sl = timeit(lambda: steps.sl(Xp, y, W, q, thr, dc.k, cfg.net.m, ops=act, Xt=Xt), reps)
            t_mrp = timeit(lambda: steps.mrp(Xp, W, D, masks, q, thr, steps.MRPSpec(), ops=act, Xt=Xt), reps)
        limit = out["limit_bf16_gflops" if "bf16" in path else "limit_fp32_gflops"]
        out[path] = {
            "sl_steps_per_s": 1 / t_sl, "mrp_steps_per_s": 1 / t_mrp,
            "sl_gflops": flops / t_sl / 1e9, "mrp_gflops": mrp_flops / t_mrp / 1e9, "mrp_flops_per_step": mrp_flops,
            "sl_fraction_of_limit": flops / t_sl / 1e9 / limit,
            "mrp_fraction_of_limit": mrp_flops / t_mrp / 1e9 / limit,
            "peak_rss_bytes": mem.peak, "rss_before_steps_bytes": base,
            "step_extra_bytes": mem.peak - base,
        }
    n = out["naive"]
    for path in ("engine_fp32", "engine_fp32_compiled"):
        e = out[path]
        out[f"speedup_vs_naive_{path[7:]}"] = {"sl": e["sl_steps_per_s"] / n["sl_steps_per_s"],
                                               "mrp": e["mrp_steps_per_s"] / n["mrp_steps_per_s"]}
    for num, den in (("engine_bf16", "engine_fp32"), ("engine_bf16_compiled", "engine_fp32_compiled")) if bf16 else ():
        out[f"{num[7:]}_over_{den[7:]}"] = {
            k: out[num][f"{k}_steps_per_s"] / out[den][f"{k}_steps_per_s"] for k in ("sl", "mrp")}
    # the run's own memory at its peak (data + weights + step temporaries), against its data tensors;
    # measured on the large config first, where the interpreter's baseline does not dominate
    out["rss_before_data_bytes"] = rss_before_data
    out["peak_rss_over_data"] = (out["engine_fp32_compiled"]["peak_rss_bytes"] - rss_before_data) / data_bytes
    return out


def bench_batching(reps: int) -> dict:
    """R = 8 seeds batched in one step vs 8 sequential single-seed steps (default config), eager and compiled."""
    seeds = list(range(8))
    cfg = config.load(None, [f"seeds={seeds}"])
    data = make_data(cfg.data, seeds)
    X, y = data.train.X, data.train.y
    K, q, thr = cfg.data.k * cfg.net.m, cfg.net.q, cfg.net.threshold
    W = net.init_kernels([generator(s, "init") for s in seeds], cfg.data.d, K, cfg.net.sigma_0) * 10
    Xs, ys = X[:1], y[:1]  # shared data (data.share_across_runs): one wide matmul X[N*P, d] @ W[d, 8K]
    out: dict = {"R": 8}
    for label, act in (("eager", steps.EAGER), ("compiled", steps.ops(True))):
        def batched():
            steps.sl(X, y, W, q, thr, cfg.data.k, cfg.net.m, ops=act)

        def sequential():
            for r in range(8):
                steps.sl(X[r:r + 1], y[r:r + 1], W[r:r + 1], q, thr, cfg.data.k, cfg.net.m, ops=act)

        def shared():
            steps.sl(Xs, ys, W, q, thr, cfg.data.k, cfg.net.m, ops=act)

        def shared_seq():
            for r in range(8):
                steps.sl(Xs, ys, W[r:r + 1], q, thr, cfg.data.k, cfg.net.m, ops=act)

        t = {name: timeit(fn, reps) for name, fn in
             (("batched", batched), ("sequential", sequential), ("shared", shared), ("shared_seq", shared_seq))}
        out[label] = {"batched_s_per_step": t["batched"], "sequential_s_per_step": t["sequential"],
                      "speedup": t["sequential"] / t["batched"],
                      "shared_data_batched_s_per_step": t["shared"],
                      "shared_data_sequential_s_per_step": t["shared_seq"],
                      "shared_data_speedup": t["shared_seq"] / t["shared"]}
    return out


def main(argv: list[str]) -> int:
    torch.set_num_threads(int(os.environ.get("MRPLAB_THREADS", os.cpu_count() or 1)))
    quick = "--quick" in argv
    native, why = runtime.native_bf16(torch.device("cpu"))
    bf16 = native or "--bf16" in argv
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
              "cpu": torch.backends.cpu.get_cpu_capability(), "configs": []}
    if not bf16:
        result["bf16_skipped"] = f"{why} (--bf16 runs the bf16 rows anyway)"
    for name, ov in CONFIGS.items():
        if quick and name != "default":
            continue
        result["configs"].append(bench_config(name, ov, reps=3 if name == "large" else 10, bf16=bf16))
    # as experiment.run does (after the configs, whose step-memory figures need freed blocks returned): without
    # it glibc unmaps every buffer over its mmap threshold, and each batched R = 8 step faults ~40 MB back in
    runtime.keep_freed_memory()
    result["batching"] = bench_batching(reps=5)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, RESULTS)

    print(f"threads {result['threads']}, torch {result['torch']}, cpu capability {result['cpu']}")
    hdr = (f"{'config':8} {'path':21} {'SL st/s':>8} {'MRP st/s':>9} {'SL GF/s':>8} {'MRP GF/s':>9} "
           f"{'of limit (SL, MRP)':>18}")
    print(hdr)
    for c in result["configs"]:
        print(f"{c['config']:8} {'limit fp32':21} {'':8} {'':9} {c['limit_fp32_gflops']:8.1f}")
        if bf16:
            print(f"{c['config']:8} {'limit bf16':21} {'':8} {'':9} {c['limit_bf16_gflops']:8.1f}")
        for path in (p for p in ("naive", "engine_fp32", "engine_fp32_compiled", "engine_bf16", "engine_bf16_compiled")
                     if p in c):
            p = c[path]
            fracs = "" if "sl_fraction_of_limit" not in p else \
                f"{p['sl_fraction_of_limit']:6.2f} {p['mrp_fraction_of_limit']:5.2f}"
            print(f"{c['config']:8} {path:21} {p['sl_steps_per_s']:8.2f} {p['mrp_steps_per_s']:9.2f} "
                  f"{p['sl_gflops']:8.1f} {p['mrp_gflops']:9.1f} {fracs}")
        sp, bo = c["speedup_vs_naive_fp32_compiled"], c.get("bf16_compiled_over_fp32_compiled")
        ratio = f"bf16/fp32 (compiled): SL {bo['sl']:.2f}x, MRP {bo['mrp']:.2f}x" if bo else "bf16 left out"
        print(f"{c['config']:8} compiled fp32 engine vs naive: SL {sp['sl']:.2f}x, MRP {sp['mrp']:.2f}x; "
              f"{ratio}; data {c['data_bytes'] / 2**20:.0f} MiB, "
              f"run's peak memory {c['peak_rss_over_data']:.2f}x its data")
    for label in ("eager", "compiled"):
        b = result["batching"][label]
        print(f"batching ({label}): R=8 batched {b['batched_s_per_step'] * 1e3:.1f} ms/step vs 8 sequential "
              f"{b['sequential_s_per_step'] * 1e3:.1f} ms: {b['speedup']:.2f}x; shared data: "
              f"{b['shared_data_batched_s_per_step'] * 1e3:.1f} vs {b['shared_data_sequential_s_per_step'] * 1e3:.1f} ms: "
              f"{b['shared_data_speedup']:.2f}x")
    if "bf16_skipped" in result:
        print(f"bf16 rows left out: {result['bf16_skipped']}")
    print(f"written {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
