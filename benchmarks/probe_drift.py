"""How steady the precision probe's bf16 / fp32 ratio is on this machine: in turn vs one after the other.

precision auto picks bf16 where a probe at the run's matmul shapes measures it at least
runtime.BF16_MIN_SPEEDUP faster than fp32, and the answer is cached for every later run on the
machine. On a shared host whose speed drifts, measuring fp32 and then bf16 one after the other
compares two different moments. runtime.matmul_rates measures them in turn (bursts of
runtime.PROBE_BURST calls), so drift reaches both alike. This benchmark repeats both ways
``--repeats`` times in one process at the default run's shapes, alternating which goes first, and
reports the spread (min, max, and max / min) of the ratio and of each rate.

    .venv/bin/python benchmarks/probe_drift.py              # 8 repeats of each
    .venv/bin/python benchmarks/probe_drift.py --repeats 12

Writes benchmarks/results/probe_drift.json. Needs native bf16 to say anything about the choice
(elsewhere bf16 is emulated and auto never probes it).
"""

from __future__ import annotations

import argparse
import statistics
import sys

from _common import machine, write


def spread(values: list[float]) -> dict:
    return {"min": min(values), "max": max(values), "median": statistics.median(values),
            "max_over_min": max(values) / min(values), "values": values}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=8, help="probes of each kind")
    args = ap.parse_args(argv)

    from mrplab.cli import _request_huge_pages

    _request_huge_pages()
    import torch

    from mrplab import config, runtime
    from mrplab.theory.experiment import matmul_shapes

    runtime.keep_freed_memory()
    cpu = torch.device("cpu")
    shapes = matmul_shapes(config.load(None, []))
    f32, b16 = torch.float32, torch.bfloat16

    def one_after_the_other() -> tuple[float, float]:
        return runtime.matmul_gflops(shapes, f32, cpu), runtime.matmul_gflops(shapes, b16, cpu)

    def in_turn() -> tuple[float, float]:
        return tuple(runtime.matmul_rates(shapes, [f32, b16], cpu))

    kinds = {"one_after_the_other": one_after_the_other, "in_turn": in_turn}
    rates: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    for i in range(args.repeats):
        order = list(kinds) if i % 2 == 0 else list(kinds)[::-1]
        for k in order:
            rates[k].append(kinds[k]())
        print(" ".join(f"{k}: fp32 {f:.0f} bf16 {b:.0f} ({b / f:.2f}x)" for k, (f, b) in
                       ((k, rates[k][-1]) for k in kinds)), flush=True)
    result = {"benchmark": "probe_drift", "machine": machine(), "shapes": shapes, "repeats": args.repeats,
              "probe_burst": runtime.PROBE_BURST}
    for k, v in rates.items():
        result[k] = {"ratio": spread([b / f for f, b in v]), "fp32_gflops": spread([f for f, _ in v]),
                     "bf16_gflops": spread([b for _, b in v])}
        r = result[k]["ratio"]
        print(f"{k}: bf16 / fp32 {r['min']:.2f}x-{r['max']:.2f}x (median {r['median']:.2f}x, "
              f"max / min {r['max_over_min']:.2f})")
    print(f"written {write('probe_drift', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
