"""The driver: local pool and Ray give the same rows, failed runs are recorded and retried, resume adds runs."""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
from pathlib import Path

import pytest

from mrplab.sweep import runner, spec
from mrplab.sweep.store import DB_NAME, Store
from mrplab.sweep.worker import run_one

from tests.sweep.helpers import TINY_BASE, write_sweep

GRID = {"mrp.mask_ratio": [0.3, 0.7], "data.mu_test": [0.3, 0.6]}


def rows_by_key(folder: Path) -> dict[str, dict]:
    with Store(folder / DB_NAME, create=False) as st:
        return {r["key"]: r for r in st.rows()}


def result_values(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith(("probe.", "claim.")) or k in ("claims_passed", "status")}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """A finished 8-run sweep (2 x 2 grid x 2 seeds) on the local pool; the report tests read it too."""
    folder = tmp_path_factory.mktemp("local")
    sw = spec.load_sweep(write_sweep(folder, grid=GRID, seeds=[0, 1]))
    outcome = runner.run_sweep(sw, folder=folder / "tiny", executor="local", workers=2)
    return sw, outcome


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_local_sweep_stores_one_done_row_per_run_with_every_column(local_sweep):
    sw, outcome = local_sweep
    assert (outcome.planned, outcome.executed, outcome.skipped, outcome.failed) == (8, 8, 0, [])
    rows = rows_by_key(outcome.folder)
    assert set(rows) == {r.key for r in sw.runs}
    for run in sw.runs:
        row = rows[run.key]
        assert row["status"] == "done" and row["attempts"] == 1 and row["error"] is None
        assert row["seed"] == run.seed and json.loads(row["axes"]) == run.axes
        assert row["mrp.mask_ratio"] == run.axes["mrp.mask_ratio"] and row["data.d"] == 16
        assert row["data.Gamma_upper"] == run.cfg.data.Gamma and row["data.gamma"] == run.cfg.data.gamma
        assert json.loads(row["seeds"]) == [run.seed]
        assert row["started"] < row["finished"] and row["wall_s"] > 0
        assert row["run_threads"] == 1  # 2 workers on 2 cores
        summary = json.loads(row["summary"])
        per_seed = summary["per_seed"][0]
        # the probe columns are the run's per-seed metrics; the claim columns its verdicts
        assert row["probe.ft_err_single"] == pytest.approx(per_seed["ft_err_single"])
        assert row["probe.sl_captured"] == per_seed["sl_captured"]
        for v in summary["verdicts"]:
            expected = None if v["verdict"] == "N/A" else int(v["verdict"] == "PASS")  # N/A is not a fail
            assert row[f"claim.{v['id']}.pass"] == expected
        assert row["claims_passed"] == sum(v["verdict"] == "PASS" for v in summary["verdicts"] if v["kind"] == "claim")
        assert summary["config_hash"] == run.key
        assert row["time.total_s"] > 0
    # a single-seed run inside the sweep measures what a standalone run of that config measures
    alone = run_one("theory", sw.runs[0].cfg.model_dump(mode="json"), 1, {"config_hash": sw.runs[0].key})
    assert alone["summary"]["per_seed"] == json.loads(rows[sw.runs[0].key]["summary"])["per_seed"]


def test_ray_executor_gives_the_same_rows_as_the_local_pool(local_sweep, ray_local, tmp_path):
    sw, outcome = local_sweep
    ray_outcome = runner.run_sweep(sw, folder=tmp_path / "ray", executor="ray")
    assert ray_outcome.executor.startswith("ray (local)")
    assert (ray_outcome.executed, ray_outcome.failed) == (8, [])
    local_rows, ray_rows = rows_by_key(outcome.folder), rows_by_key(tmp_path / "ray")
    assert set(local_rows) == set(ray_rows)
    for key in local_rows:
        assert result_values(ray_rows[key]) == result_values(local_rows[key]), key
        assert ray_rows[key]["run_threads"] == 1


def test_rerun_skips_done_runs(local_sweep):
    sw, outcome = local_sweep
    before = rows_by_key(outcome.folder)
    again = runner.run_sweep(sw, folder=outcome.folder, executor="local")
    assert (again.executed, again.skipped, again.executor) == (0, 8, None)
    after = rows_by_key(outcome.folder)
    assert {k: (r["finished"], r["attempts"]) for k, r in after.items()} == \
        {k: (r["finished"], r["attempts"]) for k, r in before.items()}


def fail_while_marker(marker: str, track: str, cfg_json: dict, threads: int, provenance: dict) -> dict:
    """Raises for (ft_lr 0.01, seed 1) while ``marker`` exists; otherwise the real run."""
    if cfg_json["seeds"] == [1] and cfg_json["finetune"]["ft_lr"] == 0.01 and Path(marker).exists():
        raise RuntimeError("injected failure for seed 1")
    return run_one(track, cfg_json, threads, provenance)


def test_failed_runs_are_recorded_and_do_not_stop_the_sweep_then_retried(tmp_path):
    marker = tmp_path / "fail-seed-1"
    marker.touch()
    # ft_lr = 1e6 makes fine-tuning diverge: the engine rejects that config at run time, every time
    sw = spec.load_sweep(write_sweep(tmp_path, grid={"finetune.ft_lr": [0.01, 1.0e6]}, seeds=[0, 1]))
    flaky = functools.partial(fail_while_marker, str(marker))
    first = runner.run_sweep(sw, folder=tmp_path / "s", executor="local", workers=2, run_fn=flaky)
    assert first.executed == 4
    rows = {(json.loads(r["axes"])["finetune.ft_lr"], r["seed"]): r for r in rows_by_key(tmp_path / "s").values()}
    assert rows[(0.01, 0)]["status"] == "done"
    assert rows[(0.01, 1)]["status"] == "failed" and "injected failure for seed 1" in rows[(0.01, 1)]["error"]
    for seed in (0, 1):
        r = rows[(1.0e6, seed)]
        assert r["status"] == "failed" and "diverged" in r["error"] and "finetune.ft_lr" in r["error"]
        assert r["traceback"] and r["probe.ft_err_single"] is None
    assert sorted(first.failed) == sorted(r["key"] for r in rows.values() if r["status"] == "failed")

    marker.unlink()
    second = runner.run_sweep(sw, folder=tmp_path / "s", executor="local", workers=2, run_fn=flaky)
    assert (second.executed, second.skipped) == (3, 1)
    rows2 = {(json.loads(r["axes"])["finetune.ft_lr"], r["seed"]): r for r in rows_by_key(tmp_path / "s").values()}
    assert len(rows2) == 4
    assert rows2[(0.01, 1)]["status"] == "done" and rows2[(0.01, 1)]["attempts"] == 2
    assert rows2[(0.01, 1)]["error"] is None and rows2[(0.01, 1)]["probe.ft_err_single"] is not None
    assert rows2[(0.01, 0)]["finished"] == rows[(0.01, 0)]["finished"] and rows2[(0.01, 0)]["attempts"] == 1
    assert all(rows2[(1.0e6, s)]["status"] == "failed" and rows2[(1.0e6, s)]["attempts"] == 2 for s in (0, 1))


def test_a_changed_sweep_file_adds_runs_and_keeps_old_rows(tmp_path, ray_local):
    # on Ray, whose workers are already warm; the store logic is the same for both executors
    folder = tmp_path / "grow"
    one = spec.load_sweep(write_sweep(tmp_path, grid={"mrp.mask_ratio": [0.3]}, seeds=[0]))
    runner.run_sweep(one, folder=folder, executor="ray")
    old = rows_by_key(folder)
    two = spec.load_sweep(write_sweep(tmp_path, grid={"mrp.mask_ratio": [0.3, 0.6]}, seeds=[0]))
    outcome = runner.run_sweep(two, folder=folder, executor="ray")
    assert (outcome.executed, outcome.skipped) == (1, 1)
    new = rows_by_key(folder)
    assert len(new) == 2 and all(r["status"] == "done" for r in new.values())
    (key,) = old
    assert new[key]["finished"] == old[key]["finished"]
    # the folder's sweep.yaml is the latest file, with the base inline
    assert "0.6" in (folder / "sweep.yaml").read_text()
    # the key is the PRIMARY KEY: a second row for a run cannot exist
    with sqlite3.connect(folder / DB_NAME) as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO runs (key, status) VALUES (?, 'pending')", (key,))


def test_two_drivers_cannot_share_a_folder(tmp_path):
    sw = spec.load_sweep(write_sweep(tmp_path, base=TINY_BASE, seeds=[0]))
    folder = tmp_path / "locked"
    folder.mkdir()
    from mrplab.errors import MrplabError

    with runner.folder_lock(folder), pytest.raises(MrplabError, match="another `mrplab sweep` is running"):
        runner.run_sweep(sw, folder=folder)


def test_sweep_report_on_the_finished_sweep(local_sweep):
    import csv
    import statistics

    from typer.testing import CliRunner

    from mrplab.cli import app

    _, outcome = local_sweep
    res = CliRunner().invoke(app, ["sweep-report", str(outcome.folder)])
    assert res.exit_code == 0, res.output
    md = (outcome.folder / "report.md").read_text()
    assert "| `mrp.mask_ratio` | `data.mu_test` | n |" in md and "## Claims" in md
    for name in ("lines.png", "heatmap.png"):
        assert (outcome.folder / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    # the aggregates are the mean and std over the two seeds of each setting's rows
    rows = list(rows_by_key(outcome.folder).values())
    with open(outcome.folder / "aggregate.csv", newline="") as fh:
        agg = list(csv.DictReader(fh))
    assert len(agg) == 4
    for a in agg:
        mine = [r for r in rows if r["mrp.mask_ratio"] == float(a["mrp.mask_ratio"])
                and r["data.mu_test"] == float(a["data.mu_test"])]
        assert len(mine) == int(a["n_runs"]) == 2
        for col in ("probe.sl_err", "probe.ft_err_single", "claims_passed"):
            vals = [r[col] for r in mine]
            assert float(a[f"{col}:mean"]) == pytest.approx(statistics.mean(vals), abs=1e-12)
            assert float(a[f"{col}:std"]) == pytest.approx(statistics.stdev(vals), abs=1e-12)


@pytest.mark.parametrize("name", ["mask_ratio", "single_view_fraction", "coverage", "features_per_class", "classes"])
def test_preset_study_metrics_are_columns_of_a_real_store(local_sweep, name):
    from mrplab.sweep import report

    _, outcome = local_sweep
    with Store(outcome.folder / DB_NAME, create=False) as st:
        columns = st.columns
    sw = spec.load_sweep(Path(__file__).resolve().parents[2] / "configs" / "sweeps" / f"{name}.yaml")
    for metric in [*sw.study.metrics, *sw.study.trends]:
        assert report.resolve_metric(metric, columns) in columns
