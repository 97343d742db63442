"""``mrplab sweep-report``: aggregate a sweep's store over seeds; tables, figures, the study's sentences.

Writes into the sweep folder:

    report.md           setting table (mean ± std, n), claim pass counts, study sentences, figures, failures
    aggregate.csv       every numeric store column aggregated per setting: mean, std, n
    figures/lines.png   one panel per metric along one axis, a line per value of the other axes, ±std bands
    figures/heatmap.png one panel per metric over two axes (phase diagram), mean over seeds and other axes

Settings and their aggregates (sweep/aggregate.py) use the finished (``done``) runs; the
figures are drawn by sweep/figures.py.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrplab.errors import MrplabError
from mrplab.stats import diff_noise, fmt, md_table
from mrplab.io import atomic_write_text
from mrplab.sweep import tracks
from mrplab.sweep.spec import StudySpec, SweepFile, read_sweep_yaml
from mrplab.sweep.aggregate import (Setting, Stat, aggregate, label, label_columns, metric_columns, num, resolve_metric,
                                    sort_key)
from mrplab.sweep.figures import heatmap, line_plot
from mrplab.sweep.store import DB_NAME, Store

def _fmt(x: Any) -> str:
    return fmt(x, 3)  # sweep reports: three significant digits


# --------------------------------------------------------------------------- the study's sentences


def _pm(st: Stat) -> str:
    """mean ± sample std, or the mean alone for one run (its spread is not measured)."""
    return f"{_fmt(st.mean)} ± {_fmt(st.std)}" if st.n >= 2 else _fmt(st.mean)


@dataclass
class TrendCheck:
    metric: str
    predicted: str
    x: str
    x0: Any
    x1: Any
    first: Stat
    last: Stat
    slope: float | None
    tolerance: float
    pooled: str = ""  # the other axes whose runs are pooled at each x
    path: list[tuple[Any, Stat]] = field(default_factory=list)  # the metric at every x, in order
    moving: str = ""  # axes zipped with x (they change with it)

    @property
    def diff(self) -> float:
        return self.last.mean - self.first.mean

    @property
    def noise_known(self) -> bool:
        """Both ends have two or more runs: the noise of their difference can be estimated."""
        return self.first.n >= 2 and self.last.n >= 2

    @property
    def noise(self) -> float:
        """Two standard errors of the difference of the two means (nan when an end has one run)."""
        if not self.noise_known:
            return math.nan
        return diff_noise((self.first.std, self.first.n), (self.last.std, self.last.n))

    @property
    def measured(self) -> str:
        if math.isnan(self.diff):
            return "unmeasured"
        if self.predicted == "flat":
            return "flat" if abs(self.diff) <= self.tolerance else ("increase" if self.diff > 0 else "decrease")
        if self.diff == 0 or (self.noise_known and abs(self.diff) <= self.noise):
            return "flat"
        return "increase" if self.diff > 0 else "decrease"

    @property
    def reversals(self) -> list[tuple[Any, Any, float]]:
        """Adjacent x values between which the metric moved against the predicted direction: (from, to, change),
        beyond the two-standard-error noise of that step (any amount when a point has one run)."""
        if self.predicted == "flat":
            return []
        sign = 1.0 if self.predicted == "increase" else -1.0
        out = []
        for (xa, a), (xb, b) in zip(self.path, self.path[1:]):
            step = b.mean - a.mean
            if math.isnan(step) or sign * step >= 0:
                continue
            known = a.n >= 2 and b.n >= 2
            if not known or abs(step) > diff_noise((a.std, a.n), (b.std, b.n)):
                out.append((xa, xb, step))
        return out

    @property
    def direction_only(self) -> bool:
        """The predicted direction, monotone, but an end has one run: not established against noise."""
        return (self.predicted != "flat" and not self.noise_known and self.measured == self.predicted
                and not self.reversals)

    @property
    def consistent(self) -> bool:
        return self.measured == self.predicted and not self.reversals and not self.direction_only

    def sentence(self) -> str:
        what = label(self.metric)
        s = (f"Along `{self.x}` from {_fmt(self.x0)} to {_fmt(self.x1)}, {what} (`{self.metric}`) went from "
             f"{_pm(self.first)} to {_pm(self.last)} "
             f"(n = {self.first.n} and {self.last.n} runs" + (f", pooled over {self.pooled}" if self.pooled else "")
             + (f", {self.moving} changing with it" if self.moving else ""))
        if self.slope is not None:
            s += f"; least-squares slope {_fmt(self.slope)} per unit of `{self.x}`"
        s += "): "
        if self.measured == "unmeasured":
            return s + "not measured (no finite values)."
        change = f"a change of {self.diff:+.3g}"
        if self.predicted == "flat":
            bound = f"within ±{_fmt(self.tolerance)}" if self.measured == "flat" else f"beyond ±{_fmt(self.tolerance)}"
            s += f"{change}, {bound}"
        elif self.measured == "flat":
            s += f"{change}, within the noise (±{_fmt(self.noise)}, two standard errors)"
        elif not self.noise_known:
            s += (f"{'an increase' if self.measured == 'increase' else 'a decrease'} ({change}; noise not "
                  "estimated: one run at an end)")
        else:
            s += f"{'an increase' if self.measured == 'increase' else 'a decrease'} ({change}; noise ±{_fmt(self.noise)}, two standard errors)"
        if self.reversals:
            s += "; not monotone: " + ", ".join(
                f"from {_fmt(a)} to {_fmt(b)} it moved {step:+.3g}" for a, b, step in self.reversals)
            peak = max(self.path, key=lambda p: p[1].mean)  # predicted at the first (decrease) or last (increase) x
            s += f" (largest at {_fmt(peak[0])}: {_fmt(peak[1].mean)})"
        said = {"flat": "no change", "increase": "an increase", "decrease": "a decrease"}[self.predicted]
        if self.direction_only:
            return s + f"; the prediction was {said}: in the predicted direction, not established (one seed)."
        return s + f"; the prediction was {said}: {'as predicted' if self.consistent else 'not as predicted'}."


def trend(rows: list[dict[str, Any]], x: str, metric: str, predicted: str, tolerance: float,
          others: list[str] | None = None, moving: list[str] | None = None) -> TrendCheck | None:
    """First vs last value of ``x``: the metric over all runs at each end (runs of ``others`` axes pooled), and
    every value between (a predicted increase or decrease must not reverse beyond noise on the way)."""
    xs = [json.loads(v) for v in sorted({json.dumps(r.get(x)) for r in rows}, key=lambda v: sort_key(json.loads(v)))]
    if len(xs) < 2:
        return None
    path = [(xv, Stat.of([r.get(metric) for r in rows if r.get(x) == xv])) for xv in xs]
    x0, x1 = xs[0], xs[-1]
    first, last = path[0][1], path[-1][1]
    pts = [(num(r.get(x)), num(r.get(metric))) for r in rows]
    pts = [(a, b) for a, b in pts if a is not None and b is not None]
    slope = None
    if len({a for a, _ in pts}) >= 2:
        slope = float(np.polyfit([a for a, _ in pts], [b for _, b in pts], 1)[0])
        scale = max(abs(b) for _, b in pts) or 1.0
        if abs(slope) < 1e-12 * scale:  # float noise of a flat line
            slope = 0.0
    pooled = ", ".join(f"`{c}`" for c in others or [])
    return TrendCheck(metric, predicted, x, x0, x1, first, last, slope, tolerance, pooled, path,
                      ", ".join(f"`{c}`" for c in moving or []))


# --------------------------------------------------------------------------- the report


@dataclass
class SweepReport:
    folder: Path
    report: Path
    settings: list[Setting]
    labels: list[str]
    metrics: list[str]
    figures: list[str]
    trends: list[TrendCheck]


def _read_spec(folder: Path) -> SweepFile | None:
    path = folder / "sweep.yaml"
    if not path.is_file():
        return None
    try:
        return SweepFile.model_validate(read_sweep_yaml(path))
    except Exception:  # noqa: BLE001 - an unreadable copy only loses the axis order and the study
        return None


def _csv(settings: list[Setting], labels: list[str], metrics: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*labels, "n_runs", *(f"{m}:{s}" for m in metrics for s in ("mean", "std", "n"))])
    for s in settings:
        cells: list[Any] = [s.labels[c] for c in labels] + [s.n]
        for m in metrics:
            st = s.stats[m]
            cells += ["" if math.isnan(st.mean) else repr(st.mean), "" if math.isnan(st.std) else repr(st.std), st.n]
        w.writerow(cells)
    return buf.getvalue()


def write_report(folder: str | Path) -> SweepReport:
    folder = Path(folder)
    db = folder / DB_NAME
    if not db.is_file():
        raise MrplabError(f"{folder} holds no {DB_NAME}", "give the sweep folder that `mrplab sweep` wrote")
    with Store(db, create=False) as store:
        counts = store.counts()
        rows = store.rows("done")
        failed = store.rows("failed")
        columns = store.columns
    if not rows:
        raise MrplabError(f"no finished runs in {folder} ({counts['pending'] + counts['running']} pending, "
                          f"{counts['failed']} failed)", "run `mrplab sweep` on its sweep file first")
    spec = _read_spec(folder)
    study: StudySpec | None = spec.study if spec else None
    axes = [*spec.grid, *spec.zip] if spec else []
    track = tracks.get(spec.track) if spec else tracks.THEORY
    labels = label_columns(rows, axes, track)
    all_metrics = metric_columns(rows)
    wanted = [resolve_metric(m, columns) for m in study.metrics] if study and study.metrics else \
        [m for m in track.default_metrics if m in all_metrics]
    settings = aggregate(rows, labels, [*all_metrics, *(m for m in wanted if m not in all_metrics)])

    varied = [c for c in labels if len({json.dumps(r.get(c)) for r in rows}) > 1]  # axes with 2+ values
    x = study.x if study and study.x in labels else (varied or labels or [None])[0]
    moving = [c for c in varied if c != x and x is not None and tied(rows, x, c)]  # zipped with x: not a line each
    pair = study.heatmap if study and study.heatmap else [c for c in varied if c not in moving][:2]
    if len(pair) == 2 and tied(rows, pair[0], pair[1]):
        pair = []  # one value of b per value of a: a diagonal, not a phase diagram
    figures = _write_figures(folder / "figures", rows, settings, [c for c in labels if c not in moving], wanted, x,
                             pair, moving)
    checks: list[TrendCheck] = []
    if study and x is not None:
        for m, t in study.trends.items():
            c = trend(rows, x, resolve_metric(m, columns), t.trend, t.tolerance,
                      [c for c in varied if c != x and c not in moving], moving)
            if c is not None:
                checks.append(c)

    lines = _head_lines(spec, folder, counts, settings, labels) + _study_lines(study, checks, x)
    lines += _results_lines(settings, labels, wanted) + _claims_lines(settings, labels, all_metrics)
    lines += _figure_lines(figures, labels, x, pair) + _failed_lines(failed)
    lines += ["", "All aggregates, for every numeric column of the store: `aggregate.csv`.", ""]
    atomic_write_text(folder / "aggregate.csv", _csv(settings, labels, all_metrics))
    report = folder / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return SweepReport(folder=folder, report=report, settings=settings, labels=labels, metrics=wanted,
                       figures=figures, trends=checks)


def tied(rows: list[dict[str, Any]], a: str, b: str) -> bool:
    """Axis ``b`` moves with ``a`` (a zip): every value of ``a`` comes with one value of ``b``."""
    seen: dict[str, set[str]] = {}
    for r in rows:
        seen.setdefault(json.dumps(r.get(a)), set()).add(json.dumps(r.get(b)))
    return all(len(v) == 1 for v in seen.values())


def _write_figures(fig_dir: Path, rows, settings, labels, wanted, x, pair, moving=()) -> list[str]:
    fig_dir.mkdir(exist_ok=True)
    figures: list[str] = []
    if x is not None:
        line_plot(settings, x, labels, wanted, fig_dir / "lines.png", list(moving))
        figures.append("lines.png")
    if len(pair) == 2 and all(p in labels for p in pair):
        heatmap(rows, pair[0], pair[1], wanted, fig_dir / "heatmap.png")
        figures.append("heatmap.png")
    for stale in {"lines.png", "heatmap.png"} - set(figures):  # from an earlier report of this folder
        (fig_dir / stale).unlink(missing_ok=True)
    return figures


def _head_lines(spec, folder: Path, counts: dict, settings, labels) -> list[str]:
    name = spec.name if spec else folder.name
    lines = [f"# Sweep `{name}`", ""]
    if spec and spec.description:
        lines += [spec.description, ""]
    return lines + [
        f"- runs: {counts['done']} done, {counts['failed']} failed, {counts['pending'] + counts['running']} not run "
        f"(store: `{DB_NAME}`)",
        f"- settings: {len(settings)}; seeds per setting: "
        + ", ".join(sorted({str(s.n) for s in settings}, key=int)),
        f"- axes: {', '.join(f'`{c}`' for c in labels) or 'none (seeds only)'}",
        "",
    ]


def _study_lines(study, checks: list[TrendCheck], x) -> list[str]:
    if not study:
        return []
    lines = ["## Study", "", f"**Prediction.** {study.prediction.strip()}", ""]
    if checks:
        n_ok, n_dir = sum(c.consistent for c in checks), sum(c.direction_only for c in checks)
        more = f"; {n_dir} more in direction only (one seed: not established against noise)" if n_dir else ""
        lines += [f"**Measured.** {n_ok} of {len(checks)} predicted trends hold{more}.", ""]
        lines += [f"- {c.sentence()}" for c in checks] + [""]
    elif x is None:
        lines += ["**Measured.** The sweep has no axis to measure a trend along.", ""]
    else:
        lines += ["**Measured.** No trend was predicted in the study block; see the table.", ""]
    return lines


def _results_lines(settings, labels, wanted) -> list[str]:
    lines = ["## Results", "", "Mean ± sample std over seeds (the mean alone where a setting has one run); n = "
             "finished runs of the setting.", ""]
    head = [*(f"`{c}`" for c in labels), "n", *(label(m) for m in wanted)]
    rows = [[*(_fmt(s.labels[c]) for c in labels), s.n,
             *(_pm(s.stats[m]) for m in wanted)] for s in settings]
    return lines + md_table(head, rows)


def _claims_lines(settings, labels, all_metrics) -> list[str]:
    claim_ids = [c[len("claim."):-len(".pass")] for c in all_metrics if c.startswith("claim.") and c.endswith(".pass")]
    if not claim_ids:
        return []
    lines = ["", "## Claims", "", "Runs whose verdict is PASS, out of the finished runs of the setting where the claim "
             "applies (N/A runs left out) (each run is one seed; the claims are listed in src/mrplab/theory/claims.py).",
             ""]
    head = [*(f"`{c}`" for c in labels), *claim_ids]
    rows = []
    for s in settings:
        passed = [s.stats[f"claim.{cid}.pass"] for cid in claim_ids]
        rows.append([*(_fmt(s.labels[c]) for c in labels),
                     *(f"{round(st.mean * st.n) if st.n else 0}/{st.n}" for st in passed)])
    return lines + md_table(head, rows)


def _figure_lines(figures: list[str], labels, x, pair) -> list[str]:
    if not figures:
        return []
    lines = ["", "## Figures", ""]
    for f in figures:
        if f == "lines.png":
            caption = f"Mean ± std over seeds along `{x}`" + (
                ", one line per value of the other axes." if len(labels) > 1 else ".")
        else:
            caption = f"Phase diagram over `{pair[0]}` x `{pair[1]}`: mean over seeds" + (
                " and the other axes." if len(labels) > 2 else ".")
        lines += [f"![{f}](figures/{f})", "", caption, ""]
    return lines


def _failed_lines(failed: list[dict]) -> list[str]:
    if not failed:
        return []
    rows = [(r["key"], r.get("axes") or "", r.get("seed"), r.get("attempts"), (r.get("error") or "")[:300])
            for r in failed]
    return ["", "## Failed runs", "", *md_table(("key", "axes", "seed", "attempts", "error"), rows)]
