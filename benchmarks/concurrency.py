"""Two `mrplab theory` runs at once on one machine vs one run alone, end to end.

Each mrplab process takes its share of the available cores among the mrplab
processes running at the time (runtime.CoreShare), so two concurrent runs must
not slow each other by more than the share of cores they give up: on 2 cores
each should finish within 2.5x of one run alone. ``--control`` adds the case
that share prevents: both runs forced to all cores (``threads=<cores>``), i.e.
oversubscribed; give it a shortened config with --set, it can be very slow.

    .venv/bin/python benchmarks/concurrency.py                       # default config
    .venv/bin/python benchmarks/concurrency.py --control --set sl.steps=100 --set mrp.steps=100

Writes benchmarks/results/concurrency.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from _common import machine, run_theory, write


def pair(tmp: str, sets: list[str]) -> tuple[float, list[float], list[dict]]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as ex:
        futs = [ex.submit(run_theory, f"{tmp}/{i}", sets) for i in range(2)]
        out = [f.result() for f in futs]
    return time.perf_counter() - t0, [w for w, _ in out], [s for _, s in out]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--control", action="store_true", help="also run both with threads=<all cores>")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    args = ap.parse_args()
    m = machine()
    with tempfile.TemporaryDirectory(prefix="mrplab-conc-") as tmp:
        alone, s_alone = run_theory(f"{tmp}/alone", args.sets)
        print(f"one run alone: {alone:.1f} s, threads {s_alone['runtime']['threads']}", flush=True)
        wall, each, summ = pair(tmp, args.sets)
        print(f"two at once: {each[0]:.1f} s and {each[1]:.1f} s "
              f"(x{each[0] / alone:.2f}, x{each[1] / alone:.2f} of alone); threads seen "
              f"{[s['runtime']['threads_seen'] for s in summ]}", flush=True)
        result = {"benchmark": "concurrency", "extra": args.sets, "machine": m, "alone_s": alone,
                  "concurrent_s": each, "slowdown": [e / alone for e in each],
                  "threads_seen": [s["runtime"]["threads_seen"] for s in summ],
                  "same_verdicts": all([v["verdict"] for v in s["verdicts"]] ==
                                       [v["verdict"] for v in s_alone["verdicts"]] for s in summ)}
        if args.control:
            cores = m["cores_available"]
            _, each_c, _ = pair(tmp, [*args.sets, f"threads={cores}"])
            alone_c, _ = run_theory(f"{tmp}/alone_c", [*args.sets, f"threads={cores}"])
            result.update({"control_threads": cores, "control_alone_s": alone_c, "control_concurrent_s": each_c,
                           "control_slowdown": [e / alone_c for e in each_c]})
            print(f"control, both at threads={cores}: {each_c[0]:.1f} s and {each_c[1]:.1f} s "
                  f"(x{each_c[0] / alone_c:.2f}, x{each_c[1] / alone_c:.2f} of alone {alone_c:.1f} s)")
    write("concurrency_control" if args.control else "concurrency", result)


if __name__ == "__main__":
    main()
