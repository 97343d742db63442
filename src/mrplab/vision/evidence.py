"""Multi-view evidence: class-activation maps of trained vision models and the measures of vision/measures.py.

``mrplab evidence MODEL ...`` takes classifier checkpoints of the vision track
(``checkpoints/<stage>.safetensors`` with its JSON sidecar) or whole run
folders (every scratch / fine-tuned / linear-probe stage in them), computes
Eigen-CAM and Grad-CAM (pytorch-grad-cam) on the same test images, and writes

    runs/evidence-<YYYYmmdd-HHMMSS>/
      evidence.json     every measure per model, and per approach (mean, std over seeds)
      figures/cams-<method>.png   image | each model's map, predicted and true labels
      report.md         the definitions, the tables and what the theory predicts

Approaches: "SL" (scratch), "MRP+FT (mae)", "MRP+FT (data2vec)", "LP (...)".
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mrplab.errors import MrplabError
from mrplab.stats import md_table, mean_std
from mrplab.io import atomic_write_text, dumps, git_commit, save_figure, timestamp
from mrplab.vision import measures
from mrplab.vision.data import ImageSet, VisionDataConfig, channel_stats, load_split, normalize
from mrplab.vision.checkpoints import Classifier, classifier_files, load_classifier

CAM_METHODS = ("eigencam", "gradcam")
SINGLE_VIEW_RECOGNISED = 0.8  # a (class, motif) pair counts as recognised from that motif alone at >= this accuracy


# --------------------------------------------------------------------------- the models


def check_compatible(models: list[Classifier], data: VisionDataConfig) -> int:
    """All models classify the same classes as the data; returns the number of classes."""
    k = {m.label: m.encoder.head.out_features for m in models}
    n_data = data.num_classes if data.source == "embedded" else None
    for m in models:
        if m.cfg.data.image_size != data.image_size:
            raise MrplabError(f"{m.path} was trained on {m.cfg.data.image_size}-px images, the data has {data.image_size}",
                              "compare models trained on the same data")
    if len(set(k.values())) != 1:
        raise MrplabError(f"the models classify different numbers of classes: {k}",
                          "compare models trained on the same data set")
    if n_data is not None and next(iter(k.values())) != n_data:
        raise MrplabError(f"the models have {next(iter(k.values()))} classes, the data {n_data}",
                          "use --data with the data set the models were trained on")
    return next(iter(k.values()))


# --------------------------------------------------------------------------- CAMs


def _vit_reshape(grid: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    def reshape(t: torch.Tensor) -> torch.Tensor:  # [B, N, D] tokens -> [B, D, h, w]
        t = t[:, t.shape[1] - grid[0] * grid[1]:]  # without prefix tokens (a timm ViT's class token)
        B, N, D = t.shape
        return t.transpose(1, 2).reshape(B, D, *grid)
    return reshape


def cam_maps(model: Classifier, x: torch.Tensor, targets: torch.Tensor, method: str, batch: int = 64) -> torch.Tensor:
    """Class-activation maps [B, H, W] in [0, 1] for normalised images x [B, 3, H, W].

    Eigen-CAM: the first principal component of the last stage's activations (class-agnostic, what the
    paper's figures show); Grad-CAM: gradient-weighted activations for the class in ``targets`` [B].
    CNN: the last residual block; ViT: the last block's first norm, tokens reshaped to the patch grid.
    """
    from pytorch_grad_cam import EigenCAM, GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    enc = model.encoder
    if enc.kind == "cnn":
        layer, reshape = enc.net.layer4[-1], None
    else:
        layer, reshape = enc.vit.blocks[-1].norm1, _vit_reshape(enc.grid)
    cls = {"eigencam": EigenCAM, "gradcam": GradCAM}[method]
    out = []
    with cls(model=enc, target_layers=[layer], reshape_transform=reshape) as cam:
        for a in range(0, len(x), batch):
            xb = x[a:a + batch]
            tg = [ClassifierOutputTarget(int(c)) for c in targets[a:a + batch]]
            out.append(torch.from_numpy(cam(input_tensor=xb, targets=tg)).float())
    return measures.normalize_maps(torch.cat(out))


@torch.no_grad()
def predict(model: Classifier, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model.encoder(x[a:a + batch]).argmax(-1) for a in range(0, len(x), batch)])


# --------------------------------------------------------------------------- measures per model


@dataclass
class Evidence:
    per_model: list[dict] = field(default_factory=list)
    per_approach: list[dict] = field(default_factory=list)
    occlusion: list[dict] = field(default_factory=list)


def select_images(test: ImageSet, n: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of up to n test images, a fixed random subset (the same for every model)."""
    return torch.randperm(len(test), generator=gen)[: min(n, len(test))]


def single_view_by_motif(pred: torch.Tensor, test: ImageSet) -> dict:
    """Accuracy on single-view test images grouped by (class, motif): which motifs alone let the model recognise
    the class."""
    sel = (test.view == 1).nonzero().flatten()
    motif = test.motif_present[sel].float().argmax(1)  # [n] the one present motif
    y = test.labels[sel]
    ok = (pred[sel] == y).float()
    table = {}
    for c in range(test.num_classes):
        for m in range(test.motif_present.shape[1]):
            pick = (y == c) & (motif == m)
            if pick.any():
                table[f"{c}/{m}"] = ok[pick].mean().item()
    vals = list(table.values())
    return {"acc_by_class_motif": table, "acc_per_motif_mean": sum(vals) / len(vals) if vals else math.nan,
            "acc_per_motif_min": min(vals) if vals else math.nan,
            "motifs_recognised_share": sum(v >= SINGLE_VIEW_RECOGNISED for v in vals) / len(vals) if vals else math.nan}


def measure(models: list[Classifier], data: VisionDataConfig, n_images: int, methods: tuple[str, ...],
            window: int | None = None, progress: Callable[[str], None] = lambda s: None) -> tuple[Evidence, dict]:
    """Every measure for every model on the same test images; returns the evidence and the maps for figures."""
    progress("loading data")
    train, test = load_split(data, "train"), load_split(data, "test")
    mean, std = channel_stats(train.images)
    for m in models:
        if hasattr(m.encoder, "set_input_stats"):  # a timm model re-normalises to its own statistics
            m.encoder.set_input_stats(mean, std)
    window = window or max(2, data.image_size // 4)
    gen = torch.Generator().manual_seed(0)
    idx = select_images(test, n_images, gen)
    raw = test.images[idx].float() / 255.0  # [B, 3, H, W] in [0, 1]
    x = normalize(raw, mean, std)
    y = test.labels[idx]
    embedded = test.view is not None
    fill = torch.zeros(3)  # the data set's mean colour is 0 after normalisation
    ev = Evidence()
    maps: dict[str, dict[str, torch.Tensor]] = {}
    preds: dict[str, torch.Tensor] = {}
    corners: dict[str, torch.Tensor] = {}
    for m in models:
        progress(f"CAMs of {m.label}")
        pred_all = predict(m, normalize(test.images.float() / 255.0, mean, std))  # [N_test]
        pred = pred_all[idx]
        preds[m.label] = pred
        rec: dict = {"model": m.label, "approach": m.approach, "seed": m.seed, "path": str(m.path),
                     "n_images": len(idx)}
        rec["acc"], rec["acc_se"] = measures.mean_se((pred_all == test.labels).float())
        maps[m.label] = {}
        for method in methods:
            cams = cam_maps(m, x, y, method)  # [B, H, W], Grad-CAM for the true class
            maps[m.label][method] = cams
            rec[f"{method}.regions_mean"], rec[f"{method}.regions_mean_se"] = measures.mean_se(
                measures.count_regions(cams).float())
            if embedded:
                mv = test.view[idx] == 0
                if mv.any():
                    cov = measures.motif_coverage(cams[mv], test.motif_boxes[idx][mv], test.motif_present[idx][mv])
                    rec[f"{method}.motif_coverage"], rec[f"{method}.motif_coverage_se"] = measures.mean_se(cov)
        if embedded:
            rec["acc_multi"] = (pred_all == test.labels)[test.view == 0].float().mean().item()
            rec["acc_single"], rec["acc_single_se"] = measures.mean_se((pred_all == test.labels)[test.view == 1].float())
            rec.update({f"single_view.{k}": v for k, v in single_view_by_motif(pred_all, test).items()})
        corners[m.label] = measures.top_window(maps[m.label][methods[0]], window)
        ev.per_model.append(rec)

    # occlusion: fill each image's most discriminative window (by a model's own map, then by another model's)
    for m in models:
        ok_clean = (preds[m.label] == y).float()
        sources = [m]  # own map, then one model of every other approach (same seed where there is one)
        for approach in dict.fromkeys(o.approach for o in models if o.approach != m.approach):
            cands = [o for o in models if o.approach == approach]
            sources.append(next((o for o in cands if o.seed == m.seed), cands[0]))
        for other in sources:
            occluded = measures.occlude(x, corners[other.label], window, fill)
            ok = (predict(m, occluded) == y).float()
            retained, retained_se = measures.ratio_se(ok, ok_clean)
            ev.occlusion.append({
                "model": m.label, "approach": m.approach, "seed": m.seed,
                "map_of": "own" if other is m else other.approach, "map_model": other.label,
                "acc_clean": ok_clean.mean().item(), "acc_occluded": ok.mean().item(),
                "retained": retained, "retained_se": retained_se,
            })

    by: dict[str, list[dict]] = {}
    for rec in ev.per_model:
        by.setdefault(rec["approach"], []).append(rec)
    for approach, recs in by.items():
        agg: dict = {"approach": approach, "seeds": [r["seed"] for r in recs]}
        keys = sorted({k for r in recs for k, v in r.items() if isinstance(v, float)})
        for k in keys:
            agg[k] = mean_std([r.get(k) for r in recs])
        occ = [o for o in ev.occlusion if o["approach"] == approach]
        for target in sorted({o["map_of"] for o in occ}):
            agg[f"occlusion.{target}.retained"] = mean_std([o["retained"] for o in occ if o["map_of"] == target])
            agg[f"occlusion.{target}.retained_se"] = mean_std(
                [o["retained_se"] for o in occ if o["map_of"] == target])
        ev.per_approach.append(agg)
    return ev, {"maps": maps, "preds": preds, "raw": raw, "labels": y, "classes": test.classes,
                "window": window, "corners": corners}


# --------------------------------------------------------------------------- figures and report


def figure_grid(path: Path, models: list[Classifier], extra: dict, method: str, n: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw, y, classes = extra["raw"], extra["labels"], extra["classes"]
    n = min(n, len(raw))
    cols = 1 + len(models)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.6 * n), squeeze=False)
    for i in range(n):
        img = raw[i].permute(1, 2, 0).clamp(0, 1).numpy()
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(f"true {classes[int(y[i])]}", fontsize=6)
        for j, m in enumerate(models, start=1):
            axes[i, j].imshow(img)
            axes[i, j].imshow(extra["maps"][m.label][method][i].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axes[i, j].set_title(f"{m.label}\npred {classes[int(extra['preds'][m.label][i])]}", fontsize=6)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"{method}: image | each model's map", fontsize=8)
    fig.tight_layout()
    try:
        save_figure(fig, path, 110, tight=False)
    finally:
        plt.close(fig)


def _fmt(v) -> str:
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, float) for x in v):
        return "n/a" if math.isnan(v[0]) else f"{v[0]:.3f} ± {v[1]:.3f}"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _cell(a: dict, key: str) -> str:
    """A per-approach table cell: mean ± std over seeds, or with one seed mean ± image-level SE (or the mean)."""
    v = a.get(key, math.nan)
    if len(a["seeds"]) > 1 or not isinstance(v, (tuple, list)):
        return _fmt(v)
    se = a.get(f"{key}_se", (math.nan,))[0]
    if math.isnan(v[0]):
        return "n/a"
    return f"{v[0]:.3f}" if math.isnan(se) else f"{v[0]:.3f} ± {se:.3f} (SE)"


DEFINITIONS = f"""\
- **motif coverage**: on multi-view test images (embedded data), the share of the class's motifs whose box holds a
  CAM value >= {measures.PEAK_THRESHOLD} of the image's maximum or >= {measures.MASS_SHARE} of the map's mass.
- **single-view accuracy per motif**: accuracy on single-view test images grouped by (class, motif shown);
  *motifs recognised* = share of (class, motif) pairs with accuracy >= {SINGLE_VIEW_RECOGNISED}.
- **regions**: connected components (8-connected) of the pixels >= {measures.REGION_THRESHOLD} of the map's maximum,
  components under {measures.MIN_REGION_PIXELS} pixels ignored; mean per image.
- **occlusion retained**: accuracy after filling the window x window square with the largest map sum (the most
  discriminative region) with the data set's mean colour, divided by the clean accuracy on the same images; *own* uses
  the model's own map, the other columns another approach's map (same seed).
- **a difference is claimed** only when it exceeds the spread: with >= 2 seeds per approach the sum of the two stds
  over seeds; with one seed twice the image-level standard error of the difference (per-image values for regions
  and coverage, the delta method for the paired accuracy ratio of occlusion).
- Eigen-CAM is class-agnostic (first principal component of the last stage's activations); Grad-CAM explains the
  true class. CNN: last residual block; ViT: last block's first norm, tokens on the patch grid.
"""

PREDICTION = (
    "The theory predicts that MRP captures all discriminative features of a class and fine-tuning keeps them, "
    "while SL from scratch keeps about one feature per class: MRP+FT should cover more of a multi-view image's "
    "motifs, recognise a class from each of its motifs alone (high single-view accuracy for every motif), show "
    "more separated high-activation regions, and keep more accuracy when its own most discriminative region is "
    "removed."
)


def render_report(ev: Evidence, figures: list[str], n_images: int, data: VisionDataConfig, wall_s: float) -> str:
    lines = ["# Multi-view evidence", "", PREDICTION, "", "## Definitions", "", DEFINITIONS,
             f"Data: {data.source}" + (f" ({data.root})" if data.root else "") + f"; {n_images} test images for maps"
             f" and occlusion; wall time {wall_s:.0f} s.", "", "## Per approach (mean ± std over seeds)", ""]
    keys = [k for k in ev.per_approach[0] if k not in ("approach", "seeds")] if ev.per_approach else []
    keys = [k for k in keys if not k.startswith("single_view.acc_by") and not k.endswith("_se")]
    if any(len(a["seeds"]) == 1 for a in ev.per_approach):
        lines += ["With one seed there is no spread over seeds: such cells show ± the image-level standard error,"
                  " marked (SE); a cell without one shows the value alone.", ""]
    lines += md_table(("approach", "seeds", *keys),
                      [(a["approach"], ", ".join(map(str, a["seeds"])), *(_cell(a, k) for k in keys))
                       for a in ev.per_approach])
    lines += ["", "## What was measured", ""]
    lines += measured_sentences(ev)
    lines += ["", "## Occlusion, per model", "",
              *md_table(("model", "map of", "clean acc", "occluded acc", "retained"),
                        [(o["model"], f"{o['map_of']} ({o['map_model']})", f"{o['acc_clean']:.3f}",
                          f"{o['acc_occluded']:.3f}", f"{o['retained']:.3f}") for o in ev.occlusion])]
    lines += ["", "## Figures", ""] + [f"![{f}](figures/{f})" for f in figures]
    return "\n".join(lines) + "\n"


def _spread(a: dict, b: dict, key: str) -> tuple[float, str]:
    """How far apart two approaches' means must be before a direction is claimed. With >= 2 seeds on both
    sides: the sum of the two stds over seeds. Otherwise (one seed): twice the image-level standard error
    of the difference, 2 * sqrt(se_a^2 + se_b^2), about a 95% interval."""
    if len(a["seeds"]) > 1 and len(b["seeds"]) > 1:
        return a[key][1] + b[key][1], "the two stds' sum over seeds"
    se_a, se_b = a.get(f"{key}_se", (math.nan,))[0], b.get(f"{key}_se", (math.nan,))[0]
    return 2 * math.hypot(se_a, se_b), "twice the image-level standard error of the difference"


def measured_sentences(ev: Evidence) -> list[str]:
    """One sentence per measure: which approach scored higher, from the numbers (no fixed verdict)."""
    sl = next((a for a in ev.per_approach if a["approach"] == "SL"), None)
    out = []
    if sl is None:
        return ["No SL (scratch) model was given, so there is no SL-vs-MRP comparison."]
    for a in ev.per_approach:
        if a is sl:
            continue
        for key, better in (("eigencam.motif_coverage", "higher"), ("gradcam.motif_coverage", "higher"),
                            ("single_view.motifs_recognised_share", "higher"), ("acc_single", "higher"),
                            ("eigencam.regions_mean", "higher"), ("gradcam.regions_mean", "higher"),
                            ("occlusion.own.retained", "higher")):
            if key not in a or key not in sl:
                continue
            (mv, _), (sv, _) = a[key], sl[key]
            if math.isnan(mv) or math.isnan(sv):
                continue
            agrees = (mv > sv) if better == "higher" else (mv < sv)
            spread, rule = _spread(a, sl, key)
            if math.isnan(spread):
                verdict = "no spread to judge it by (one seed, no per-image values)."
            elif abs(mv - sv) <= spread:  # within the spread: no direction is claimed
                verdict = f"no clear difference (|difference| {abs(mv - sv):.3f} <= {rule} {spread:.3f})."
            else:
                verdict = "as the theory predicts." if agrees else "**not** as the theory predicts."
            out.append(f"- {key} ({better} predicted for MRP): {a['approach']} {_cell(a, key)} vs SL "
                       f"{_cell(sl, key)} — {verdict}")
    return out


def run_evidence(paths: list[str], data: VisionDataConfig | None, out: str | Path, n_images: int,
                 methods: tuple[str, ...] = CAM_METHODS, progress: Callable[[str], None] = lambda s: None) -> Path:
    t0 = time.perf_counter()
    from mrplab.vision.interop import is_timm_spec, load_timm

    specs = [p for p in paths if is_timm_spec(p)]
    files = classifier_files([p for p in paths if not is_timm_spec(p)])
    if len(files) + len(specs) < 2:
        raise MrplabError("evidence compares at least two models", "give two checkpoints or a compare run folder")
    models = [load_classifier(p) for p in files]
    data = data or (models[0].cfg.data if models else None)
    models += [load_timm(spec, data) for spec in specs]
    if not files:  # only timm models: the data at their input size
        data = data.model_copy(update={"image_size": models[0].cfg.data.image_size})
    check_compatible(models, data)
    ev, extra = measure(models, data, n_images, methods, progress=progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"evidence-{timestamp()}"
    partial = out / f".{name}.{os.getpid()}.partial"
    try:
        (partial / "figures").mkdir(parents=True)
        figs = []
        for method in methods:
            f = f"cams-{method}.png"
            figure_grid(partial / "figures" / f, models, extra, method)
            figs.append(f)
        wall = time.perf_counter() - t0
        atomic_write_text(partial / "evidence.json", dumps({
            "per_model": ev.per_model, "per_approach": ev.per_approach, "occlusion": ev.occlusion,
            "data": data.model_dump(mode="json"), "n_images": n_images, "window": extra["window"],
            "methods": list(methods), "wall_s": wall, "git_commit": git_commit(),
            "models": [str(m.path) for m in models]}, indent=2) + "\n")
        atomic_write_text(partial / "report.md", render_report(ev, figs, n_images, data, wall))
        final = out / name
        os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final

