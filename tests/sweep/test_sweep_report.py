"""sweep-report: aggregates over seeds match a hand computation; figures; the study's sentences follow the numbers."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mrplab.cli import app
from mrplab.sweep import report, spec, tracks
from mrplab.sweep.store import DB_NAME, Store

from tests.sweep.helpers import TINY_BASE

PNG = b"\x89PNG\r\n\x1a\n"
XS = [0.1, 0.5, 0.9]
LS = [2, 3]
SEEDS = [0, 1, 2]
FAILED = (0.5, 2, 2)  # (mask ratio, L, seed) of the one run that failed


def ft_err(x: float, L: int, s: int) -> float:
    return 0.5 - 0.4 * x + 0.1 * (L == 3) + 0.013 * s * s  # falls with x; seeds spread it


def captured(x: float, L: int, s: int) -> float:
    return 0.2 + 0.8 * x - 0.05 * s


def fake_summary(x: float, L: int, s: int) -> dict:
    c1 = x > 0.4
    return {
        "per_seed": [{"seed": s, "ft_err_single": ft_err(x, L, s), "mrp_captured_share": captured(x, L, s),
                      "sl_err": 0.3 + 0.001 * s, "sl_winner_per_class": [0, 1]}],
        "verdicts": [{"id": "C1", "verdict": "PASS" if c1 else "FAIL", "value": captured(x, L, s)},
                     {"id": "C6", "verdict": "PASS", "value": 0.2}],
        "timings": {"total_s": 1.0 + s},
        "claims_passed": 1 + int(c1),
        "claims_total": 2,
    }


def make_store(folder: Path, trends: dict) -> spec.Sweep:
    base = {**TINY_BASE, "data": {**TINY_BASE["data"], "P": 8}}
    sw = spec.from_mapping({
        "name": "synthetic", "base": base, "grid": {"mrp.mask_ratio": XS, "data.L": LS}, "seeds": SEEDS,
        "study": {"prediction": "More masking makes fine-tuning better.", "x": "mrp.mask_ratio",
                  "metrics": ["ft_err_single", "probe.mrp_captured_share", "claims_passed"],
                  "trends": trends, "heatmap": ["mrp.mask_ratio", "data.L"]},
    })
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.yaml").write_text(sw.to_yaml())
    with Store(folder / DB_NAME) as st:
        st.plan(sw.name, sw.runs)
        for r in sw.runs:
            x, L = r.axes["mrp.mask_ratio"], r.axes["data.L"]
            if (x, L, r.seed) == FAILED:
                st.finish(r.key, {"ok": False, "error": "MrplabError: fine-tuning diverged", "started": "t0",
                                  "finished": "t1"})
            else:
                summary = fake_summary(x, L, r.seed)
                st.finish(r.key, {"ok": True, "summary": summary, "columns": tracks.THEORY.columns(summary),
                                  "started": "t0", "finished": "t1", "wall_s": 1.0, "threads": 1})
    return sw


TRENDS = {"ft_err_single": "decrease", "probe.mrp_captured_share": "increase",
          "sl_err": {"trend": "flat", "tolerance": 0.01}}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_aggregates_match_a_hand_computation(tmp_path):
    make_store(tmp_path, TRENDS)
    rep = report.write_report(tmp_path)
    assert rep.labels == ["mrp.mask_ratio", "data.L"]
    assert rep.metrics == ["probe.ft_err_single", "probe.mrp_captured_share", "claims_passed"]
    rows = read_csv(tmp_path / "aggregate.csv")
    assert len(rows) == len(XS) * len(LS)
    for row in rows:
        x, L = float(row["mrp.mask_ratio"]), int(row["data.L"])
        seeds = [s for s in SEEDS if (x, L, s) != FAILED]  # a failed run is not aggregated
        vals = [ft_err(x, L, s) for s in seeds]
        assert int(row["n_runs"]) == len(seeds)
        assert float(row["probe.ft_err_single:mean"]) == pytest.approx(statistics.mean(vals), abs=1e-12)
        assert float(row["probe.ft_err_single:std"]) == pytest.approx(statistics.stdev(vals), abs=1e-12)
        assert int(row["probe.ft_err_single:n"]) == len(seeds)
        passes = [int(x > 0.4) for _ in seeds]
        assert float(row["claim.C1.pass:mean"]) == pytest.approx(statistics.mean(passes))
    md = (tmp_path / "report.md").read_text()
    # the results table: one line per setting with mean ± std as the report formats it
    v = [ft_err(0.1, 3, s) for s in SEEDS]
    assert f"| 0.1 | 3 | 3 | {statistics.mean(v):.3g} ± {statistics.stdev(v):.3g} |" in md
    assert "| 0.5 | 2 | 2 |" in md  # the failed seed is left out of n
    # claim pass counts per setting
    assert "| 0.1 | 2 | 0/3 | 3/3 |" in md and "| 0.9 | 3 | 3/3 | 3/3 |" in md
    assert "## Failed runs" in md and "fine-tuning diverged" in md
    for name in ("lines.png", "heatmap.png"):
        data = (tmp_path / "figures" / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5000
        assert f"](figures/{name})" in md


def test_study_sentences_are_generated_from_the_numbers(tmp_path):
    make_store(tmp_path, TRENDS)
    rep = report.write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "**Prediction.** More masking makes fine-tuning better." in md
    assert "**Measured.** 3 of 3 predicted trends hold." in md
    check = {c.metric: c for c in rep.trends}
    c = check["probe.ft_err_single"]
    first = [ft_err(0.1, L, s) for L in LS for s in SEEDS]
    last = [ft_err(0.9, L, s) for L in LS for s in SEEDS]
    assert c.first.mean == pytest.approx(statistics.mean(first)) and c.last.mean == pytest.approx(statistics.mean(last))
    assert (c.first.n, c.last.n) == (6, 6)
    assert c.slope == pytest.approx(-0.4, abs=1e-9)  # the slope that generated the data
    assert (c.measured, c.consistent) == ("decrease", True)
    assert f"from {statistics.mean(first):.3g} ± {statistics.stdev(first):.3g} to {statistics.mean(last):.3g}" in md
    assert check["probe.sl_err"].measured == "flat"  # +0.001 per seed only: within the tolerance

    # the same numbers against the opposite prediction: the report says so
    make_store(tmp_path / "flipped", {**TRENDS, "ft_err_single": "increase"})
    report.write_report(tmp_path / "flipped")
    md2 = (tmp_path / "flipped" / "report.md").read_text()
    assert "**Measured.** 2 of 3 predicted trends hold." in md2
    assert "the prediction was an increase: not as predicted." in md2


def test_noise_decides_whether_a_change_counts():
    rows = [{"x": x, "m": m} for x, m in [(0, 1.0), (0, 3.0), (1, 1.5), (1, 3.5)]]  # +0.5, std 1.41 each side
    c = report.trend(rows, "x", "m", "increase", 0.05)
    assert c.diff == pytest.approx(0.5) and c.measured == "flat" and not c.consistent
    rows = [{"x": x, "m": m} for x, m in [(0, 1.0), (0, 1.1), (1, 2.0), (1, 2.1)]]
    assert report.trend(rows, "x", "m", "increase", 0.05).consistent


def test_a_predicted_trend_must_not_reverse_on_the_way():
    """Ends alone would call 3 -> 5 -> 4 an increase; the path reverses beyond noise between 0.5 and 1, so
    the prediction does not hold. A dip within the noise of that step does not count against it."""
    pts = [(0, 3.0), (0, 3.1), (0.5, 5.0), (0.5, 5.1), (1, 4.0), (1, 4.1)]
    c = report.trend([{"x": x, "m": m} for x, m in pts], "x", "m", "increase", 0.05)
    assert c.measured == "increase" and [(a, b) for a, b, _ in c.reversals] == [(0.5, 1)] and not c.consistent
    assert "not monotone: from 0.5 to 1 it moved -1 (largest at 0.5: 5.05)" in c.sentence()
    assert c.sentence().endswith("not as predicted.")
    noisy = [(0, 3.0), (0, 3.1), (0.5, 5.0), (0.5, 7.0), (1, 5.5), (1, 5.6)]  # 6.0 -> 5.55, noise 1.4
    c = report.trend([{"x": x, "m": m} for x, m in noisy], "x", "m", "increase", 0.05)
    assert c.reversals == [] and c.consistent


def test_one_seed_gives_a_direction_never_an_established_trend():
    """With one run per end there is no noise estimate: a monotone change in the predicted direction is
    reported as direction only (not counted as holding), a reversal of any size still counts against it."""
    c = report.trend([{"x": x, "m": m} for x, m in [(0, 0.12), (1, 0.10), (2, 0.07)]], "x", "m", "decrease", 0.05)
    assert c.direction_only and not c.consistent and math.isnan(c.noise)
    assert "noise not estimated: one run at an end" in c.sentence()
    assert c.sentence().endswith("in the predicted direction, not established (one seed).")
    c = report.trend([{"x": x, "m": m} for x, m in [(0, 0.118), (1, 0.142), (2, 0.067)]], "x", "m", "decrease", 0.05)
    assert not c.direction_only and not c.consistent and "(largest at 1: 0.142)" in c.sentence()


def test_an_axis_zipped_with_x_moves_with_it_and_splits_nothing(tmp_path, monkeypatch):
    """A zip (labels.fraction with its epochs menu) is one axis: no line per menu, no diagonal heatmap, and the
    sentence says the menu changes with x instead of claiming the runs were pooled over it."""
    from mrplab.sweep.aggregate import aggregate

    zipped = [{"f": f, "menu": menu, "m": m} for f, menu, m in [(0.01, "[30, 100]", 0.12), (0.1, "[10, 30]", 0.14),
                                                                 (1.0, "[8, 16]", 0.07)]]
    assert report.tied(zipped, "f", "menu") and report.tied(zipped, "menu", "f")
    grid = [{"f": f, "menu": menu, "m": 0.1} for f in (0.01, 1.0) for menu in ("a", "b")]
    assert not report.tied(grid, "f", "menu")
    c = report.trend(zipped, "f", "m", "decrease", 0.05, [], ["menu"])
    assert "`menu` changing with it" in c.sentence() and "pooled" not in c.sentence()
    settings = aggregate(zipped, ["f", "menu"], ["m"])
    from mrplab.sweep import figures

    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig))
    figures.line_plot(settings, "f", ["f", "menu"], ["m"], tmp_path / "split.png")
    figures.line_plot(settings, "f", ["f"], ["m"], tmp_path / "one.png", ["menu"])
    split, one = (fig.axes[0] for fig in drawn)
    assert len(split.lines) == 3 and len(one.lines) == 1 and len(one.lines[0].get_xdata()) == 3
    assert one.get_xscale() == "log" and "with menu" in one.get_xlabel()


def test_sweep_report_cli_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(app, ["sweep-report", str(tmp_path)])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    sw_folder = tmp_path / "s"
    make_store(sw_folder, TRENDS)
    doc = yaml.safe_load((sw_folder / "sweep.yaml").read_text())
    doc["study"]["metrics"] = ["no_such_metric"]
    (sw_folder / "sweep.yaml").write_text(yaml.safe_dump(doc))
    res = CliRunner().invoke(app, ["sweep-report", str(sw_folder)])
    assert res.exit_code == 2 and "study metric 'no_such_metric'" in res.stderr
