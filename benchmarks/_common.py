"""Shared by the end-to-end benchmarks: run `mrplab theory` in a fresh process, describe the machine."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


class Stopped(Exception):
    """A run stopped at its time limit; ``wall`` is then a lower bound on the time it would have taken."""

    def __init__(self, wall: float):
        super().__init__(f"stopped after {wall:.1f} s")
        self.wall = wall


def run_theory(out: str | Path, sets: list[str], env: dict[str, str] | None = None,
               limit_s: float | None = None) -> tuple[float, dict]:
    """(wall seconds, summary.json) of `python -m mrplab theory --quiet --out OUT --set ...` in a new process.

    With ``limit_s`` the run (and any process it started, e.g. compile workers) is stopped once
    it has run that long, and ``Stopped`` is raised.
    """
    cmd = [sys.executable, "-m", "mrplab", "theory", "--quiet", "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=limit_s)
    except BaseException as err:  # over limit_s, or interrupted (Ctrl-C, a timeout's SIGINT): the run goes too
        wall = time.perf_counter() - t0
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the signal that stopped us did not reach it
        proc.communicate()
        if isinstance(err, subprocess.TimeoutExpired):
            raise Stopped(wall) from None
        raise
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(stderr[-3000:])
        raise SystemExit(f"mrplab theory {' '.join(sets)} failed with exit status {proc.returncode}")
    run_dir = Path(stdout.strip().splitlines()[-1])
    return wall, json.loads((run_dir / "summary.json").read_text())


def efficiency(wall: float, summary: dict) -> float | None:
    """Counted matmul FLOPs / (wall x the measured matmul limit at the run's precision and shapes)."""
    rt = summary.get("runtime") or {}
    if not rt.get("matmul_flops") or not rt.get("matmul_limit_gflops"):
        return None
    return rt["matmul_flops"] / (wall * rt["matmul_limit_gflops"] * 1e9)


LIMIT_BUDGET_S = 1.0  # per shape, precision and measurement: the best time of many pairs
MIN_SHARE = 0.01  # shapes with less of a run's FLOPs are held to the highest limit measured


def _shape(key: str) -> tuple[int, int, int]:
    m, k, n = (int(x) for x in key.split("x"))
    return m, k, n


def limits_by_shape(shapes, precision: str, device: str = "cpu") -> dict[str, float]:
    """GFLOP/s of the training pair (runtime.matmul_gflops) at each shape ("m x k x n" keys) in ``precision`` on
    ``device`` (the runs' own: a summary's "device")."""
    from mrplab import runtime

    dtype, dev = runtime.dtype_of(precision), torch.device(device)
    return {s: runtime.matmul_gflops([_shape(s)], dtype, dev, LIMIT_BUDGET_S) for s in shapes}


def main_shapes(by_shape: dict[str, int]) -> list[str]:
    """The shapes ("m x k x n") that carry at least MIN_SHARE of a run's counted FLOPs."""
    total = sum(by_shape.values())
    return [s for s, f in by_shape.items() if f >= MIN_SHARE * total]


def ideal_s(by_shape: dict[str, int], limits: dict[str, float]) -> float:
    """Seconds the FLOPs by shape take at these limits (GFLOP/s by shape; shapes without one: the highest)."""
    top = max(limits.values())
    return sum(f / (limits.get(s, top) * 1e9) for s, f in by_shape.items())


def machine() -> dict:
    from mrplab import runtime

    info = runtime.cpu_info()
    return {
        "cpu_model": info["model"],
        "cpu_bf16_flags": sorted(info["flags"] & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2"}),
        "torch_cpu_capability": info["capability"],
        "platform": platform.platform(),
        "cores_available": runtime.available_cores()[0],
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
    }


def write(name: str, result: dict) -> Path:
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def outcome(summary: dict) -> dict:
    """What must not change with precision or compilation: verdicts and captured counts per seed."""
    return {
        "verdicts": [v["verdict"] for v in summary["verdicts"]],
        "captured": {k: [m[k] for m in summary["per_seed"]] for k in ("mrp_captured", "sl_captured", "ft_captured")},
    }
