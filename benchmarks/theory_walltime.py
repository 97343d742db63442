"""Wall time and matmul efficiency of `mrplab theory` with the default config, end to end.

Runs the command in a fresh process (``python -m mrplab theory --out <tmpdir>
--quiet``), so the time includes start-up, the runtime choice (probes or the
cache), compilation, data, training, probes, checkpoints, figures and the
report. Efficiency = ideal time / wall time, where the ideal time is the run's
counted matmul FLOPs at the machine's matmul limit at the chosen precision, shape
by shape: sum over the shapes (m, k, n) the run multiplied at (the run records
FLOPs by shape, runtime.FlopCounter) of FLOPs / the limit at that shape. A wide
product runs at a higher rate than a narrow one, so a run that multiplies wider
is held to the higher limit. Shapes with under 1 % of the FLOPs are held to the
highest limit measured. ``efficiency_at_best_shape`` holds every FLOP to that
highest limit (the stricter number).

The limit at a shape is the highest of: the one the run used (runtime.py, cached
per machine, at its probe shapes), and the training pair at that shape measured
here right after the run and, from the second run on, right before it (the
shapes of the run before). A shared machine's speed drifts by tens of percent
over minutes; taking the highest limit guards against a run that slowed
while it ran, but not against limits measured before and after it in a slow
moment of the machine, so with ``--repeat`` each run is also held to the
highest limit at each shape measured around any of the runs
(``efficiency_at_session_limits``: the stricter, drift-robust reading). Writes
benchmarks/results/theory_walltime.json.

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

from _common import ideal_s, limits_by_shape, machine, main_shapes, run_theory, write  # noqa: E402

from mrplab import config  # noqa: E402
from mrplab.theory.experiment import matmul_shapes  # noqa: E402


def one_run(sets: list[str], cold: bool, probe_shapes, before_shapes: list[str] | None, precision: str | None) -> dict:
    keep = os.environ.get("MRPLAB_BENCH_KEEP")  # a folder to keep the run folder in, for inspection
    before = limits_by_shape(before_shapes, precision) if before_shapes and precision else {}
    with tempfile.TemporaryDirectory(prefix="mrplab-bench-") as tmp:
        env = {"MRPLAB_CACHE_DIR": f"{tmp}/cache"} if cold else {}
        wall, summary = run_theory(keep or tmp, sets, env=env)
    rt = summary["runtime"]
    p, by_shape = rt["precision"], rt["matmul_flops_by_shape"]
    shapes = main_shapes(by_shape)
    after = limits_by_shape(shapes, p)
    probe = {"x".join(map(str, s)) for s in probe_shapes}
    limits = {s: {"after": after[s], **({"before": before[s]} if s in before else {}),
                  **({"run": rt["matmul_limit_gflops"]} if s in probe and len(probe) == 1 else {})} for s in shapes}
    best = {s: max(v.values()) for s, v in limits.items()}
    top = max(best.values())
    ideal = ideal_s(by_shape, best)
    return {
        "wall_s": wall, "efficiency": ideal / wall, "ideal_s": ideal,
        "efficiency_at_best_shape": rt["matmul_flops"] / (wall * top * 1e9), "matmul_limit_gflops": top,
        "flops_by_shape": by_shape, "limits_gflops": limits, "limit_by_shape_gflops": best, "runtime": rt,
        "timings": summary["timings"], "wall_with_report_s": summary.get("wall_with_report_s"),
        "config_hash": summary["config_hash"], "seeds": summary["seeds"], "steps": summary.get("steps"),
        "claims_passed": summary.get("claims_passed"), "claims_total": summary.get("claims_total"),
        "verdicts": [{k: v[k] for k in ("id", "metric", "rule", "mean", "std", "min", "max", "per_seed", "verdict")}
                     for v in summary["verdicts"]],
        "git_commit": summary.get("git_commit"),
    }


def _measured(r: dict, shape: str) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in r["limits_gflops"][shape].items())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--cold", action="store_true", help="empty runtime cache (probes are timed with the run)")
    ap.add_argument("--repeat", type=int, default=1, help="runs, one after another (the median is the headline)")
    ap.add_argument("--tag", default="", help="write results/theory_walltime_<tag>.json (e.g. a capped ISA)")
    args = ap.parse_args()
    probe_shapes = matmul_shapes(config.load(None, args.sets))
    runs = []
    for i in range(args.repeat):
        last = runs[-1] if runs else None
        r = one_run(args.sets, args.cold, probe_shapes, last and list(last["limit_by_shape_gflops"]),
                    last and last["runtime"]["precision"])
        runs.append(r)
        rt = r["runtime"]
        per = ", ".join(f"{s}: {r['flops_by_shape'][s] / 1e12:.2f} TFLOP at {g:.0f} ({_measured(r, s)})"
                        for s, g in r["limit_by_shape_gflops"].items())
        print(f"run {i + 1}/{args.repeat}: {r['wall_s']:.1f} s wall, {rt['matmul_flops'] / 1e12:.2f} TFLOP "
              f"counted; limits GFLOP/s {rt['precision']} by shape: {per} -> ideal {r['ideal_s']:.1f} s, efficiency "
              f"{r['efficiency']:.2f} ({r['efficiency_at_best_shape']:.2f} with every FLOP at "
              f"{r['matmul_limit_gflops']:.0f}); {r['claims_passed']}/{r['claims_total']} claims PASS", flush=True)
    effs = [r["efficiency"] for r in runs]
    # each run also held to the highest limit at each shape measured around any run of this invocation: a run
    # whose own limits were measured in a slow moment (both before and after it) is otherwise held to that moment
    shapes = dict.fromkeys(s for r in runs for s in r["limit_by_shape_gflops"])
    session = {s: max(r["limit_by_shape_gflops"].get(s, 0.0) for r in runs) for s in shapes}
    for r in runs:
        r["efficiency_at_session_limits"] = ideal_s(r["flops_by_shape"], session) / r["wall_s"]
    env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ}
    result = {"benchmark": "theory_walltime", "sets": args.sets, "isa_env": env, "cold_cache": args.cold, "repeat": args.repeat,
              "efficiency_median": statistics.median(effs), "efficiency_min": min(effs),
              "efficiency_at_best_shape_median": statistics.median(r["efficiency_at_best_shape"] for r in runs),
              "session_limits_gflops": session,
              "efficiency_at_session_limits_median": statistics.median(r["efficiency_at_session_limits"] for r in runs),
              "wall_s_median": statistics.median(r["wall_s"] for r in runs), "runs": runs, "machine": machine()}
    path = write("theory_walltime" + (f"_{args.tag}" if args.tag else ""), result)
    rt = runs[-1]["runtime"]
    print(f"efficiency median {result['efficiency_median']:.2f} (min {result['efficiency_min']:.2f}), "
          f"wall median {result['wall_s_median']:.1f} s; held to the highest limits measured in this invocation "
          f"({', '.join(f'{s} {g:.0f}' for s, g in session.items())} GFLOP/s): "
          + ", ".join(f"{r['efficiency_at_session_limits']:.2f}" for r in runs)
          + f", median {result['efficiency_at_session_limits_median']:.2f}")
    print(f"  {rt['precision']}: {rt['precision_reason']}\n  compile {rt['compile']}: {rt['compile_reason']}\n"
          f"  threads {rt['threads']}: {rt['threads_reason']}")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
