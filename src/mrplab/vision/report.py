"""What a vision run shows: the accuracy table, figures (matplotlib Agg) and report.md.

* ``curves.png``                training loss of every stage over its steps (data2vec: target variance too)
* ``accuracy.png``              test accuracy on multi-view and single-view images per approach, mean ± std
* ``reconstruction-<stage>.png`` MAE: original / masked input / reconstruction of a few test images
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.figure import Figure

import mrplab
from mrplab.io import save_figure
from mrplab.rng import generator
from mrplab.stats import md_table, mean_std
from mrplab.vision.data import ImageSet, normalize

if TYPE_CHECKING:
    from mrplab.vision.config import VisionConfig

DPI = 120
ACC_KEYS = (("acc_multi", "multi-view"), ("acc_single", "single-view"), ("acc", "all"))
METHOD_NAMES = {"mae": "MAE", "data2vec": "data2vec"}


# --------------------------------------------------------------------------- the table


def approach(rec: dict) -> str:
    m = METHOD_NAMES.get(rec.get("method"), rec.get("method"))
    return {"scratch": "SL from scratch", "finetune": f"{m} -> FT", "linprobe": f"{m} linear probe"}[rec["kind"]]


def select(stage_records: list[dict]) -> None:
    """Mark each supervised stage ``selected``: without an epochs menu every one; with it, per seed and
    approach the stage with the best validation accuracy (ties: fewer epochs). The test split plays no part."""
    groups: dict[tuple, list[dict]] = {}
    for rec in stage_records:
        if rec["kind"] != "pretrain":
            groups.setdefault((approach(rec), rec["seed"]), []).append(rec)
    for recs in groups.values():
        best = min(recs, key=lambda r: (-_num(r.get("val_acc")), r.get("epochs") or 0))
        for r in recs:
            r["selected"] = r is best


def _num(x) -> float:
    return -math.inf if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def accuracy_table(stage_records: list[dict], menu: bool = False) -> list[dict]:
    """One row per selected supervised stage (every menu stage with ``menu``): approach, seed, epochs (menu
    stages) and the test accuracies it measured."""
    rows = []
    for rec in stage_records:
        if rec["kind"] == "pretrain" or not (menu or rec.get("selected", True)):
            continue
        row = {"approach": approach(rec), "seed": rec["seed"]}
        if rec.get("epochs") is not None:
            row["epochs"] = rec["epochs"]
            row["val_acc"] = rec.get("val_acc")
        row.update({k: rec.get(f"test_{k}") for k, _ in ACC_KEYS})
        rows.append(row)
    return rows


def mean_rows(table: list[dict], by_epochs: bool = False) -> list[dict]:
    """Per approach (and epochs, with ``by_epochs``), in first-seen order: mean and std over seeds of every
    accuracy column."""
    out = []
    key = (lambda r: (r["approach"], r.get("epochs"))) if by_epochs else (lambda r: r["approach"])
    for group in dict.fromkeys(key(r) for r in table):
        rows = [r for r in table if key(r) == group]
        name = rows[0]["approach"] + (f" ({rows[0]['epochs']} epochs)" if by_epochs else "")
        agg = {"approach": name, "seeds": len(rows)}
        for k, _ in ACC_KEYS:
            mean, std = mean_std(r[k] for r in rows)
            agg[k] = None if math.isnan(mean) else mean
            agg[f"{k}_std"] = None if math.isnan(std) else std  # sample std, as every report
        out.append(agg)
    return out


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def table_columns(table: list[dict]) -> list[tuple[str, str]]:
    """The accuracy columns that hold numbers (single/multi-view only on embedded data)."""
    return [(k, label) for k, label in ACC_KEYS if any(r.get(k) is not None for r in table)]


def markdown_table(table: list[dict], by_epochs: bool = False) -> str:
    """Per approach and seed its test accuracies (and with an epochs menu the chosen epochs and the validation
    accuracy that chose them), then the means over seeds (per approach, or per approach and epochs)."""
    cols = table_columns(table)
    menu = any("epochs" in r for r in table)
    extra = (lambda r: (r.get("epochs"), _pct(r.get("val_acc")))) if menu else (lambda r: ())
    rows = [(r["approach"], r["seed"], *extra(r), *(_pct(r[k]) for k, _ in cols)) for r in table]
    rows += [(f"**{m['approach']}**", f"mean of {m['seeds']}", *(("", "") if menu else ()),
              *(f"**{_pct(m[k])}** ± {_pct(m[k + '_std'])}" for k, _ in cols)) for m in mean_rows(table, by_epochs)]
    head = ("approach", "seed", *(("epochs", "val acc (%)") if menu else ()), *(f"{label} acc (%)" for _, label in cols))
    return "\n".join(md_table(head, rows))


# --------------------------------------------------------------------------- figures


def _save(fig: Figure, path: Path) -> str:
    return save_figure(fig, path, DPI).name


def curves_figure(records: list[dict], path: Path) -> str | None:
    """Training loss per stage (one panel per stage kind); data2vec target/prediction variance if logged."""
    train = [r for r in records if "loss" in r and "event" not in r]
    if not train:
        return None
    kinds = list(dict.fromkeys(r["kind"] for r in train))
    has_var = any("target_var" in r for r in train)
    n = len(kinds) + has_var
    fig = Figure(figsize=(4.2 * n, 3.2))
    axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
    for ax, kind in zip(axes, kinds):
        for key in dict.fromkeys(r["stage"] for r in train if r["kind"] == kind):
            rs = [r for r in train if r["stage"] == key]
            ax.plot([r["step"] for r in rs], [r["loss"] for r in rs], label=key, lw=1.2)
        ax.set_title(f"{kind} loss")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    if has_var:
        ax = axes[-1]
        for key in dict.fromkeys(r["stage"] for r in train if "target_var" in r):
            rs = [r for r in train if r["stage"] == key]
            line, = ax.plot([r["step"] for r in rs], [r["target_var"] for r in rs], label=f"{key} target")
            ax.plot([r["step"] for r in rs], [r["pred_var"] for r in rs], ls="--", color=line.get_color(),
                    label=f"{key} prediction")
        ax.set_title("data2vec variance across tokens")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    return _save(fig, path)


def accuracy_figure(table: list[dict], path: Path) -> str | None:
    """Grouped bars: test accuracy per approach on each view type, mean with std over seeds."""
    if not table:
        return None
    means = mean_rows(table)
    cols = table_columns(table)
    fig = Figure(figsize=(1.6 + 1.4 * len(means) * len(cols) / 2, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(cols)
    for j, (k, label) in enumerate(cols):
        xs = np.arange(len(means)) + (j - (len(cols) - 1) / 2) * width
        ax.bar(xs, [100 * (m[k] or 0) for m in means], width, yerr=[100 * (m[f"{k}_std"] or 0) for m in means],
               label=label, capsize=3)
    ax.set_xticks(np.arange(len(means)), [m["approach"] for m in means], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 115)
    ax.set_yticks(range(0, 101, 20))
    ax.legend(fontsize=7, loc="upper center", ncols=len(cols), frameon=False)
    return _save(fig, path)


@torch.no_grad()
def reconstructions(mae, test: ImageSet, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
                    n: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(original, masked, reconstruction) of the first n test images, each [n, 3, H, W] in [0, 1]."""
    from mrplab.vision.objectives import patch_mask, patchify, unpatchify

    enc = mae.encoder
    p, grid = enc.patch_size, enc.grid
    x = normalize(test.images[:n].to(device).float() / 255.0, mean.to(device), std.to(device))  # [n, 3, H, W]
    mask = patch_mask(x.shape[0], grid[0] * grid[1], mae.mask_ratio, generator(0, "vision/figure-mask"), device)
    was = mae.training
    mae.eval()
    pred = mae.predict(x, mask).float()  # [n, N, P]
    mae.train(was)
    target = patchify(x, p)  # [n, N, P]
    if mae.norm_pix:  # predictions are per-patch normalised: restore each patch's own mean and spread
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6).sqrt() + mu
    m = mask.unsqueeze(-1).expand_as(target)  # [n, N, P]
    recon = unpatchify(torch.where(m, pred, target), p, grid)  # masked patches predicted, visible ones as given
    hidden = unpatchify(m.float(), p, grid).bool().cpu()  # [n, 3, H, W] True on masked pixels
    mean, std = mean.to(device).view(1, -1, 1, 1), std.to(device).view(1, -1, 1, 1)

    def to01(t: torch.Tensor) -> torch.Tensor:
        return (t * std + mean).clamp(0, 1).cpu()

    original = to01(x)
    return original, original.masked_fill(hidden, 0.5), to01(recon)


def reconstruction_figure(mae, test: ImageSet, mean, std, device, path: Path, title: str) -> str:
    rows = reconstructions(mae, test, mean, std, device)
    n = rows[0].shape[0]
    fig = Figure(figsize=(1.3 * n, 4.2))
    for r, (imgs, label) in enumerate(zip(rows, ("original", "masked", "reconstruction"))):
        for c in range(n):
            ax = fig.add_subplot(3, n, r * n + c + 1)
            ax.imshow(imgs[c].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def write_figures(fig_dir: Path, records: list[dict], modules: dict, test: ImageSet, mean, std,
                  cfg: "VisionConfig", device) -> list[str]:
    from mrplab.vision.objectives import MAE

    files = [curves_figure(records, fig_dir / "curves.png")]
    stage_recs = [r for r in records if r.get("event") == "test"]
    table = accuracy_table(stage_recs)
    files.append(accuracy_figure(table, fig_dir / "accuracy.png"))
    maes = [(k, m) for k, m in modules.items() if isinstance(m, MAE)]
    for key, mae in maes[:1]:
        files.append(reconstruction_figure(mae, test, mean, std, device, fig_dir / f"reconstruction-{key}.png",
                                           f"{key}: mask ratio {mae.mask_ratio}"))
    return [f for f in files if f]


# --------------------------------------------------------------------------- summary and report.md


def summary(result, folder_name: str, prov, figure_files: list[str]) -> dict:
    return {
        "name": result.cfg.name,
        "command": result.command,
        "run_folder": folder_name,
        "config_hash": result.cfg.hash(),
        "git_commit": prov.git_commit,
        "mrplab_version": mrplab.__version__,
        "torch_version": torch.__version__,
        "seeds": result.cfg.seeds,
        "stages": result.stages,
        "table": result.table,
        "means": mean_rows(result.table),
        **({"menu": result.menu, "menu_means": mean_rows(result.menu, by_epochs=True)} if result.menu else {}),
        "figures": figure_files,
        "runtime": result.runtime,
        "wall_s": result.wall_s,
    }


def render(s: dict, cfg: "VisionConfig", figure_files: list[str]) -> str:
    from mrplab import config as config_mod

    m, d, rt = cfg.model, cfg.data, s.get("runtime")
    lines = [
        f"# mrplab vision {s['command']} `{s['run_folder']}`",
        "",
        f"- data: {d.source}" + (f" ({d.root})" if d.root else f", {d.num_classes} classes, "
                                  f"{d.motifs_per_class} motifs per class, {d.n_train} train / {d.n_test} test images, "
                                  f"single-view fraction {d.single_view_test} of test") + f", {d.image_size} px",
        f"- model: {m.name}, patch {m.patch_size}; precision {cfg.precision}"
        + (f" -> {rt['precision']} ({rt['precision_reason']}); threads {rt['threads']} ({rt['threads_reason']})"
           if rt else ""),
        f"- epochs: pretrain {cfg.pretrain.epochs} ({', '.join(cfg.compare_methods)}, "
        f"mask ratio {cfg.pretrain.mask_ratio}), "
        + (f"fine-tune and SL from scratch: each entry of {cfg.finetune.epochs_menu}, chosen on validation"
           if cfg.finetune.epochs_menu else f"fine-tune {cfg.finetune.epochs}, SL from scratch {cfg.scratch_epochs}")
        + " (same augmentation)",
        f"- seeds: {', '.join(str(x) for x in s['seeds'])}",
        f"- config hash: `{s['config_hash']}`, git commit: `{s['git_commit'] or 'n/a'}`",
        f"- wall time: {s['wall_s']:.0f} s",
        "",
    ]
    if s["table"]:
        lines += ["## Test accuracy", ""]
        if s.get("menu"):
            lines += ["Each approach trained once per entry of `finetune.epochs_menu`; the row of a seed is the "
                      "entry with the best validation accuracy (the test split chose nothing).", ""]
            top = max(cfg.finetune.epochs_menu or [0])
            edge = sorted({f"{r['approach']} (seed {r['seed']})" for r in s["table"] if r.get("epochs") == top})
            if edge:
                lines += [f"Chosen at the longest entry ({top} epochs), so a longer schedule may do better: "
                          f"{', '.join(edge)}.", ""]
        lines += [markdown_table(s["table"]), ""]
    if s.get("menu"):
        lines += ["## Every entry of the epochs menu", "", "Both arms at the same epochs on the same labelled "
                  "images and batch: equal optimiser steps per row.", "", markdown_table(s["menu"], by_epochs=True),
                  ""]
    lines += ["## Stages", "", "| stage | steps | wall (s) |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['steps']} | {r['wall_s']:.1f} |" for r in s["stages"]]
    lines.append("")
    if figure_files:
        lines += ["## Figures", ""] + [f"![{f}](figures/{f})" for f in figure_files] + [""]
    lines += ["## Config", "", "```yaml", config_mod.dump_yaml(cfg).rstrip(), "```", ""]
    return "\n".join(lines)
