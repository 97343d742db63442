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


# --------------------------------------------------------------------------- theory


def _theory_run(cfg: TheoryConfig, key: str, provenance: dict[str, Any]) -> dict[str, Any]:
    import time

    from mrplab.theory import experiment
    from mrplab.theory.run_folder import build_summary

    t0 = time.perf_counter()
    result = experiment.run(cfg)
    return build_summary(result, key, time.perf_counter() - t0, {**provenance, "config_hash": key})


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

TRACKS: dict[str, Track] = {t.name: t for t in (THEORY,)}


def get(name: str) -> Track:
    if name not in TRACKS:
        raise MrplabError(f"unknown sweep track '{name}'", f"use one of: {', '.join(TRACKS)}")
    return TRACKS[name]
