"""Killing the driver (SIGINT, SIGKILL) midway loses no finished run; re-running executes only the rest."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sweep.helpers import TINY_BASE, read_rows, write_sweep

# ~1 s per run once a worker is warm, 12 runs on 2 workers x 1 thread: the driver is killed right after
# the first finished run, five rounds of runs before the last (with 6 runs a fast machine finished them
# all before the signal arrived).
BASE = {**TINY_BASE, "sl": {"steps": 1500}, "mrp": {**TINY_BASE["mrp"], "steps": 1500}}
N_RUNS = 12


def _cmd(sweep: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mrplab", "sweep", str(sweep), "--out", str(out), "--workers", "2"]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


def _is_resource_tracker(pid: int) -> bool:
    try:
        return b"multiprocessing.resource_tracker" in (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _start_and_kill(tmp_path: Path, sig: int) -> tuple[Path, dict[str, dict], list[int], subprocess.Popen]:
    sweep = write_sweep(tmp_path, base=BASE, grid={"mrp.mask_ratio": [0.2, 0.4, 0.6]}, seeds=[0, 1, 2, 3])
    out = tmp_path / "out"
    db = out / "tiny" / "results.sqlite"
    # SIGINT at its default in the driver even where this test runs with it ignored (a background job of a
    # non-interactive shell inherits SIG_IGN, and Python then never raises KeyboardInterrupt)
    proc = subprocess.Popen(_cmd(sweep, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if db.exists():
                try:
                    rows = read_rows(db)
                except sqlite3.OperationalError:  # the table is not there yet
                    rows = {}
                if any(r["status"] == "done" for r in rows.values()):
                    break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("no run finished within 90 s")
        # the pool's workers; not multiprocessing's resource tracker, which is also a child of the driver but
        # no worker: it exits by itself once the driver has gone (it reads EOF), a moment after the driver
        workers = [p for p in _children(proc.pid) if not _is_resource_tracker(p)]
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rows = read_rows(db)
    assert len(rows) == N_RUNS
    n_done = sum(r["status"] == "done" for r in rows.values())
    assert 1 <= n_done < N_RUNS, "the driver must be stopped midway for this test to mean anything"
    return sweep, rows, workers, proc


def _resume(tmp_path: Path, sweep: Path, before: dict[str, dict]) -> None:
    done_before = {k: r for k, r in before.items() if r["status"] == "done"}
    res = subprocess.run(_cmd(sweep, tmp_path / "out"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"{N_RUNS} runs, {len(done_before)} already done, {N_RUNS - len(done_before)} to run" in res.stdout
    after = read_rows(tmp_path / "out" / "tiny" / "results.sqlite")
    assert set(after) == set(before) and len(after) == N_RUNS  # exactly one row per run
    assert all(r["status"] == "done" for r in after.values())
    for key, r in done_before.items():  # finished runs were not executed again
        assert after[key]["finished"] == r["finished"] and after[key]["attempts"] == 1


def test_sigint_stops_the_driver_and_a_rerun_runs_only_the_rest(tmp_path):
    sweep, rows, workers, proc = _start_and_kill(tmp_path, signal.SIGINT)
    assert proc.returncode == 130
    assert not any(_alive(p) for p in workers), "the driver stops its workers before it exits"
    err = proc.stderr.read()
    assert "interrupted" in err and "Traceback" not in err, err
    # runs that were in flight went back to pending; nothing is left marked running
    assert {r["status"] for r in rows.values()} <= {"done", "pending"}
    _resume(tmp_path, sweep, rows)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the worker processes")
def test_sigkill_loses_no_finished_run_and_workers_do_not_outlive_the_driver(tmp_path):
    sweep, rows, workers, proc = _start_and_kill(tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert workers, "the pool's worker processes were children of the driver"
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers), "a worker kept running after its driver was killed"
    assert "running" in {r["status"] for r in rows.values()} or "pending" in {r["status"] for r in rows.values()}
    _resume(tmp_path, sweep, rows)
