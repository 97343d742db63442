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
``--cold-pairs`` does the same with each member given its own empty cache
folder, as on a machine's first run (``auto_cold_over_best_paired``): both
members then build the fused kernels if they use them, and auto also runs its
probes. ``--pairs-only PRECISION,COMPILE`` skips the table and pairs auto with
that fixed choice (one untimed run of each first warms the shared cache).

A fixed choice still running at ``--stop-at`` (default 2) times the best finished
fixed choice's wall is stopped there: it cannot be the best of four, and its
time is recorded as a lower bound (``stopped_after_s``). Where bf16 is emulated
(an AVX2-only CPU) its rows would otherwise run for an hour or more each. The
first row (fp32 eager, the reference for verdicts) and auto are never stopped.

    .venv/bin/python benchmarks/precision.py
    .venv/bin/python benchmarks/precision.py --pairs 3
    .venv/bin/python benchmarks/precision.py --set sl.steps=300   # extra options for every row
    .venv/bin/python benchmarks/precision.py --stop-at 0           # never stop a row
    .venv/bin/python benchmarks/precision.py --pairs-only fp32,true --pairs 0 --cold-pairs 2
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
    ap.add_argument("--cold-pairs", type=int, default=1,
                    help="interleaved (best fixed, auto) pairs, each member with its own empty cache")
    ap.add_argument("--pairs-only", metavar="PRECISION,COMPILE", default=None,
                    help="skip the table; pair auto with this fixed choice, e.g. fp32,true")
    ap.add_argument("--stop-at", type=float, default=2.0,
                    help="stop a fixed choice at this multiple of the best finished one's wall (0: never)")
    args = ap.parse_args()
    if args.pairs_only and args.pairs_only not in {f"{p},{c}" for p, c in CHOICES}:
        ap.error(f"--pairs-only {args.pairs_only!r}: give one of {', '.join(f'{p},{c}' for p, c in CHOICES)}")
    auto = ("precision=auto", "compile=auto")
    with tempfile.TemporaryDirectory(prefix="mrplab-prec-") as tmp:
        cache = f"{tmp}/cache"
        if args.pairs_only:
            p, _, c = args.pairs_only.partition(",")
            best_choice, rows = (f"precision={p}", f"compile={c}"), []
            if args.pairs:  # warm pairs need the cache a first run of each leaves
                for m in (best_choice, auto):
                    run_theory(f"{tmp}/runs", [*m, *args.sets], env={"MRPLAB_CACHE_DIR": cache})
        else:
            rows = table(tmp, cache, args)
            best_i = min((i for i in range(4) if rows[i]["wall_s"] is not None), key=lambda i: rows[i]["wall_s"])
            best_choice = (f"precision={CHOICES[best_i][0]}", f"compile={CHOICES[best_i][1]}")
            best = rows[best_i]["wall_s"]
        pairs = paired(tmp, best_choice, auto, args.pairs, cache, args.sets)
        cold_pairs = paired(tmp, best_choice, auto, args.cold_pairs, None, args.sets)
    result = {"benchmark": "precision", "extra": args.sets, "stop_at": args.stop_at, "machine": machine(),
              "rows": rows, "best_fixed": " ".join(best_choice), "pairs": pairs, "cold_pairs": cold_pairs,
              "auto_warm_over_best_paired": statistics.median(p["ratio"] for p in pairs) if pairs else None,
              "auto_cold_over_best_paired": statistics.median(p["ratio"] for p in cold_pairs) if cold_pairs else None}
    if rows:
        result.update(best_fixed_wall_s=best, auto_warm_over_best=rows[5]["wall_s"] / best,
                      auto_cold_over_best=rows[4]["wall_s"] / best)
        print(f"auto (warm cache) / best fixed choice = {result['auto_warm_over_best']:.3f}; "
              f"cold: {result['auto_cold_over_best']:.3f}")
    write("precision", result)
    for name, ps in (("warm", pairs), ("cold", cold_pairs)):
        if ps:
            print(f"interleaved pairs, {name} cache: auto / best fixed, median of {len(ps)} = "
                  f"{result[f'auto_{name}_over_best_paired']:.3f}")
    for r in rows:
        if r["wall_s"] is None:
            print(f"  {r['choice']}: stopped after {r['stopped_after_s']} s, no verdicts to compare")
            continue
        print(f"  {r['choice']}: same verdicts {r['same_verdicts_as_fp32_eager']}, "
              f"max capture diff {r['max_capture_diff_vs_fp32_eager']}")


def table(tmp: str, cache: str, args) -> list[dict]:
    """One fresh run per fixed choice, then auto with the empty and then the warm shared cache."""
    rows = []
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
    ref = rows[0]
    for r in rows:
        if "verdicts" not in r:  # stopped: nothing to compare
            r["same_verdicts_as_fp32_eager"] = r["max_capture_diff_vs_fp32_eager"] = None
            continue
        r["same_verdicts_as_fp32_eager"] = r["verdicts"] == ref["verdicts"]
        r["max_capture_diff_vs_fp32_eager"] = max(
            abs(a - b) for k in ref["captured"] for a, b in zip(r["captured"][k], ref["captured"][k]))
    return rows


def paired(tmp: str, best: tuple[str, str], auto: tuple[str, str], n: int, cache: str | None,
           sets: list[str]) -> list[dict]:
    """``n`` interleaved (best fixed, auto) pairs, order alternating; ``cache`` None: each member its own empty one."""
    out = []
    for i in range(n):
        members = [best, auto] if i % 2 == 0 else [auto, best]
        walls = {}
        for j, m in enumerate(members):
            folder = cache or tempfile.mkdtemp(prefix=f"cold-{i}-{j}-", dir=tmp)
            walls[m] = run_theory(f"{tmp}/runs", [*m, *sets], env={"MRPLAB_CACHE_DIR": folder})[0]
        out.append({"best_fixed_s": walls[best], "auto_s": walls[auto], "ratio": walls[auto] / walls[best],
                    "auto_first": members[0] == auto})
        kind = "warm" if cache else "cold"
        print(f"{kind} pair {i + 1}: {' '.join(best)} {walls[best]:.1f} s, auto {walls[auto]:.1f} s "
              f"(ratio {out[-1]['ratio']:.3f})", flush=True)
    return out


if __name__ == "__main__":
    main()
