"""Shared pieces of the sweep tests: a tiny base config, a sweep-file writer, a read-only view of a store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import yaml

# A theory run that takes well under a second once a worker is warm (the first run in a fresh process
# pays ~3 s of torch start-up). mrp.lr and finetune.ft_lr are pinned so that tuning the defaults cannot
# make these runs diverge; compile and precision are pinned so that runs start at once and are exact.
TINY_BASE = {
    "compile": False,
    "precision": "fp32",
    "data": {"k": 2, "L": 2, "d": 16, "P": 4, "n_pretrain": 60, "n_train": 60, "n_test": 60},
    "sl": {"steps": 20},
    "mrp": {"steps": 20, "lr": 0.5},
    "finetune": {"lp_steps": 10, "ft_steps": 10, "ft_lr": 0.01},
    "probes": {"log_every": 10},
}


def write_sweep(folder: Path, name: str = "tiny", **keys) -> Path:
    """Write a sweep file ``<folder>/<name>.yaml``; ``keys`` become its top-level keys (base defaults to TINY_BASE)."""
    doc = {"name": name, "base": keys.pop("base", TINY_BASE), **keys}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def read_rows(db: Path) -> dict[str, dict]:
    """key -> status, finished, attempts of every run in a store, read-only (a driver may be writing it)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return {r["key"]: dict(r) for r in conn.execute("SELECT key, status, finished, attempts FROM runs")}
    finally:
        conn.close()
