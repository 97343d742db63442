"""Wall time of `mrplab theory` with the default config, end to end.

Runs the command in a subprocess (same interpreter, ``python -m mrplab theory
--out <tmpdir> --quiet``), so the time includes start-up, data, training,
probes, checkpoints, figures and the report. Prints the wall time and writes
benchmarks/results/theory_walltime.json with the phase timings from the run's
summary.json and the machine it ran on.

    .venv/bin/python benchmarks/theory_walltime.py                  # defaults
    .venv/bin/python benchmarks/theory_walltime.py --set threads=1  # extra mrplab options
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "theory_walltime.json"


def main(extra: list[str]) -> int:
    cmd = [sys.executable, "-m", "mrplab", "theory", "--quiet", *extra]
    keep = os.environ.get("MRPLAB_BENCH_KEEP")  # a folder to keep the run folder in, for inspection
    with tempfile.TemporaryDirectory(prefix="mrplab-bench-") as tmp:
        tmp = keep or tmp
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, "--out", tmp], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            print(f"mrplab theory failed with exit status {proc.returncode}", file=sys.stderr)
            return proc.returncode
        run_dir = Path(proc.stdout.strip().splitlines()[-1])
        summary = json.loads((run_dir / "summary.json").read_text())

    result = {
        "benchmark": "theory_walltime",
        "command": shlex.join(["mrplab", *cmd[3:]]),
        "defaults": not extra,
        "wall_s": wall,
        "timings": summary["timings"],
        "wall_in_run_s": summary.get("wall_s"),
        "wall_with_report_s": summary.get("wall_with_report_s"),
        "config_hash": summary["config_hash"],
        "seeds": summary["seeds"],
        "steps": summary.get("steps"),
        "claims_passed": summary.get("claims_passed"),
        "verdicts": [
            {k: v[k] for k in ("id", "metric", "rule", "mean", "std", "min", "max", "per_seed", "verdict")}
            for v in summary["verdicts"]
        ],
        "claims_total": summary.get("claims_total"),
        "git_commit": summary.get("git_commit"),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = RESULTS.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_path, RESULTS)

    t = summary["timings"]
    label = "defaults" if not extra else "defaults + " + shlex.join(extra)
    print(f"mrplab theory ({label}): {wall:.1f} s wall")
    print("  " + "  ".join(f"{k} {v:.1f}" for k, v in t.items()))
    print(f"  {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"written {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
