"""Figures of one theory run (matplotlib, Agg; no pyplot state).

* ``capture.png``  capture matrix C[r, (i, l)] = <w_r, v_{i,l}> of the final
  kernels of seed 0: SL, MRP and MRP -> FT side by side, one colour scale
  (saturating at twice the threshold); cells at or above the capture
  threshold are outlined.
* ``phi.png``      Phi_{i,l} = max_r C[r, i, l] over training for SL and MRP
  (seed 0), one line per feature, the capture threshold dashed.
* ``accuracy.png`` test accuracy on multi-view and single-view data, SL versus
  MRP -> FT, mean with std error bars over seeds.
* ``loss.png``     training loss of every phase, mean over seeds.

Each function takes a ``TheoryResult`` and a path and writes one PNG
atomically (temp file, then rename).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from mrplab.io import save_figure
from mrplab.stats import mean_std
from mrplab.theory import probes
from mrplab.theory.experiment import TheoryResult

DPI = 120


def _save(fig: Figure, path: Path) -> None:
    save_figure(fig, path, DPI, tight=False)  # every figure here lays itself out (constrained): no second draw


def _class_colours(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    if n <= 20:
        return [cmap(i) for i in range(n)]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


_FEATURE_STYLES = ["-", (0, (1, 1)), "-.", (0, (3, 1, 1, 1, 1, 1))]  # dashed "--" is kept for the threshold


# --------------------------------------------------------------------------- capture heatmaps


def capture_heatmaps(result: TheoryResult, path: Path, seed_index: int = 0) -> None:
    cfg, bank = result.cfg, result.data.bank
    thr = cfg.capture_threshold
    m, k_total, L = cfg.net.m, bank.k_total, bank.L
    panels = [("SL from scratch", result.W_sl), ("MRP (pretrained)", result.W_mrp), ("MRP -> FT", result.W_ft)]
    with torch.no_grad():
        mats = [
            probes.capture_matrix(W[seed_index : seed_index + 1], bank)[0].reshape(W.shape[-1], -1).cpu().numpy()
            for _, W in panels
        ]  # each [K, k_total * L]
    # one colour scale for all panels, saturating at twice the threshold so that sub-threshold
    # structure stays visible; magnitudes over training are in phi.png
    vmax = min(max(float(np.abs(M).max()) for M in mats), 2.0 * thr)
    vmax = max(vmax, thr * 1.05, 1e-12)
    K, F = mats[0].shape
    width = max(3.2, 0.16 * F + 1.0)
    height = max(3.5, 0.11 * K + 1.5)
    fig = Figure(figsize=(3 * width + 1.2, height), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    hidden = (~bank.covered).reshape(-1).cpu().numpy()  # [F] features the pretraining data does not show
    im = None
    for ax, (title, _), M in zip(axes, panels, mats):
        im = ax.imshow(M, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
        rr, cc = np.nonzero(M >= thr)
        ax.scatter(cc, rr, marker="s", s=28, facecolors="none", edgecolors="black", linewidths=0.9)
        n_cap = int((M.max(0) >= thr).sum())
        ax.set_title(f"{title}\n{n_cap}/{F} features captured", fontsize=9)
        for i in range(1, k_total):
            ax.axvline(i * L - 0.5, color="0.6", lw=0.5)
        for i in range(1, K // m):
            ax.axhline(i * m - 0.5, color="0.6", lw=0.5)
        if bank.k < k_total:
            ax.axvline(bank.k * L - 0.5, color="black", lw=1.2)
        for f in np.nonzero(hidden)[0]:
            ax.axvspan(f - 0.5, f + 0.5, ymin=0.985, ymax=1.0, color="0.3")
        step = max(1, k_total // 10)
        ax.set_xticks([i * L + (L - 1) / 2 for i in range(0, k_total, step)])
        ax.set_xticklabels([str(i) for i in range(0, k_total, step)], fontsize=7)
        ax.set_xlabel("feature v_{i,l} (grouped by class i)", fontsize=8)
    kstep = max(1, (K // m) // 10)
    axes[0].set_yticks([i * m + (m - 1) / 2 for i in range(0, K // m, kstep)])
    axes[0].set_yticklabels([str(i) for i in range(0, K // m, kstep)], fontsize=7)
    axes[0].set_ylabel(f"kernel w_r (grouped by class, {m} per class)", fontsize=8)
    note = f"seed {cfg.seeds[seed_index]}; squares: C >= capture threshold {thr:.3g}"
    if hidden.any():
        note += "; dark ticks on top: features hidden from pretraining"
    if bank.k < k_total:
        note += "; right of the black line: pretraining-only classes"
    fig.suptitle("Capture matrix C[r, (i, l)] = <w_r, v_{i,l}>", fontsize=10)
    fig.supxlabel(note, fontsize=8)
    fig.colorbar(im, ax=list(axes), shrink=0.8, extend="both", label="<w_r, v_{i,l}> (clipped at 2x threshold)")
    _save(fig, path)


# --------------------------------------------------------------------------- Phi over training


def phi_curves(result: TheoryResult, path: Path, seed_index: int = 0) -> None:
    cfg, bank = result.cfg, result.data.bank
    thr = cfg.capture_threshold
    k_total, L = bank.k_total, bank.L
    colours = _class_colours(k_total)
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, phase, title in zip(axes, ("sl", "mrp"), ("SL from scratch", "MRP")):
        recs = result.history.get(phase, [])
        if not recs:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(title)
            continue
        steps = [r["step"] for r in recs]
        phi = np.array([r["phi"][seed_index] for r in recs], dtype=float)  # [T, k_total, L]
        for i in range(k_total):
            for l in range(L):
                ax.plot(steps, phi[:, i, l], color=colours[i], ls=_FEATURE_STYLES[l % len(_FEATURE_STYLES)], lw=1.1,
                        alpha=0.9)
        ax.axhline(thr, color="black", ls="--", lw=1.3, label=f"capture threshold {thr:.3g}")
        n_cap = int((phi[-1] >= thr).sum())
        ax.set_title(f"{title}: {n_cap}/{k_total * L} captured at step {steps[-1]}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Phi_{i,l} = max_r <w_r, v_{i,l}>")
    handles = [axes[1].lines[-1]] if axes[1].lines else []
    if k_total <= 10:
        from matplotlib.lines import Line2D

        handles += [Line2D([], [], color=colours[i], label=f"class {i}") for i in range(k_total)]
        handles += [Line2D([], [], color="0.4", ls=_FEATURE_STYLES[l % 4], label=f"l = {l}") for l in range(min(L, 4))]
    if handles:
        fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(f"Feature capture over training (seed {cfg.seeds[seed_index]})", fontsize=11)
    _save(fig, path)


# --------------------------------------------------------------------------- per-view accuracy


def accuracy_bars(result: TheoryResult, path: Path) -> None:
    per_seed = result.per_seed
    groups = [("multi-view", "multi"), ("single-view", "single")]
    models = [("SL from scratch", "sl", "tab:gray"), ("MRP -> FT", "ft", "tab:blue")]
    fig = Figure(figsize=(6, 4.4), layout="constrained")
    ax = fig.subplots()
    width = 0.36
    x = np.arange(len(groups))
    for j, (label, key, colour) in enumerate(models):
        stats = [mean_std([1.0 - m[f"{key}_err_{view}"] for m in per_seed]) for _, view in groups]
        means = np.array([s[0] for s in stats])
        stds = np.array([s[1] for s in stats])
        pos = x + (j - 0.5) * width
        ax.bar(pos, np.nan_to_num(means), width, yerr=np.nan_to_num(stds), capsize=4, color=colour, label=label)
        for p, mu, sd in zip(pos, means, np.nan_to_num(stds)):
            ax.text(p, (0.0 if math.isnan(mu) else mu + sd) + 0.02, "n/a" if math.isnan(mu) else f"{mu:.3f}",
                    ha="center", va="bottom", fontsize=8)
    k = result.cfg.data.k
    ax.axhline(1.0 / k, color="0.3", ls=":", lw=1, label=f"chance 1/k = {1.0 / k:.2f}")
    ax.set_xticks(x)
    ax.set_xticklabels([g for g, _ in groups])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Test accuracy by view (mean ± std over {len(per_seed)} seeds)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=3, bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


# --------------------------------------------------------------------------- losses


def loss_curves(result: TheoryResult, path: Path) -> None:
    names = {"sl": "SL from scratch", "mrp": "MRP", "lp": "linear probe", "ft": "fine-tuning"}
    phases = [p for p in ("sl", "mrp", "lp", "ft") if result.history.get(p)]
    fig = Figure(figsize=(3.2 * max(len(phases), 1) + 0.5, 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(phases), 1)))
    for ax, phase in zip(axes, phases):
        recs = result.history[phase]
        steps = [r["step"] for r in recs]
        loss = np.array([r["loss"] for r in recs], dtype=float)  # [T, R]
        mean = np.nanmean(loss, axis=1) if loss.ndim == 2 else loss
        ax.plot(steps, mean, color="tab:blue", lw=1.4)
        ax.ticklabel_format(axis="y", useOffset=False)
        if np.all(np.isfinite(mean)) and np.all(mean > 0) and mean.max() / mean.min() > 20:
            ax.set_yscale("log")
        ax.set_title(names.get(phase, phase), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss (mean over seeds)")
    _save(fig, path)


FIGURES = {
    "capture.png": capture_heatmaps,
    "phi.png": phi_curves,
    "accuracy.png": accuracy_bars,
    "loss.png": loss_curves,
}


def write_all(result: TheoryResult, fig_dir: Path) -> list[str]:
    """Write every figure into fig_dir; returns the file names in report order."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    for name, draw in FIGURES.items():
        draw(result, fig_dir / name)
    return list(FIGURES)
