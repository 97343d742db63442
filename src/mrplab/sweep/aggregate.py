"""A sweep's finished runs grouped into settings, with mean, sample std and n per metric.

A *setting* is one combination of the label columns: the sweep's axes plus any other config column
whose value differs between the finished runs (so rows from an older version of the sweep file are
never merged with new ones). ``std`` is the sample standard deviation (0 for a single run); missing
values (NaN) are left out of a metric's mean and counted out of its ``n``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from mrplab.errors import MrplabError
from mrplab.stats import describe
from mrplab.sweep import tracks
from mrplab.sweep.store import config_flat

LABELS = {k: v for t in tracks.TRACKS.values() for k, v in t.labels.items()}  # store column -> label
_NOT_LABELS = {"seeds", "threads", "name"}


def label(metric: str) -> str:
    return LABELS.get(metric, metric)



def num(v: Any) -> float | None:
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
        d = describe(x for x in (num(v) for v in values) if x is not None)
        return cls(d["mean"], d["std"], d["n"])


@dataclass
class Setting:
    labels: dict[str, Any]
    rows: list[dict[str, Any]]
    stats: dict[str, Stat] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.rows)


def sort_key(v: Any) -> tuple:
    x = num(v)
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
            if any(num(r.get(c)) is not None for r in rows):
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
    settings = sorted(groups.values(), key=lambda s: [sort_key(s.labels[c]) for c in labels])
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
