"""R seeds batched in one `mrplab theory` run vs the same seeds as R sequential runs, end to end.

Each run is a fresh `python -m mrplab theory --quiet` subprocess with the
default config, as a user would start it; the batched run trains all R seeds
at once (weights with a leading run axis), the sequential runs one seed each.
Both sides pay their own start-up, data generation, compilation, probes,
checkpoints, figures and report; batching amortises those and widens the
elementwise work. The per-seed outcomes must agree (a seed gives the same run
alone or batched): the script checks every verdict's per-seed numbers.

    .venv/bin/python benchmarks/batching.py                 # R = 8, default config
    .venv/bin/python benchmarks/batching.py --runs 4 --set sl.steps=300   # shrink it

Writes benchmarks/results/batching.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "batching.json"


def run_theory(seeds: list[int], extra: list[str], out: str) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "mrplab", "theory", "--quiet", "--out", out, "--set", f"seeds={seeds}"]
    for item in extra:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"mrplab theory failed with exit status {proc.returncode}")
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    return wall, json.loads((run_dir / "summary.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8, help="R: seeds 0..R-1")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra config override key=value")
    args = ap.parse_args()
    seeds = list(range(args.runs))
    with tempfile.TemporaryDirectory(prefix="mrplab-batching-") as tmp:
        t_batched, batched = run_theory(seeds, args.extra, tmp)
        seq = [run_theory([s], args.extra, tmp) for s in seeds]
    t_seq = sum(t for t, _ in seq)

    mismatches = []
    for i, v in enumerate(batched["verdicts"]):
        for s, (_, summ) in enumerate(seq):
            a, b = v["per_seed"][s], summ["verdicts"][i]["per_seed"][0]
            if not (a == b or (a is not None and b is not None and abs(a - b) <= 1e-6)):
                mismatches.append({"claim": v["id"], "seed": s, "batched": a, "alone": b})
    result = {
        "benchmark": "batching", "R": args.runs, "overrides": args.extra,
        "batched_wall_s": t_batched, "sequential_wall_s": t_seq,
        "sequential_each_wall_s": [t for t, _ in seq],
        "throughput_ratio": t_seq / t_batched,
        "per_seed_mismatches": mismatches,
        "date": dt.datetime.now().isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmpf = RESULTS.with_suffix(".json.tmp")
    tmpf.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmpf, RESULTS)
    print(f"R={args.runs}: one batched run {t_batched:.1f} s; {args.runs} sequential runs {t_seq:.1f} s "
          f"(each {', '.join(f'{t:.0f}' for t, _ in seq)} s): batched throughput {t_seq / t_batched:.2f}x; "
          f"per-seed verdict numbers that differ: {len(mismatches)}")
    print(f"written {RESULTS}")
    return 0 if not mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
