"""What shared data saves per training step: R runs on one data set vs one run alone, step by step.

`data.share_across_runs` lets R runs multiply one X[N*P, d] @ W[d, R*K] where
per-run data multiplies R products K wide. This benchmark times, at the
default config's shapes, the two steps a run spends its time in:

- sl: the supervised step (steps.sl);
- mrp: mask-reconstruction pretraining with its two controls under the
  stop-gradient teacher (steps.mrp_variants, as train.pretrain_mrp_variants
  calls it);

once with R runs on shared data and once with a single run, each in a fresh
process (in-process interleaving of different allocation patterns distorts
the timings), alternating ``--pairs`` times. For mrp a third process per pair
runs the shared step with the weight gradient over every patch
(``steps.pays_visible`` off) beside the shipped one over the visible patches
only (``steps.Visible``): ``mrp_visible_over_dense_median``. Each MRP step
draws fresh masks, as training does. Each process reports the median
step time and how much of it the matmuls took (net.preact and
net.weight_grad, timed around the call) and the rest (the fused passes over
Z, the loss). Per run, shared / single below 1 means sharing pays at the
step; the matmul rates say whether the wider shared product runs faster.

    .venv/bin/python benchmarks/sharing.py                 # R = 8, 3 pairs, bf16 where native
    .venv/bin/python benchmarks/sharing.py --precision fp32 --pairs 5

Writes benchmarks/results/sharing.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from _common import machine, write


def child(step: str, R: int, shared: bool, n_steps: int, precision: str, dense: bool = False) -> dict:
    from mrplab.cli import _request_huge_pages

    _request_huge_pages()
    import torch

    from mrplab import config, runtime
    from mrplab.rng import generator
    from mrplab.theory import net, steps
    from mrplab.theory.data import make_data
    from mrplab.theory.experiment import CONTROLS
    from mrplab.theory.objectives import make_run_masks

    runtime.keep_freed_memory()
    seeds = list(range(R))
    cfg = config.load(None, [f"seeds={seeds}", f"data.share_across_runs={str(shared).lower()}"])
    dc, q, thr, K = cfg.data, cfg.net.q, cfg.net.threshold, cfg.data.k * cfg.net.m
    data = make_data(dc, seeds, runtime.dtype_of(precision))  # as a run stores its patches
    ds = data.train if step == "sl" else data.pretrain
    X, y = ds.X, ds.y
    Xt = net.transposed_patches(X)
    N, P, d = X.shape[1:]
    W0 = net.init_kernels([generator(s, "init") for s in seeds], d, K, cfg.net.sigma_0)
    ops = steps.ops(True)
    if dense:  # the weight gradient over every patch, masked ones included
        steps.pays_visible = lambda X, keep: False
    if step == "sl":
        def run():
            steps.sl(X, y, W0, q, thr, dc.k, cfg.net.m, ops, Xt)
    else:
        specs = [steps.MRPSpec.of(cfg.mrp, q)] + [steps.MRPSpec.of(cfg.mrp, q, **CONTROLS[c]) for c in cfg.mrp.controls]
        Ws = [W0.clone() for _ in specs]
        Ds = [net.init_decoder(R, K, cfg.net.decoder) for _ in specs]
        gens = [generator(s, "mask") for s in seeds]

        def run():
            mask = make_run_masks(gens, N, P, cfg.mrp.mask_ratio, W0.device)
            steps.mrp_variants(X, Ws, Ds, mask, q, thr, specs, ops, Xt)

    spent = {"matmul": 0.0}

    def timed(fn):
        def call(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            spent["matmul"] += time.perf_counter() - t0
            return out
        return call

    net.preact, net.weight_grad = timed(net.preact), timed(net.weight_grad)
    steps.Visible.weight_grad = timed(steps.Visible.weight_grad)
    for _ in range(5):
        run()
    before = runtime.matmul_flops.total
    run()
    flops = runtime.matmul_flops.total - before  # the products one step runs, as the run counts them
    times, mm = [], []
    for _ in range(n_steps):
        spent["matmul"] = 0.0
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        mm.append(spent["matmul"])
    order = sorted(range(n_steps), key=times.__getitem__)
    mid = order[n_steps // 2]  # the median step and its own matmul share
    return {"step_s": times[mid], "matmul_s": mm[mid], "other_s": times[mid] - mm[mid],
            "matmul_gflops": flops / mm[mid] / 1e9, "flops": flops, "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8, help="R: runs on the shared data set")
    ap.add_argument("--pairs", type=int, default=3, help="fresh-process pairs (shared, single) per step")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per process (the median is kept)")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                    help="default: bf16 where the CPU has it natively, else fp32")
    ap.add_argument("--child", nargs=2, metavar=("STEP", "SIDE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.precision is None:
        import torch

        from mrplab import runtime
        args.precision = "bf16" if runtime.native_bf16(torch.device("cpu"))[0] else "fp32"
    if args.child:
        step, side = args.child
        R = args.runs if side != "single" else 1
        print(json.dumps(child(step, R, side != "single", args.steps, args.precision, side == "shared_dense")))
        return 0

    def one(step: str, side: str) -> dict:
        cmd = [sys.executable, __file__, "--child", step, side, "--runs", str(args.runs),
               "--steps", str(args.steps), "--precision", args.precision]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(f"the {step} {side} process failed with exit status {proc.returncode}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    R = args.runs
    result: dict = {"benchmark": "sharing", "R": R, "precision": args.precision, "steps": args.steps,
                    "machine": machine(), "pairs": {}}
    for step in ("sl", "mrp"):
        pairs = []
        for _ in range(args.pairs):
            s, o = one(step, "shared"), one(step, "single")
            ratio = s["step_s"] / (R * o["step_s"])
            pairs.append({"shared": s, "single": o, "shared_over_single_per_run": ratio})
            if step == "mrp":
                dense = one(step, "shared_dense")
                pairs[-1].update(shared_dense=dense, visible_over_dense=s["step_s"] / dense["step_s"])
                print(f"mrp: shared R={R} with the weight gradient over every patch {dense['step_s'] * 1e3:.1f} ms "
                      f"(matmul {dense['matmul_s'] * 1e3:.1f}); over the visible patches {s['step_s'] * 1e3:.1f} ms "
                      f"(matmul {s['matmul_s'] * 1e3:.1f}): {s['step_s'] / dense['step_s']:.2f}", flush=True)
            print(f"{step}: shared R={R} {s['step_s'] * 1e3:.1f} ms ({s['step_s'] / R * 1e3:.2f} per run: matmul "
                  f"{s['matmul_s'] / R * 1e3:.2f} at {s['matmul_gflops']:.0f} GFLOP/s, other "
                  f"{s['other_s'] / R * 1e3:.2f}); single {o['step_s'] * 1e3:.2f} ms (matmul {o['matmul_s'] * 1e3:.2f}"
                  f" at {o['matmul_gflops']:.0f} GFLOP/s, other {o['other_s'] * 1e3:.2f}); shared / single per run "
                  f"{ratio:.2f}", flush=True)
        result["pairs"][step] = pairs
        result[f"{step}_ratio_median"] = statistics.median(p["shared_over_single_per_run"] for p in pairs)
    result["mrp_visible_over_dense_median"] = statistics.median(p["visible_over_dense"] for p in result["pairs"]["mrp"])
    path = write("sharing", result)
    print(f"per run, shared / single: sl {result['sl_ratio_median']:.2f}, mrp {result['mrp_ratio_median']:.2f} "
          f"(medians of {args.pairs} pairs); shared mrp, visible patches / every patch "
          f"{result['mrp_visible_over_dense_median']:.2f}")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
