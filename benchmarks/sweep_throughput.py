"""Throughput of `mrplab sweep`: one run alone versus many seeds on the local pool and on Ray.

1. one single-seed run of the config, alone, with threads = all cores (``worker.run_one`` in this
   process; the time includes the first call's warm-up, as every sweep worker pays it once);
2. a sweep of ``--runs`` single-seed runs (seeds 0..runs-1 of the same config) on the local pool
   (default workers = min(runs, cores), threads = cores // workers);
3. the same sweep on Ray started locally (``ray.init(num_cpus=cores)``, timed separately).

Prints the times and writes benchmarks/results/sweep_throughput.json with

* ``local_over_ideal`` = local wall / (runs x one run / cores), the ratio the sweep design aims at;
* ``speedup_vs_serial`` = (runs x one run) / local wall: how much faster than running the runs one
  after another with all cores each;
* ``ray_over_local`` = Ray wall (without ``ray.init``) / local wall.

    .venv/bin/python benchmarks/sweep_throughput.py                       # 16 runs of the default config
    .venv/bin/python benchmarks/sweep_throughput.py --runs 4 --set sl.steps=50 --set mrp.steps=50
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from mrplab import config as config_mod
from mrplab.errors import MrplabError
from mrplab.io import git_commit
from mrplab.sweep import runner, spec
from mrplab.sweep.executors import cpu_cores
from mrplab.sweep.worker import run_one

RESULTS = Path(__file__).resolve().parent / "results" / "sweep_throughput.json"


def _sweep(name: str, base: dict, runs: int) -> spec.Sweep:
    return spec.from_mapping({"name": name, "base": base, "seeds": list(range(runs))})


def _timed_sweep(sw: spec.Sweep, folder: Path, executor: str) -> tuple[float, runner.SweepOutcome]:
    t0 = time.perf_counter()
    outcome = runner.run_sweep(sw, folder=folder, executor=executor)
    wall = time.perf_counter() - t0
    if outcome.failed:
        raise SystemExit(f"{len(outcome.failed)} runs failed on {executor}; see {folder}/results.sqlite")
    return wall, outcome


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=16, help="runs (seeds) in the sweep (default 16)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key for every run, e.g. --set sl.steps=50 (repeatable)")
    ap.add_argument("--skip-ray", action="store_true", help="time the local pool only")
    args = ap.parse_args(argv)
    try:
        base = config_mod.apply_overrides({}, args.overrides)
        cfg = config_mod.validate({**base, "seeds": [0]})
        sw = _sweep("throughput", base, args.runs)
    except MrplabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cores = cpu_cores()

    print(f"one run alone (seed 0, {cores} threads) ...", flush=True)
    t0 = time.perf_counter()
    out = run_one("theory", cfg.model_dump(mode="json"), cores, {"config_hash": cfg.hash()})
    one = time.perf_counter() - t0
    if not out["ok"]:
        print(f"error: the single run failed: {out['error']}", file=sys.stderr)
        return 1
    print(f"  {one:.1f} s")

    with tempfile.TemporaryDirectory(prefix="mrplab-sweep-bench-") as tmp:
        print(f"{args.runs} runs on the local pool ...", flush=True)
        local, local_out = _timed_sweep(sw, Path(tmp) / "local", "local")
        print(f"  {local:.1f} s  ({local_out.executor})")
        ray_wall = ray_init = None
        ray_desc = None
        if not args.skip_ray:
            import ray

            print(f"{args.runs} runs on Ray, started locally ...", flush=True)
            t0 = time.perf_counter()
            ray.init(num_cpus=cores, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
            ray_init = time.perf_counter() - t0
            try:
                ray_wall, ray_out = _timed_sweep(sw, Path(tmp) / "ray", "ray")
                ray_desc = ray_out.executor
            finally:
                ray.shutdown()
            print(f"  {ray_wall:.1f} s after {ray_init:.1f} s of ray.init  ({ray_desc})")

    ideal = args.runs * one / cores
    result = {
        "benchmark": "sweep_throughput",
        "runs": args.runs,
        "overrides": args.overrides,
        "defaults": not args.overrides,
        "config_hash_seed0": cfg.hash(),
        "one_run_s": one,
        "one_run_threads": cores,
        "local_s": local,
        "local_executor": local_out.executor,
        "ray_s": ray_wall,
        "ray_init_s": ray_init,
        "ray_executor": ray_desc,
        "ideal_s": ideal,
        "local_over_ideal": local / ideal,
        "speedup_vs_serial": args.runs * one / local,
        "ray_over_local": ray_wall / local if ray_wall is not None else None,
        "git_commit": git_commit(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cores": cores,
            "torch": torch.__version__,
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = RESULTS.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_path, RESULTS)

    print(f"local / (runs x one run / cores) = {result['local_over_ideal']:.2f}"
          f"   speed-up vs one after another = {result['speedup_vs_serial']:.2f}x")
    if ray_wall is not None:
        print(f"ray / local = {result['ray_over_local']:.2f}")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
