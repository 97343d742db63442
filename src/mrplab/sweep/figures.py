"""A sweep's figures: metrics along one axis (lines with ±std bands) and over two axes (phase diagrams)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from mrplab.io import save_figure
from mrplab.sweep.aggregate import Setting, Stat, label, num, sort_key

DPI = 120


def _save(fig: Figure, path: Path) -> None:
    save_figure(fig, path, DPI)


def _panels(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def line_plot(settings: list[Setting], x: str, labels: list[str], metrics: list[str], path: Path,
              moving: list[str] | None = None) -> None:
    """One panel per metric along ``x``, a line per value of the other ``labels`` (axes in ``moving`` change with
    x, as a zip does: they are named on the x axis, not split into lines); x spanning 20x or more of positive
    values is drawn on a log scale."""
    others = [c for c in labels if c != x and c not in (moving or [])]
    xs = sorted({json.dumps(s.labels[x]) for s in settings}, key=lambda v: sort_key(json.loads(v)))
    x_vals = [json.loads(v) for v in xs]
    numeric = all(num(v) is not None for v in x_vals)
    pos = {json.dumps(v): (num(v) if numeric else i) for i, v in enumerate(x_vals)}
    log_x = numeric and min(pos.values()) > 0 and max(pos.values()) >= 20 * min(pos.values())
    lines: dict[str, list[Setting]] = {}
    for s in settings:
        lines.setdefault(json.dumps([s.labels[c] for c in others]), []).append(s)
    nr, nc = _panels(len(metrics))
    fig = Figure(figsize=(4.6 * nc, 3.4 * nr), layout="constrained")
    axs = fig.subplots(nr, nc, squeeze=False).ravel()
    for ax, m in zip(axs, metrics):
        for key, group in lines.items():
            group = sorted(group, key=lambda s: sort_key(s.labels[x]))
            px = np.array([pos[json.dumps(s.labels[x])] for s in group], dtype=float)
            mean = np.array([s.stats[m].mean for s in group], dtype=float)
            std = np.array([s.stats[m].std for s in group], dtype=float)
            name = ", ".join(f"{c}={v}" for c, v in zip(others, json.loads(key))) or None
            (ln,) = ax.plot(px, mean, marker="o", label=name)
            ax.fill_between(px, mean - std, mean + std, color=ln.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(label(m), fontsize=9)
        ax.set_xlabel(x + (f" (with {', '.join(moving)})" if moving else ""), fontsize=8 if moving else None)
        if log_x:
            ax.set_xscale("log")
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
    va = sorted({json.dumps(r.get(a)) for r in rows}, key=lambda v: sort_key(json.loads(v)))
    vb = sorted({json.dumps(r.get(b)) for r in rows}, key=lambda v: sort_key(json.loads(v)))
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
