"""The default `mrplab theory` under every precision x compile choice, and under auto.

Each row is a fresh `mrplab theory --quiet` process (start-up, probes,
compilation, checkpoints, figures and report included). auto runs twice: first
with an empty runtime cache (its probes are timed with it), then again with the
cache the first run left, which is what every later run on the machine sees.
Rows report wall time, matmul efficiency (counted FLOPs / (wall x matmul limit
at the run's precision and shapes)), the choice and its reason, and whether
verdicts and captured counts (per seed) agree with fp32 eager within +-1.

One run per row compares rows minutes apart, and a shared machine's speed
drifts by 20 % and more over minutes (two identical runs here: 51.4 s and
62.4 s). So the script then times the best fixed choice and auto (warm cache)
in interleaved pairs (``--pairs``, order alternating) and reports the median
of the per-pair ratios, ``auto_warm_over_best_paired``: what auto itself costs
against the best choice, with the drift common to both members of a pair.

A fixed choice still running at ``--stop-at`` (default 2) times the best finished
fixed choice's wall is stopped there: it cannot be the best of four, and its
time is recorded as a lower bound (``stopped_after_s``). Where bf16 is emulated
(an AVX2-only CPU) its rows would otherwise run for an hour or more each. The
first row (fp32 eager, the reference for verdicts) and auto are never stopped.

    .venv/bin/python benchmarks/precision.py
    .venv/bin/python benchmarks/precision.py --pairs 3
    .venv/bin/python benchmarks/precision.py --set sl.steps=300   # extra options for every row
    .venv/bin/python benchmarks/precision.py --stop-at 0           # never stop a row
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from _common import Stopped, efficiency, machine, outcome, run_theory, write

CHOICES = [("fp32", "false"), ("fp32", "true"), ("bf16", "false"), ("bf16", "true")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--pairs", type=int, default=2, help="interleaved (best fixed, auto) pairs after the table")
    ap.add_argument("--stop-at", type=float, default=2.0,
                    help="stop a fixed choice at this multiple of the best finished one's wall (0: never)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mrplab-prec-") as tmp:
        cache = f"{tmp}/cache"
        plan = [(f"precision={p}", f"compile={c}") for p, c in CHOICES] + [("precision=auto", "compile=auto")] * 2
        for i, (p, c) in enumerate(plan):
            label = f"{p} {c}" + (" (cold cache)" if i == 4 else " (warm cache)" if i == 5 else "")
            finished = [r["wall_s"] for r in rows[:4] if r["wall_s"] is not None]
            limit = args.stop_at * min(finished) if args.stop_at > 0 and finished and i < 4 else None
            try:
                wall, s = run_theory(f"{tmp}/runs", [p, c, *args.sets], env={"MRPLAB_CACHE_DIR": cache}, limit_s=limit)
            except Stopped as stop:
                rows.append({"choice": label, "wall_s": None, "stopped_after_s": round(stop.wall, 1),
                             "stopped_reason": f"still running at {args.stop_at:g} x the best finished fixed "
                                               f"choice ({min(finished):.1f} s): it cannot be the best of four",
                             "efficiency": None, "precision": p.split("=")[1], "compile": c.split("=")[1]})
                print(f"{label:42s} stopped after {stop.wall:.1f} s ({args.stop_at:g} x {min(finished):.1f} s)",
                      flush=True)
                continue
            rt = s["runtime"]
            rows.append({"choice": label, "wall_s": round(wall, 1), "efficiency": efficiency(wall, s),
                         "precision": rt["precision"], "compile": rt["compile"], "threads": rt["threads"],
                         "precision_reason": rt["precision_reason"], "compile_reason": rt["compile_reason"],
                         "matmul_flops": rt["matmul_flops"], "matmul_limit_gflops": rt["matmul_limit_gflops"],
                         "timings": s["timings"], **outcome(s)})
            print(f"{label:42s} {wall:7.1f} s  eff {rows[-1]['efficiency']:.2f}  {rt['precision']} "
                  f"compile={rt['compile']}", flush=True)
        best_i = min((i for i in range(4) if rows[i]["wall_s"] is not None), key=lambda i: rows[i]["wall_s"])
        pairs = []
        for i in range(args.pairs):
            members = [plan[best_i], plan[5]] if i % 2 == 0 else [plan[5], plan[best_i]]
            walls = {m: run_theory(f"{tmp}/runs", [*m, *args.sets], env={"MRPLAB_CACHE_DIR": cache})[0] for m in members}
            pairs.append({"best_fixed_s": walls[plan[best_i]], "auto_s": walls[plan[5]],
                          "ratio": walls[plan[5]] / walls[plan[best_i]]})
            print(f"pair {i + 1}: {' '.join(plan[best_i])} {walls[plan[best_i]]:.1f} s, auto {walls[plan[5]]:.1f} s "
                  f"(ratio {pairs[-1]['ratio']:.3f})", flush=True)
    ref = rows[0]
    for r in rows:
        if "verdicts" not in r:  # stopped: nothing to compare
            r["same_verdicts_as_fp32_eager"] = r["max_capture_diff_vs_fp32_eager"] = None
            continue
        r["same_verdicts_as_fp32_eager"] = r["verdicts"] == ref["verdicts"]
        r["max_capture_diff_vs_fp32_eager"] = max(
            abs(a - b) for k in ref["captured"] for a, b in zip(r["captured"][k], ref["captured"][k]))
    best = rows[best_i]["wall_s"]
    auto_warm = rows[5]["wall_s"]
    result = {"benchmark": "precision", "extra": args.sets, "stop_at": args.stop_at, "machine": machine(), "rows": rows,
              "best_fixed_wall_s": best, "auto_warm_over_best": auto_warm / best,
              "auto_cold_over_best": rows[4]["wall_s"] / best, "pairs": pairs,
              "auto_warm_over_best_paired": statistics.median(p["ratio"] for p in pairs) if pairs else None}
    write("precision", result)
    print(f"auto (warm cache) / best fixed choice = {auto_warm / best:.3f}; cold: {rows[4]['wall_s'] / best:.3f}")
    if pairs:
        print(f"interleaved pairs: auto / best fixed, median of {len(pairs)} = {result['auto_warm_over_best_paired']:.3f}")
    for r in rows:
        if r["wall_s"] is None:
            print(f"  {r['choice']}: stopped after {r['stopped_after_s']} s, no verdicts to compare")
            continue
        print(f"  {r['choice']}: same verdicts {r['same_verdicts_as_fp32_eager']}, "
              f"max capture diff {r['max_capture_diff_vs_fp32_eager']}")


if __name__ == "__main__":
    main()
