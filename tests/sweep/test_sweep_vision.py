"""Vision sweeps: the same store, keys and resume as theory sweeps; runs that share a pretraining share one
pretrained model, and the first of them runs before the others."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import yaml

from mrplab.sweep import runner, spec
from mrplab.sweep.spec import PlannedRun
from mrplab.sweep.store import DB_NAME, Store

from tests.sweep.helpers import read_rows

VISION_BASE = {
    "data": {"image_size": 16, "n_train": 80, "n_test": 32},
    "pretrain": {"epochs": 1, "data": {"source": "embedded", "n_images": 48}},
    "model": {"decoder_dim": 32},
    "checkpoint_every": 0,
    "precision": "fp32",
    "labels": {"val_fraction": 0.0},
    "finetune": {"epochs": 1, "epochs_menu": None},
}



def pretrainings(cache: Path) -> list[Path]:
    """The cached pretrainings (the cache also keeps SL-from-scratch models; hidden partial folders skipped)."""
    return [p for p in cache.iterdir() if not p.name.startswith(".") and (p / "pretrainer.safetensors").is_file()]

def write_vision_sweep(folder: Path, **keys) -> Path:
    doc = {"name": "vtiny", "track": "vision", "base": VISION_BASE, "grid": {"labels.per_class": [4, 10]},
           "seeds": [0, 1], **keys}
    path = folder / "vtiny.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_runs_sharing_a_pretraining_reuse_one_model(tmp_path):
    sw = spec.load_sweep(write_vision_sweep(tmp_path))
    assert sw.track == "vision" and len(sw.runs) == 4
    assert len({r.group for r in sw.runs}) == 2  # one pretraining per seed, shared by both label counts
    out = runner.run_sweep(sw, folder=tmp_path / "s", executor="local", workers=2)
    assert out.executed == 4 and not out.failed
    assert len(pretrainings(tmp_path / "s" / "pretrained")) == 2  # two pretrainings for four rows
    with Store(tmp_path / "s" / DB_NAME, create=False) as st:
        rows = st.rows()
    reused = {}
    for r in rows:
        stages = {s["stage"]: s for s in json.loads(r["summary"])["stages"]}
        reused.setdefault(r["seed"], []).append(stages[f"s{r['seed']}-mae-pretrain"]["reused"])
        assert r["probe.mae_gap"] == r["probe.mae_ft_acc"] - r["probe.sl_acc"]
    assert all(sorted(v) == [False, True] for v in reused.values())  # per seed: trained once, then reused


def test_the_first_run_of_a_group_runs_alone():
    mk = lambda key, group: PlannedRun(key, "s", 0, {}, None, "vision", group)  # noqa: E731
    queue = deque([mk("a1", "A"), mk("a2", "A"), mk("b1", "B"), mk("n", None), mk("b2", "B")])
    leading, started = set(), set()
    order = [runner._next_run(queue, leading, started) for _ in range(3)]
    assert [r.key for r in order] == ["a1", "b1", "n"]  # a2 and b2 wait for their group's first run
    assert runner._next_run(queue, leading, started) is None
    leading.discard("A")  # a1 finished
    assert runner._next_run(queue, leading, started).key == "a2"
    assert runner._next_run(queue, leading, started) is None
    leading.discard("B")
    assert runner._next_run(queue, leading, started).key == "b2"


def test_a_killed_vision_sweep_resumes_without_rerunning_finished_rows(tmp_path):
    sweep = write_vision_sweep(tmp_path, grid={"labels.per_class": [4, 6, 8, 10]}, seeds=[0, 1])
    out = tmp_path / "out"
    db = out / "vtiny" / "results.sqlite"
    cmd = [sys.executable, "-m", "mrplab", "sweep", str(sweep), "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        rows: dict = {}
        while time.monotonic() < deadline:
            if db.exists():
                try:
                    rows = read_rows(db)
                except sqlite3.OperationalError:
                    rows = {}
                if any(r["status"] == "done" for r in rows.values()):
                    break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = read_rows(db)
    done = {k: r for k, r in before.items() if r["status"] == "done"}
    assert 1 <= len(done) < 8
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    after = read_rows(db)
    assert all(r["status"] == "done" for r in after.values()) and len(after) == 8
    for k, r in done.items():  # finished rows were not run again
        assert (after[k]["finished"], after[k]["attempts"]) == (r["finished"], r["attempts"])
    # one pretrained model per seed (a killed worker may leave a hidden partial folder, never a half model)
    assert len(pretrainings(out / "vtiny" / "pretrained")) == 2
