"""Wall time and matmul efficiency of `mrplab theory` with the default config, end to end.

Runs the command in a fresh process (``python -m mrplab theory --out <tmpdir>
--quiet``), so the time includes start-up, the runtime choice (probes or the
cache), compilation, data, training, probes, checkpoints, figures and the
report. Efficiency = the run's counted matmul FLOPs / (wall time x the
machine's matmul limit at the chosen precision and the run's own shapes).

The limit is the highest of: the one the run used (runtime.py, cached per
machine) and the same pair measured here right before and right after the run.
A shared machine's speed drifts by tens of percent over minutes; taking the
highest limit never flatters the run. Writes benchmarks/results/theory_walltime.json.

    .venv/bin/python benchmarks/theory_walltime.py                  # defaults, one run
    .venv/bin/python benchmarks/theory_walltime.py --repeat 3       # three runs, one after another
    .venv/bin/python benchmarks/theory_walltime.py --set threads=1  # extra mrplab options
    .venv/bin/python benchmarks/theory_walltime.py --cold           # with an empty runtime cache
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        .venv/bin/python benchmarks/theory_walltime.py --tag avx2  # torch held to AVX2 (no AVX-512, AMX, native bf16)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from mrplab.cli import _request_huge_pages  # imports no torch

_request_huge_pages()  # the limit is measured under the allocator setting the CLI gives the run

import torch  # noqa: E402
from _common import machine, run_theory, write

from mrplab import config, runtime
from mrplab.theory.experiment import matmul_shapes

LIMIT_BUDGET_S = 2.0  # per dtype and measurement: the best time of many pairs


def _limits(shapes, precisions=("fp32", "bf16")) -> dict[str, float]:
    cpu = torch.device("cpu")
    return {p: runtime.matmul_gflops(shapes, runtime.dtype_of(p), cpu, LIMIT_BUDGET_S) for p in precisions}


def one_run(sets: list[str], cold: bool, shapes) -> dict:
    keep = os.environ.get("MRPLAB_BENCH_KEEP")  # a folder to keep the run folder in, for inspection
    before = _limits(shapes)  # the run's precision is known only after it (auto)
    with tempfile.TemporaryDirectory(prefix="mrplab-bench-") as tmp:
        env = {"MRPLAB_CACHE_DIR": f"{tmp}/cache"} if cold else {}
        wall, summary = run_theory(keep or tmp, sets, env=env)
    rt = summary["runtime"]
    p = rt["precision"]
    after = _limits(shapes, (p,))
    limits = {"run": rt["matmul_limit_gflops"], "before": before[p], "after": after[p]}
    limit = max(limits.values())
    return {
        "wall_s": wall, "efficiency": rt["matmul_flops"] / (wall * limit * 1e9), "matmul_limit_gflops": limit,
        "limits_gflops": limits, "ideal_s": rt["matmul_flops"] / (limit * 1e9), "runtime": rt,
        "timings": summary["timings"], "wall_with_report_s": summary.get("wall_with_report_s"),
        "config_hash": summary["config_hash"], "seeds": summary["seeds"], "steps": summary.get("steps"),
        "claims_passed": summary.get("claims_passed"), "claims_total": summary.get("claims_total"),
        "verdicts": [{k: v[k] for k in ("id", "metric", "rule", "mean", "std", "min", "max", "per_seed", "verdict")}
                     for v in summary["verdicts"]],
        "git_commit": summary.get("git_commit"),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--cold", action="store_true", help="empty runtime cache (probes are timed with the run)")
    ap.add_argument("--repeat", type=int, default=1, help="runs, one after another (the median is the headline)")
    ap.add_argument("--tag", default="", help="write results/theory_walltime_<tag>.json (e.g. a capped ISA)")
    args = ap.parse_args()
    shapes = matmul_shapes(config.load(None, args.sets))
    runs = []
    for i in range(args.repeat):
        r = one_run(args.sets, args.cold, shapes)
        runs.append(r)
        rt = r["runtime"]
        print(f"run {i + 1}/{args.repeat}: {r['wall_s']:.1f} s wall, {rt['matmul_flops'] / 1e12:.2f} TFLOP counted, "
              f"limit {r['matmul_limit_gflops']:.0f} GFLOP/s {rt['precision']} (run {r['limits_gflops']['run']:.0f}, "
              f"before {r['limits_gflops']['before']:.0f}, after {r['limits_gflops']['after']:.0f}) -> ideal "
              f"{r['ideal_s']:.1f} s, efficiency {r['efficiency']:.2f}; {r['claims_passed']}/{r['claims_total']} "
              f"claims PASS", flush=True)
    effs = [r["efficiency"] for r in runs]
    env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ}
    result = {"benchmark": "theory_walltime", "sets": args.sets, "isa_env": env, "cold_cache": args.cold, "repeat": args.repeat,
              "efficiency_median": statistics.median(effs), "efficiency_min": min(effs),
              "wall_s_median": statistics.median(r["wall_s"] for r in runs), "runs": runs, "machine": machine()}
    path = write("theory_walltime" + (f"_{args.tag}" if args.tag else ""), result)
    rt = runs[-1]["runtime"]
    print(f"efficiency median {result['efficiency_median']:.2f} (min {result['efficiency_min']:.2f}), "
          f"wall median {result['wall_s_median']:.1f} s")
    print(f"  {rt['precision']}: {rt['precision_reason']}\n  compile {rt['compile']}: {rt['compile_reason']}\n"
          f"  threads {rt['threads']}: {rt['threads_reason']}")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
