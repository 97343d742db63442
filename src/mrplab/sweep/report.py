"""``mrplab sweep-report``: aggregate a sweep's store over seeds; tables, figures, the study's sentences.

Writes into the sweep folder:

    report.md           setting table (mean ± std, n), claim pass counts, study sentences, figures, failures
    aggregate.csv       every numeric store column aggregated per setting: mean, std, n
    figures/lines.png   one panel per metric along one axis, a line per value of the other axes, ±std bands
    figures/heatmap.png one panel per metric over two axes (phase diagram), mean over seeds and other axes

A *setting* is one combination of the label columns: the sweep's axes plus
any other config column whose value differs between the finished runs (so
rows from an older version of the sweep file are never merged with new ones).
Aggregates use the finished (``done``) runs; ``std`` is the sample standard
deviation (0 for a single run); missing values (NaN) are left out of a
metric's mean and counted out of its ``n``.
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
from matplotlib.figure import Figure

from mrplab.errors import MrplabError
from mrplab.stats import describe, diff_noise, fmt, md_table
from mrplab.io import atomic_write_text, save_figure
from mrplab.sweep import tracks
from mrplab.sweep.spec import StudySpec, SweepFile, read_sweep_yaml
from mrplab.sweep.store import DB_NAME, Store, config_flat

DPI = 120

LABELS = {k: v for t in tracks.TRACKS.values() for k, v in t.labels.items()}  # store column -> label
_NOT_LABELS = {"seeds", "threads", "name"}


def label(metric: str) -> str:
    return LABELS.get(metric, metric)


# --------------------------------------------------------------------------- numbers


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(float(v)) else None
    return None


@dataclass
class Stat:
    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[Any]) -> "Stat":
        d = describe(x for x in (_num(v) for v in values) if x is not None)
        return cls(d["mean"], d["std"], d["n"])


@dataclass
class Setting:
    labels: dict[str, Any]
    rows: list[dict[str, Any]]
    stats: dict[str, Stat] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.rows)


def _sort_key(v: Any) -> tuple:
    x = _num(v)
    return (0, x, "") if x is not None else (1, 0.0, str(v))


def label_columns(rows: list[dict[str, Any]], axes: list[str], track: tracks.Track = tracks.THEORY) -> list[str]:
    """The sweep's axes, then every other config column of the track that varies over ``rows``."""
    config_columns = set(config_flat(track.config().model_dump(mode="json")))
    cols = [a for a in axes if rows and a in rows[0]]
    for c in rows[0] if rows else []:
        if c in config_columns and c not in _NOT_LABELS and c not in cols:
            if len({json.dumps(r.get(c)) for r in rows}) > 1:
                cols.append(c)
    return cols


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for c in rows[0] if rows else []:
        if c.startswith(("probe.", "claim.", "time.")) or c in ("claims_passed", "wall_s"):
            if any(_num(r.get(c)) is not None for r in rows):
                out.append(c)
    return out


def aggregate(rows: list[dict[str, Any]], labels: list[str], metrics: list[str]) -> list[Setting]:
    """Group ``rows`` by their label values; mean, std and n of every metric per group."""
    groups: dict[str, Setting] = {}
    for r in rows:
        key = json.dumps([r.get(c) for c in labels])
        if key not in groups:
            groups[key] = Setting(labels={c: r.get(c) for c in labels}, rows=[])
        groups[key].rows.append(r)
    settings = sorted(groups.values(), key=lambda s: [_sort_key(s.labels[c]) for c in labels])
    for s in settings:
        s.stats = {m: Stat.of([r.get(m) for r in s.rows]) for m in metrics}
    return settings


def resolve_metric(name: str, columns: list[str]) -> str:
    for cand in (name, f"probe.{name}", f"claim.{name}.pass", f"time.{name}"):
        if cand in columns:
            return cand
    probes = ", ".join(c for c in columns if c.startswith("probe."))
    raise MrplabError(f"study metric '{name}' is not a column of the store",
                      f"use one of: {probes}, claims_passed, claim.<id>.pass|value")


def _fmt(x: Any) -> str:
    return fmt(x, 3)  # sweep reports: three significant digits


# --------------------------------------------------------------------------- the study's sentences


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

    @property
    def diff(self) -> float:
        return self.last.mean - self.first.mean

    @property
    def noise(self) -> float:
        """Two standard errors of the difference of the two means."""
        return diff_noise((self.first.std, self.first.n), (self.last.std, self.last.n))

    @property
    def measured(self) -> str:
        if math.isnan(self.diff):
            return "unmeasured"
        if self.predicted == "flat":
            return "flat" if abs(self.diff) <= self.tolerance else ("increase" if self.diff > 0 else "decrease")
        if abs(self.diff) <= self.noise or self.diff == 0:
            return "flat"
        return "increase" if self.diff > 0 else "decrease"

    @property
    def consistent(self) -> bool:
        return self.measured == self.predicted

    def sentence(self) -> str:
        what = label(self.metric)
        s = (f"Along `{self.x}` from {_fmt(self.x0)} to {_fmt(self.x1)}, {what} (`{self.metric}`) went from "
             f"{_fmt(self.first.mean)} ± {_fmt(self.first.std)} to {_fmt(self.last.mean)} ± {_fmt(self.last.std)} "
             f"(n = {self.first.n} and {self.last.n} runs" + (f", pooled over {self.pooled}" if self.pooled else ""))
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
        else:
            s += f"{'an increase' if self.measured == 'increase' else 'a decrease'} ({change}; noise ±{_fmt(self.noise)}, two standard errors)"
        verdict = "as predicted" if self.consistent else "not as predicted"
        said = {"flat": "no change", "increase": "an increase", "decrease": "a decrease"}[self.predicted]
        return s + f"; the prediction was {said}: {verdict}."


def trend(rows: list[dict[str, Any]], x: str, metric: str, predicted: str, tolerance: float,
          others: list[str] | None = None) -> TrendCheck | None:
    """First vs last value of ``x``: the metric over all runs at each end (runs of ``others`` axes pooled)."""
    xs = sorted({json.dumps(r.get(x)) for r in rows}, key=lambda v: _sort_key(json.loads(v)))
    if len(xs) < 2:
        return None
    x0, x1 = json.loads(xs[0]), json.loads(xs[-1])
    first = Stat.of([r.get(metric) for r in rows if r.get(x) == x0])
    last = Stat.of([r.get(metric) for r in rows if r.get(x) == x1])
    pts = [(_num(r.get(x)), _num(r.get(metric))) for r in rows]
    pts = [(a, b) for a, b in pts if a is not None and b is not None]
    slope = None
    if len({a for a, _ in pts}) >= 2:
        slope = float(np.polyfit([a for a, _ in pts], [b for _, b in pts], 1)[0])
        scale = max(abs(b) for _, b in pts) or 1.0
        if abs(slope) < 1e-12 * scale:  # float noise of a flat line
            slope = 0.0
    pooled = ", ".join(f"`{c}`" for c in others or [])
    return TrendCheck(metric, predicted, x, x0, x1, first, last, slope, tolerance, pooled)


# --------------------------------------------------------------------------- figures


def _save(fig: Figure, path: Path) -> None:
    save_figure(fig, path, DPI)


def _panels(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def line_plot(settings: list[Setting], x: str, labels: list[str], metrics: list[str], path: Path) -> None:
    others = [c for c in labels if c != x]
    xs = sorted({json.dumps(s.labels[x]) for s in settings}, key=lambda v: _sort_key(json.loads(v)))
    x_vals = [json.loads(v) for v in xs]
    numeric = all(_num(v) is not None for v in x_vals)
    pos = {json.dumps(v): (_num(v) if numeric else i) for i, v in enumerate(x_vals)}
    lines: dict[str, list[Setting]] = {}
    for s in settings:
        lines.setdefault(json.dumps([s.labels[c] for c in others]), []).append(s)
    nr, nc = _panels(len(metrics))
    fig = Figure(figsize=(4.6 * nc, 3.4 * nr), layout="constrained")
    axs = fig.subplots(nr, nc, squeeze=False).ravel()
    for ax, m in zip(axs, metrics):
        for key, group in lines.items():
            group = sorted(group, key=lambda s: _sort_key(s.labels[x]))
            px = np.array([pos[json.dumps(s.labels[x])] for s in group], dtype=float)
            mean = np.array([s.stats[m].mean for s in group], dtype=float)
            std = np.array([s.stats[m].std for s in group], dtype=float)
            name = ", ".join(f"{c}={v}" for c, v in zip(others, json.loads(key))) or None
            (ln,) = ax.plot(px, mean, marker="o", label=name)
            ax.fill_between(px, mean - std, mean + std, color=ln.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(label(m), fontsize=9)
        ax.set_xlabel(x)
        if not numeric:
            ax.set_xticks(range(len(x_vals)), [str(v) for v in x_vals])
        ax.grid(alpha=0.3)
    for ax in axs[len(metrics):]:
        ax.set_visible(False)
    if others:
        axs[0].legend(fontsize=7)
    fig.suptitle(f"mean ± std over seeds along {x}", fontsize=10)
    _save(fig, path)


def heatmap(rows: list[dict[str, Any]], a: str, b: str, metrics: list[str], path: Path) -> None:
    """Phase diagram: metric means over the (a, b) grid; runs of other axes are pooled into the cell."""
    va = sorted({json.dumps(r.get(a)) for r in rows}, key=lambda v: _sort_key(json.loads(v)))
    vb = sorted({json.dumps(r.get(b)) for r in rows}, key=lambda v: _sort_key(json.loads(v)))
    nr, nc = _panels(len(metrics))
    fig = Figure(figsize=(4.6 * nc, 3.8 * nr), layout="constrained")
    axs = fig.subplots(nr, nc, squeeze=False).ravel()
    for ax, m in zip(axs, metrics):
        grid = np.full((len(vb), len(va)), np.nan)
        for j, yv in enumerate(vb):
            for i, xv in enumerate(va):
                cell = [r.get(m) for r in rows if json.dumps(r.get(a)) == xv and json.dumps(r.get(b)) == yv]
                grid[j, i] = Stat.of(cell).mean
        im = ax.imshow(np.ma.masked_invalid(grid), origin="lower", aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=ax, shrink=0.85)
        for j in range(len(vb)):
            for i in range(len(va)):
                if not np.isnan(grid[j, i]):
                    bright = im.norm(grid[j, i]) > 0.6  # viridis is light at the top of its range
                    ax.text(i, j, f"{grid[j, i]:.2g}", ha="center", va="center", fontsize=7,
                            color="black" if bright else "white")
        ax.set_xticks(range(len(va)), [str(json.loads(v)) for v in va])
        ax.set_yticks(range(len(vb)), [str(json.loads(v)) for v in vb])
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        ax.set_title(label(m), fontsize=9)
    for ax in axs[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(f"mean over seeds on the {a} x {b} grid", fontsize=10)
    _save(fig, path)


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
    pair = study.heatmap if study and study.heatmap else varied[:2]
    figures = _write_figures(folder / "figures", rows, settings, labels, wanted, x, pair)
    checks: list[TrendCheck] = []
    if study and x is not None:
        for m, t in study.trends.items():
            c = trend(rows, x, resolve_metric(m, columns), t.trend, t.tolerance, [c for c in varied if c != x])
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


def _write_figures(fig_dir: Path, rows, settings, labels, wanted, x, pair) -> list[str]:
    fig_dir.mkdir(exist_ok=True)
    figures: list[str] = []
    if x is not None:
        line_plot(settings, x, labels, wanted, fig_dir / "lines.png")
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
        n_ok = sum(c.consistent for c in checks)
        lines += [f"**Measured.** {n_ok} of {len(checks)} predicted trends hold.", ""]
        lines += [f"- {c.sentence()}" for c in checks] + [""]
    elif x is None:
        lines += ["**Measured.** The sweep has no axis to measure a trend along.", ""]
    else:
        lines += ["**Measured.** No trend was predicted in the study block; see the table.", ""]
    return lines


def _results_lines(settings, labels, wanted) -> list[str]:
    lines = ["## Results", "", "Mean ± std over seeds; n = finished runs of the setting.", ""]
    head = [*(f"`{c}`" for c in labels), "n", *(label(m) for m in wanted)]
    rows = [[*(_fmt(s.labels[c]) for c in labels), s.n,
             *(f"{_fmt(s.stats[m].mean)} ± {_fmt(s.stats[m].std)}" for m in wanted)] for s in settings]
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
