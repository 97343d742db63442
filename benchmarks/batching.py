"""R seeds batched in one `mrplab theory` run vs the same seeds as R sequential runs, end to end.

Each run is a fresh `python -m mrplab theory --quiet` subprocess with the
default config, as a user would start it; the batched run trains all R seeds
at once (weights with a leading run axis), the sequential runs one seed each,
in groups with the batched runs between them (``schedule``).
Both sides pay their own start-up, data generation, runtime choice, probes,
checkpoints, figures and report. The per-seed outcomes must agree (a seed
gives the same run alone or batched): the script checks every verdict's
per-seed numbers. With ``--shared`` the batched run's seeds share one data set
(``data.share_across_runs``); the sequential runs are the same single-seed runs.

How low a ratio can go: after the runs the training pair's limit is measured
at each shape the runs multiplied at (as theory_walltime.py does), and each
side's counted matmul FLOPs at those limits give its ideal time and its
efficiency (ideal / wall). ``*_ratio_floor`` = a batched run's ideal time /
the sequential runs' wall: the ratio it would reach with every counted FLOP at
the limit against the sequential runs as measured; a target below the floor
cannot be reached on the machine, and floor / target is the efficiency the
batched run would need to reach the target. ``*_ratio_at_square`` holds the
FLOPs to the pair's rate at a 4096^3 square instead, the shape a BLAS runs
fastest (measured at or above the runs' thin shapes on the CPUs tried): the
ratio even a perfect blocking of the same products could hardly beat.

    .venv/bin/python benchmarks/batching.py                 # R = 8, default config
    .venv/bin/python benchmarks/batching.py --shared        # and the batched run on shared data
    .venv/bin/python benchmarks/batching.py --runs 4 --set sl.steps=300   # shrink it

Writes benchmarks/results/batching.json: ``ratio`` = batched wall / sequential wall (< 1: batching pays).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from mrplab.cli import _request_huge_pages  # imports no torch

_request_huge_pages()  # the limits are measured under the allocator setting the CLI gives the runs

from _common import ideal_s, limits_by_shape, machine, main_shapes, run_theory, write  # noqa: E402


def mismatches(batched: dict, seq: list[dict]) -> list[dict]:
    out = []
    for i, v in enumerate(batched["verdicts"]):
        for s, summ in enumerate(seq):
            a, b = v["per_seed"][s], summ["verdicts"][i]["per_seed"][0]
            if not (a == b or (a is not None and b is not None and abs(a - b) <= 1e-6)):
                out.append({"claim": v["id"], "seed": s, "batched": a, "alone": b})
    return out


SQUARE = 4096  # the side of the square pair: the shape a BLAS runs fastest, a rate the runs' thin shapes hardly beat


def at_the_limit(sides: dict[str, list[tuple[float, dict]]]) -> dict | None:
    """Each side's (name: its runs as (wall, summary)) counted FLOPs at the training pair's limit measured now at
    every main shape of any run (all sides held to the same limits): ideal seconds and efficiency (ideal / the
    side's summed wall); and the pair's rate at a large square (``square_gflops``), which the runs' thin shapes
    hardly beat. None where the runs chose different precisions or devices (no common limit)."""
    precision = {s["runtime"]["precision"] for runs in sides.values() for _, s in runs}
    device = {s["device"] for runs in sides.values() for _, s in runs}
    if len(precision) != 1 or len(device) != 1:
        return None
    by_run = [s["runtime"]["matmul_flops_by_shape"] for runs in sides.values() for _, s in runs]
    shapes = list(dict.fromkeys(sh for b in by_run for sh in main_shapes(b)))
    precision, device = precision.pop(), device.pop()
    square = f"{SQUARE}x{SQUARE}x{SQUARE}"
    measured = limits_by_shape(list(dict.fromkeys([*shapes, square])), precision, device)
    limits = {sh: measured[sh] for sh in shapes}
    out: dict = {"limits_gflops": limits, "square_gflops": measured[square]}
    for name, runs in sides.items():
        ideal = sum(ideal_s(s["runtime"]["matmul_flops_by_shape"], limits) for _, s in runs)
        out[name] = {"ideal_s": ideal, "efficiency": ideal / sum(w for w, _ in runs),
                     "tflop": sum(s["runtime"]["matmul_flops"] for _, s in runs) / 1e12}
    return out


def schedule(seeds: list[int], batched: list[str]) -> list[int | str]:
    """The order of the runs: the single-seed runs in len(batched) + 1 groups as equal as can be, a batched run
    between each two, so that a shared machine's drift over the benchmark's half hour reaches both sides alike
    rather than the batched runs' minutes alone (run first, one batched R = 8 reading was 1.00 where the run
    before read 0.91)."""
    g = len(batched) + 1
    cuts = [round(i * len(seeds) / g) for i in range(g + 1)]
    order: list[int | str] = []
    for i in range(g):
        order += seeds[cuts[i]:cuts[i + 1]]
        if i < len(batched):
            order.append(batched[i])
    return order


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8, help="R: seeds 0..R-1")
    ap.add_argument("--shared", action="store_true", help="also time the batched run with data.share_across_runs")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra config override key=value")
    args = ap.parse_args()
    seeds = list(range(args.runs))
    result: dict = {"benchmark": "batching", "R": args.runs, "overrides": args.extra, "machine": machine()}
    batches = {"batched": [f"seeds={seeds}"]}
    if args.shared:
        batches["shared"] = [f"seeds={seeds}", "data.share_across_runs=true"]
    order = schedule(seeds, list(batches))
    result["order"] = [f"seed {x}" if isinstance(x, int) else x for x in order]
    ran, seq = {}, []
    with tempfile.TemporaryDirectory(prefix="mrplab-batching-") as tmp:
        for x in order:
            if isinstance(x, int):
                seq.append(run_theory(tmp, [f"seeds=[{x}]", *args.extra]))
                print(f"seed {x} alone: {seq[-1][0]:.1f} s", flush=True)
            else:
                ran[x] = run_theory(tmp, [*batches[x], *args.extra])
                print(f"batched R={args.runs}{' on shared data' if x == 'shared' else ''}: {ran[x][0]:.1f} s", flush=True)
    t_batched, batched = ran["batched"]
    if args.shared:
        t_shared, shared = ran["shared"]
    t_seq = sum(t for t, _ in seq)
    bad = mismatches(batched, [s for _, s in seq])
    result.update({
        "batched_wall_s": t_batched, "sequential_wall_s": t_seq, "sequential_each_wall_s": [t for t, _ in seq],
        "ratio": t_batched / t_seq, "per_seed_mismatches": bad,
        "batched_timings": batched["timings"], "single_timings": [s["timings"] for _, s in seq],
        "batched_runtime": batched.get("runtime"), "single_runtime": seq[0][1].get("runtime"),
    })
    sides = {"batched": [(t_batched, batched)], "sequential": seq, **({"shared": [(t_shared, shared)]} if args.shared else {})}
    limit = result["at_the_limit"] = at_the_limit(sides)
    for name, prefix in (("batched", ""), ("shared", "shared_")):
        if limit and name in limit:
            result[f"{prefix}ratio_floor"] = limit[name]["ideal_s"] / t_seq
            # every FLOP at the square's rate: what even a perfect blocking of the same products could hardly beat
            result[f"{prefix}ratio_at_square"] = limit[name]["tflop"] * 1e3 / limit["square_gflops"] / t_seq
    line = (f"R={args.runs}: one batched run {t_batched:.1f} s; {args.runs} sequential runs {t_seq:.1f} s: "
            f"batched / sequential = {t_batched / t_seq:.2f}")
    if args.shared:
        result.update({"shared_wall_s": t_shared, "shared_ratio": t_shared / t_seq,
                       "shared_timings": shared["timings"]})
        line += f"; shared data {t_shared:.1f} s = {t_shared / t_seq:.2f}"
    path = write("batching", result)
    print(f"{line}; per-seed verdict numbers that differ: {len(bad)}")
    print("the runs chose different precisions: no common matmul limit" if not limit else
          "at the matmul limit measured now (" + ", ".join(f"{s} {g:.0f}" for s, g in limit["limits_gflops"].items())
          + " GFLOP/s): " + "; ".join(f"{n} {v['tflop']:.1f} TFLOP, ideal {v['ideal_s']:.1f} s, efficiency "
                                        f"{v['efficiency']:.2f}" for n, v in limit.items() if n in sides)
          + f"; ratio floor {result['ratio_floor']:.2f}"
          + (f", shared {result['shared_ratio_floor']:.2f}" if args.shared else "")
          + f"; every FLOP at the {SQUARE}^3 pair's {limit['square_gflops']:.0f} GFLOP/s: "
          + f"{result['ratio_at_square']:.2f}" + (f", shared {result['shared_ratio_at_square']:.2f}" if args.shared else ""))
    print(f"written {path}")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
