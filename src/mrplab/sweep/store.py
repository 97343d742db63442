"""The results store of a sweep: one SQLite table, one row per run.

``<sweep folder>/results.sqlite``, table ``runs``; ``key`` (``cfg.hash()`` of
the run's resolved config) is the PRIMARY KEY, so a run can never have two
rows. Only the driver writes; every state change is its own transaction and
the database is in WAL mode with full sync, so killing the driver at any
moment keeps every run that had finished.

Columns (a column is added the first time a value for it arrives):

* run state: ``key``, ``status`` (pending / running / done / failed),
  ``attempts``, ``started``, ``finished`` (UTC ISO timestamps), ``wall_s``,
  ``error`` (one line), ``traceback``, ``run_threads``, ``host``, ``sweep``,
  ``setting`` (hash of the config without its seed), ``seed``, ``axes`` (JSON
  of this run's axis values);
* the flattened resolved config: ``name``, ``seeds``, ``data.k``,
  ``mrp.mask_ratio``, ... (lists as JSON text; ``data.Gamma`` is
  ``data.Gamma_upper`` because SQLite's column names ignore case);
* probe summaries, one per per-seed metric: ``probe.mrp_captured``,
  ``probe.sl_err_single``, ``probe.ft_err_single``, ``probe.single_view_gap``, ...;
* every claim verdict: ``claim.C1.pass`` (1/0) and ``claim.C1.value``;
  ``claims_passed``, ``claims_total``;
* timings: ``time.data_s``, ``time.sl_s``, ``time.mrp_s``, ``time.finetune_s``,
  ``time.total_s``;
* ``summary``: the run's full summary (``theory.run_folder.build_summary``) as JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Iterator

from mrplab import config as config_mod
from mrplab.errors import MrplabError
from mrplab.sweep.spec import PlannedRun

DB_NAME = "results.sqlite"
STATUSES = ("pending", "running", "done", "failed")

_META = {
    "key": "TEXT PRIMARY KEY",
    "status": "TEXT NOT NULL",
    "sweep": "TEXT",
    "setting": "TEXT",
    "seed": "INTEGER",
    "axes": "TEXT",
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "started": "TEXT",
    "finished": "TEXT",
    "wall_s": "REAL",
    "error": "TEXT",
    "traceback": "TEXT",
    "run_threads": "INTEGER",
    "host": "TEXT",
    "summary": "TEXT",
}


def q(name: str) -> str:
    """A quoted SQL identifier (column names hold dots)."""
    return '"' + name.replace('"', '""') + '"'


def _value(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return v


def config_flat(dumped: dict[str, Any]) -> dict[str, Any]:
    """The flattened config with SQLite-safe names: column names are case-insensitive in SQLite, so a key
    that differs from another only in case and has capitals gets ``_upper`` (``data.Gamma_upper`` beside
    ``data.gamma``)."""
    flat = config_mod.flatten(dumped)
    lower: dict[str, int] = {}
    for k in flat:
        lower[k.lower()] = lower.get(k.lower(), 0) + 1
    return {(f"{k}_upper" if lower[k.lower()] > 1 and k != k.lower() else k): v for k, v in flat.items()}


def config_columns(run: PlannedRun) -> dict[str, Any]:
    return {k: _value(v) for k, v in config_flat(run.cfg.model_dump(mode="json")).items()}


class Store:
    """The ``runs`` table of one sweep folder. Use as a context manager."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise MrplabError(f"{self.path} does not exist", "give the folder that `mrplab sweep` wrote")
        try:
            self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            cols = ", ".join(f"{q(k)} {t}" for k, t in _META.items())
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols})")
        except sqlite3.DatabaseError as err:
            raise MrplabError(f"cannot open the results store {self.path}: {err}", "check the file or remove it") from None
        self._columns = self._read_columns()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.close()
        return False

    def close(self) -> None:
        self.conn.close()

    # -- schema

    def _read_columns(self) -> list[str]:
        return [r["name"] for r in self.conn.execute("PRAGMA table_info(runs)")]

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def _ensure_columns(self, names: Iterable[str]) -> None:
        have = {c.lower() for c in self._columns}
        for name in names:
            if name.lower() not in have:
                have.add(name.lower())
                self.conn.execute(f"ALTER TABLE runs ADD COLUMN {q(name)}")
                self._columns.append(name)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write: committed whole or not at all. A write SQLite refuses (disk or quota full, read-only
        file, I/O error, locked past the timeout) is one MrplabError; the rows written before stay."""
        try:
            if self.conn.in_transaction:  # left open by an interrupt between BEGIN and COMMIT
                self.conn.execute("ROLLBACK")
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as err:
            if self.conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
            raise MrplabError(f"cannot write the results store {self.path}: {err}",
                              "free disk space (or fix permissions), then run the same command again: finished "
                              "runs are kept and skipped") from None

    # -- writes

    def plan(self, sweep_name: str, runs: list[PlannedRun]) -> int:
        """Insert every planned run that has no row yet as pending; returns how many were new."""
        new = 0
        with self.transaction() as conn:
            for run in runs:
                cols = {"key": run.key, "status": "pending", "sweep": sweep_name, "setting": run.setting,
                        "seed": run.seed, "axes": json.dumps(run.axes), **config_columns(run)}
                self._ensure_columns(cols)
                names = ", ".join(q(c) for c in cols)
                marks = ", ".join("?" for _ in cols)
                cur = conn.execute(f"INSERT OR IGNORE INTO runs ({names}) VALUES ({marks})", list(cols.values()))
                new += cur.rowcount
        return new

    def _update(self, key: str, cols: dict[str, Any]) -> None:
        with self.transaction() as conn:
            self._ensure_columns(cols)
            sets = ", ".join(f"{q(c)} = ?" for c in cols)
            conn.execute(f"UPDATE runs SET {sets} WHERE key = ?", [*cols.values(), key])

    def mark_running(self, key: str, started: str, threads: int) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE runs SET status = 'running', attempts = attempts + 1, started = ?, finished = NULL, "
                         "run_threads = ? WHERE key = ?", (started, threads, key))

    def finish(self, key: str, out: dict[str, Any]) -> None:
        """Record a worker's outcome (``worker.run_one``'s dict): done with its results, or failed with its error."""
        cols: dict[str, Any] = {
            "started": out.get("started"), "finished": out.get("finished"), "wall_s": out.get("wall_s"),
            "host": out.get("host"), "run_threads": out.get("threads"),
        }
        if out.get("ok"):
            cols.update(status="done", error=None, traceback=None, **{k: _value(v) for k, v in out["columns"].items()})
        else:
            cols.update(status="failed", error=out.get("error") or "unknown error", traceback=out.get("traceback"))
        if cols["started"] is None:  # the worker died before it could say: keep the dispatch time
            del cols["started"]
        self._update(key, cols)

    def reset_running(self) -> None:
        """Runs that were in flight when the driver stopped go back to pending (the driver holds the folder
        lock, so no other driver can be running them)."""
        with self.transaction() as conn:
            conn.execute("UPDATE runs SET status = 'pending' WHERE status = 'running'")

    # -- reads

    def statuses(self) -> dict[str, str]:
        return {r["key"]: r["status"] for r in self.conn.execute("SELECT key, status FROM runs")}

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for r in self.conn.execute("SELECT status, COUNT(*) AS n FROM runs GROUP BY status"):
            out[r["status"]] = r["n"]
        return out

    def rows(self, status: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM runs" + (" WHERE status = ?" if status else "") + " ORDER BY rowid"
        return [dict(r) for r in self.conn.execute(sql, (status,) if status else ())]
