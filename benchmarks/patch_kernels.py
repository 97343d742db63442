"""The step's fused elementwise kernels: mrplab's C++ (theory/native.py) against torch.compile's.

Three measurements, written to benchmarks/results/patch_kernels.json:

- per step, in this process: ms of one step's two passes over Z (pool, then grad) with a mask at
  the default run's chunk shape [3, 1000, 16, 80], and for shared data at 8 runs laid out as their
  one matmul writes them, for eager, torch.compile (inductor) and native, fp32 and bf16; the three
  are timed in turn, round after round, and each keeps its best round;
- the fused steps, the same way: the supervised step's work on Z (pool, the class-sum head and
  its cross-entropy, grad) eagerly, composed from the native pool and grad, and fused in one
  pass; the default MRP loss on the pooled codes [3, 1000, 80] (and the fitted-decoder control's),
  eager against native;
- start-up, in fresh processes with warm caches (both built once before timing): seconds from
  launching `python` to the end of the first fused pool and grad, i.e. what a run pays before its
  first fused step (importing torch, the compiler stack or the library, loading the kernels). The
  two backends alternate, `--starts` times each; the median is reported.

    .venv/bin/python benchmarks/patch_kernels.py [--starts 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write  # noqa: E402

from mrplab import runtime  # noqa: E402
from mrplab.theory import steps  # noqa: E402

SHAPE, SHARED, Q, THR = (3, 1000, 16, 80), (8, 1000, 16, 80), 4, 1.0
CHILD = """
import sys, time, torch
from mrplab.theory import steps
Z, keep, dh = steps._probe_args({shape}, {thr}, torch.{dtype}, torch.device("cpu"))
o = steps.fused(sys.argv[1])
o.pool(Z, keep, {q}, {thr})
o.grad(Z, keep, dh, {q}, {thr})
"""


def _inputs(layout: str, dtype: torch.dtype):
    """Z, keep, dh: the default run's chunk [3, 1000, 16, 80], or for shared data 8 runs as the one
    matmul X[N*P, d] @ W[d, 8*K] writes them (a view of [N, P, 8, K])."""
    if layout == "per_run":
        return steps._probe_args(SHAPE, THR, dtype, torch.device("cpu"))
    c, N, P, K = SHARED
    Z, keep, dh = steps._probe_args((N, P, c, K), THR, dtype, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    return Z.permute(2, 0, 1, 3), torch.rand(c, N, P, generator=g) < 0.5, torch.randn(c, N, K, generator=g)


def per_step(rounds: int) -> dict:
    runtime.keep_freed_memory()
    out = {}
    kernels = {"eager": steps.EAGER, "inductor": steps.fused("inductor"), "native": steps.fused("native")}
    for layout in ("per_run", "shared"):
        for dtype in (torch.float32, torch.bfloat16):
            Z, keep, dh = _inputs(layout, dtype)
            best = {name: float("inf") for name in kernels}
            for _ in range(rounds):
                for name, o in kernels.items():
                    def step(o=o):
                        o.pool(Z, keep, Q, THR)
                        o.grad(Z, keep, dh, Q, THR)
                    best[name] = min(best[name], runtime.best_time(step, 0.2) * 1e3)
            row = f"{layout} {str(dtype).removeprefix('torch.')}"
            out[row] = {"shape": list(Z.shape), "ms": best, "native_vs_inductor": best["native"] / best["inductor"],
                        "native_vs_eager": best["native"] / best["eager"]}
            print(f"{row} {list(Z.shape)}: per step eager {best['eager']:.3f} ms, inductor {best['inductor']:.3f} "
                  f"ms, native {best['native']:.3f} ms (native / inductor {out[row]['native_vs_inductor']:.2f})")
    return out


def fused_steps(rounds: int) -> dict:
    runtime.keep_freed_memory()
    native = steps.fused("native")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        Z, _, _ = _inputs("per_run", dtype)
        y = torch.randint(0, 10, SHAPE[:2], generator=torch.Generator().manual_seed(2))
        composed = steps.PatchOps(native.pool, native.grad)
        cands = {"eager": lambda: steps.sl_patch_step(Z, y, Q, THR, 10, 8),
                 "native pool + grad": lambda: steps.sl_patch_step(Z, y, Q, THR, 10, 8, composed),
                 "native fused": lambda: native.sl(Z, y, Q, THR, 10, 8)}
        out[f"sl {str(dtype).removeprefix('torch.')}"] = _best(cands, rounds)
    g = torch.Generator().manual_seed(3)
    R, N, _, K = SHAPE
    h, t, D = torch.rand(R, N, K, generator=g), torch.rand(R, N, K, generator=g), torch.randn(R, K, generator=g)
    for fit in (False, True):
        cands = {"eager": lambda fit=fit: steps.diag_loss(h, t, D, 0.75, fit),
                 "native": lambda fit=fit: native.diag_loss(h, t, D, 0.75, fit)}
        out["mrp loss" + (" fitted decoder" if fit else "")] = _best(cands, rounds)
    for row, ms in out.items():
        print(f"{row}: " + ", ".join(f"{name} {v:.3f} ms" for name, v in ms.items()))
    return out


def _best(cands: dict, rounds: int) -> dict[str, float]:
    best = {name: float("inf") for name in cands}
    for _ in range(rounds):
        for name, fn in cands.items():
            best[name] = min(best[name], runtime.best_time(fn, 0.2) * 1e3)
    return best


def start_up(starts: int, dtype: str = "bfloat16") -> dict:
    code = CHILD.format(shape=SHAPE, thr=THR, q=Q, dtype=dtype)
    times: dict[str, list[float]] = {"inductor": [], "native": []}
    for backend in times:  # warm every cache first: the timed starts pay loading, not building
        subprocess.run([sys.executable, "-c", code, backend], check=True, capture_output=True)
    for _ in range(starts):
        for backend in times:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code, backend], check=True, capture_output=True)
            times[backend].append(time.perf_counter() - t0)
    med = {b: statistics.median(t) for b, t in times.items()}
    print(f"start-up to the first fused step ({dtype}, warm caches, median of {starts}): inductor "
          f"{med['inductor']:.2f} s, native {med['native']:.2f} s (saves {med['inductor'] - med['native']:.2f} s)")
    return {"dtype": dtype, "seconds": times, "median_s": med, "saved_s": med["inductor"] - med["native"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=5, help="fresh processes per backend for the start-up time")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the per-step timing")
    args = ap.parse_args()
    result = {"machine": machine(), "shape": SHAPE, "q": Q, "threads": torch.get_num_threads(),
              "per_step": per_step(args.rounds), "fused_steps_ms": fused_steps(args.rounds),
              "start_up": start_up(args.starts)}
    print(f"written {write('patch_kernels', result)}")


if __name__ == "__main__":
    main()
