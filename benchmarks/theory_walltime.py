"""Wall time and matmul efficiency of `mrplab theory` with the default config, end to end.

Runs the command in a fresh process (``python -m mrplab theory --out <tmpdir>
--quiet``), so the time includes start-up, the runtime choice (probes or the
cache), compilation, data, training, probes, checkpoints, figures and the
report. Efficiency = the run's counted matmul FLOPs / (wall time x the
machine's matmul limit at the chosen precision, measured at the run's own
shapes by runtime.py). Writes benchmarks/results/theory_walltime.json.

    .venv/bin/python benchmarks/theory_walltime.py                  # defaults
    .venv/bin/python benchmarks/theory_walltime.py --set threads=1  # extra mrplab options
    .venv/bin/python benchmarks/theory_walltime.py --cold           # with an empty runtime cache
"""

from __future__ import annotations

import argparse
import os
import tempfile

from _common import efficiency, machine, run_theory, write


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--cold", action="store_true", help="empty runtime cache (probes are timed with the run)")
    args = ap.parse_args()
    keep = os.environ.get("MRPLAB_BENCH_KEEP")  # a folder to keep the run folder in, for inspection
    with tempfile.TemporaryDirectory(prefix="mrplab-bench-") as tmp:
        env = {"MRPLAB_CACHE_DIR": f"{tmp}/cache"} if args.cold else {}
        wall, summary = run_theory(keep or tmp, args.sets, env=env)
    rt = summary["runtime"]
    eff = efficiency(wall, summary)
    result = {
        "benchmark": "theory_walltime", "sets": args.sets, "cold_cache": args.cold, "wall_s": wall,
        "efficiency": eff, "matmul_flops": rt["matmul_flops"], "matmul_limit_gflops": rt["matmul_limit_gflops"],
        "ideal_s": rt["matmul_flops"] / (rt["matmul_limit_gflops"] * 1e9),
        "runtime": rt, "timings": summary["timings"], "wall_with_report_s": summary.get("wall_with_report_s"),
        "config_hash": summary["config_hash"], "seeds": summary["seeds"], "steps": summary.get("steps"),
        "claims_passed": summary.get("claims_passed"), "claims_total": summary.get("claims_total"),
        "verdicts": [{k: v[k] for k in ("id", "metric", "rule", "mean", "std", "min", "max", "per_seed", "verdict")}
                     for v in summary["verdicts"]],
        "git_commit": summary.get("git_commit"), "machine": machine(),
    }
    path = write("theory_walltime", result)
    print(f"mrplab theory {' '.join(args.sets)}: {wall:.1f} s wall, {rt['matmul_flops'] / 1e12:.2f} TFLOP counted, "
          f"limit {rt['matmul_limit_gflops']:.0f} GFLOP/s ({rt['precision']}) -> ideal {result['ideal_s']:.1f} s, "
          f"efficiency {eff:.2f}; {summary['claims_passed']}/{summary['claims_total']} claims PASS")
    print(f"  {rt['precision']}: {rt['precision_reason']}\n  compile {rt['compile']}: {rt['compile_reason']}\n"
          f"  threads {rt['threads']}: {rt['threads_reason']}")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
