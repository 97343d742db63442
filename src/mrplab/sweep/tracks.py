"""The tracks a sweep can run, behind one small interface; the only module of sweep/ that knows a track.

A track gives the sweep: its config model (validate a run, check a key, the default seeds; the store
keys a run by ``cfg.hash()``), where its keys and metrics are documented (for error hints), the result
columns a finished run fills (a study's metrics are checked against them when the sweep file is
loaded), labels and default metrics for reports, and two functions that run in the worker: ``run``
(one config -> its summary) and ``columns`` (summary -> store columns). Everything else in sweep/
speaks of configs as pydantic models and of results as flat columns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from mrplab.config import TheoryConfig
from mrplab.errors import MrplabError
from mrplab.theory.claims import claims_for
from mrplab.theory.metrics import METRICS, store_columns


@dataclass(frozen=True)
class Track:
    name: str
    config: type[BaseModel]  # the track's strict config model, with .hash()
    keys_doc: str  # where the config keys are listed
    metrics_doc: str  # where the metrics are listed
    result_columns: Callable[[], set[str]]  # the columns a finished run fills
    labels: dict[str, str]  # column -> label in reports
    default_metrics: tuple[str, ...]  # what a report shows when the study names none
    run: Callable[[Any, str, dict[str, Any]], dict[str, Any]]  # (cfg, key, provenance) -> summary
    columns: Callable[[dict[str, Any]], dict[str, Any]]  # summary -> store columns
    prepare: Callable[[dict[str, Any], Path], dict[str, Any]] = lambda cfg_json, folder: cfg_json
    """(config as JSON, sweep folder) -> the config a worker runs: settings that do not change the run's key"""
    group: Callable[[Any], str | None] = lambda cfg: None
    """runs of one group share expensive work (vision: a pretraining); the driver runs a group's first run
    alone before the others start"""


# --------------------------------------------------------------------------- theory


def _theory_run(cfg: TheoryConfig, key: str, provenance: dict[str, Any]) -> dict[str, Any]:
    import time

    from mrplab.theory import experiment
    from mrplab.theory.run_folder import build_summary

    t0 = time.perf_counter()
    result = experiment.run(cfg)
    prov = {k: v for k, v in provenance.items() if k != "runs_dir"}  # theory sweep runs write no run folder
    return build_summary(result, key, time.perf_counter() - t0, {**prov, "config_hash": key})


def _theory_columns(summary: dict[str, Any]) -> dict[str, Any]:
    """Probe summaries, verdicts and timings of one single-seed run's summary, as store columns (the store
    turns bools, non-finite floats and lists into cells)."""
    cols: dict[str, Any] = {}
    per_seed = summary.get("per_seed") or [{}]
    for k, v in per_seed[0].items():
        if k != "seed":
            cols[f"probe.{k}"] = v
    for v in summary.get("verdicts", []):
        cols[f"claim.{v['id']}.pass"] = None if v["verdict"] == "N/A" else int(v["verdict"] == "PASS")
        cols[f"claim.{v['id']}.value"] = v.get("value")
    for k, v in (summary.get("timings") or {}).items():
        cols[f"time.{k}"] = v
    cols["claims_passed"] = summary.get("claims_passed")
    cols["claims_total"] = summary.get("claims_total")
    cols["summary"] = json.dumps(summary)
    return cols


THEORY = Track(
    name="theory",
    config=TheoryConfig,
    keys_doc="configs/theory-default.yaml",
    metrics_doc="src/mrplab/theory/metrics.py",
    result_columns=lambda: store_columns([c.id for c in claims_for(2, 0.5)]),
    labels={**{f"probe.{m.name}": m.label for m in METRICS.values()}, "claims_passed": "claims passed"},
    default_metrics=("probe.mrp_captured_share", "probe.sl_captured_per_class_mean", "probe.sl_err_single",
                     "probe.ft_err_single", "probe.single_view_gap", "claims_passed"),
    run=_theory_run,
    columns=_theory_columns,
)

# --------------------------------------------------------------------------- vision

ARMS = {"sl": "SL from scratch", **{f"{m}_ft": f"{m} -> FT" for m in ("mae", "data2vec")}}
_ACCS = {"acc": "test accuracy", "acc_multi": "multi-view test accuracy", "acc_single": "single-view test accuracy",
         "val_acc": "validation accuracy", "epochs": "epochs chosen on validation"}


def _vision_labels() -> dict[str, str]:
    out = {f"probe.{arm}_{k}": f"{name}: {label}" for arm, name in ARMS.items() for k, label in _ACCS.items()}
    for m in ("mae", "data2vec"):
        out[f"probe.{m}_gap"] = f"{m} -> FT minus SL: test accuracy"
        out[f"probe.{m}_gap_single"] = f"{m} -> FT minus SL: single-view test accuracy"
        out[f"probe.{m}_gap_multi"] = f"{m} -> FT minus SL: multi-view test accuracy"
    return out


VISION_LABELS = _vision_labels()


def _vision_run(cfg: Any, key: str, provenance: dict[str, Any]) -> dict[str, Any]:
    import json
    import tempfile

    from mrplab.vision import train

    out = provenance.get("runs_dir")
    with tempfile.TemporaryDirectory(prefix="mrplab-vision-") as tmp:
        res = train.run(cfg, "compare", out or tmp, argv=provenance.get("command"))
        return json.loads((res.path / "summary.json").read_text())


def _vision_columns(summary: dict[str, Any]) -> dict[str, Any]:
    """Per arm (SL from scratch, <method> -> FT) its accuracies, and each method's gap to SL, as store columns."""
    cols: dict[str, Any] = {}
    for st in summary.get("stages", []):
        arm = "sl" if st["kind"] == "scratch" else f"{st['method']}_ft" if st["kind"] == "finetune" else None
        if arm is None or not st.get("selected", True):  # with an epochs menu: the validation-chosen stage
            continue
        for k in ("acc", "acc_multi", "acc_single"):
            cols[f"probe.{arm}_{k}"] = st.get(f"test_{k}")
        cols[f"probe.{arm}_val_acc"] = st.get("val_acc")
        cols[f"probe.{arm}_epochs"] = st.get("epochs")
        cols[f"time.{st['stage'].split('-', 1)[1]}_s"] = st.get("wall_s")
    for m in ("mae", "data2vec"):
        for k, suffix in (("acc", ""), ("acc_single", "_single"), ("acc_multi", "_multi")):
            a, b = cols.get(f"probe.{m}_ft_{k}"), cols.get(f"probe.sl_{k}")
            if a is not None and b is not None:
                cols[f"probe.{m}_gap{suffix}"] = a - b
    cols["summary"] = json.dumps(summary)
    return cols


def _vision_prepare(cfg_json: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A sweep's pretrainings are shared by its runs: pretrain_cache defaults to <sweep folder>/pretrained."""
    if not cfg_json.get("pretrain_cache"):
        cfg_json = {**cfg_json, "pretrain_cache": str(Path(folder).resolve() / "pretrained")}
    return cfg_json


def _vision_group(cfg: Any) -> str | None:
    """The pretraining a single-seed compare run needs (its methods in one key): runs that share it wait for
    the first of them."""
    from mrplab.config import config_hash
    from mrplab.vision import checkpoints, stages

    keys = [checkpoints.pretrain_key(cfg, stages.Stage("pretrain", cfg.seeds[0], m)) for m in cfg.compare_methods]
    return config_hash({"pretrain": keys})


def _vision_config() -> type[BaseModel]:
    from mrplab.vision.config import VisionConfig

    return VisionConfig


VISION = Track(
    name="vision",
    config=_vision_config(),
    keys_doc="configs/vision/embedded-compare.yaml",
    metrics_doc="src/mrplab/sweep/tracks.py (VISION_LABELS)",
    result_columns=lambda: set(VISION_LABELS) | {f"time.{k}_s" for k in ("scratch",)} | {"wall_s"},
    labels=VISION_LABELS,
    default_metrics=("probe.sl_acc", "probe.mae_ft_acc", "probe.sl_acc_single", "probe.mae_ft_acc_single",
                     "probe.mae_gap", "probe.mae_gap_single"),
    run=_vision_run,
    columns=_vision_columns,
    prepare=_vision_prepare,
    group=_vision_group,
)

TRACKS: dict[str, Track] = {t.name: t for t in (THEORY, VISION)}


def get(name: str) -> Track:
    if name not in TRACKS:
        raise MrplabError(f"unknown sweep track '{name}'", f"use one of: {', '.join(TRACKS)}")
    return TRACKS[name]
