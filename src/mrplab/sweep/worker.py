"""One sweep run, executed in a worker process (local pool) or a Ray task.

``run_one`` takes plain data (the track's name, the resolved config as a JSON
mapping, the number of torch threads, the driver's provenance with the run's
store key as ``config_hash``) and returns plain data (the run's summary and its
store columns), so it pickles the same way for both executors. It never raises for a failed run:
the error comes back as text and the driver records the run as failed.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
import time
import traceback
from typing import Any


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def run_one(track: str, cfg_json: dict[str, Any], threads: int, provenance: dict[str, Any]) -> dict[str, Any]:
    """Train and measure one config; returns ``{"ok": True, "summary": ..., "columns": ...}`` or
    ``{"ok": False, "error": ...}``."""
    started = now_iso()
    t0 = time.perf_counter()
    out: dict[str, Any] = {"started": started, "host": socket.gethostname(), "pid": os.getpid(), "threads": threads}
    try:
        from mrplab.io import jsonable
        from mrplab.sweep import tracks

        tr = tracks.get(track)
        cfg = tr.config.model_validate({**cfg_json, "threads": threads})
        key = provenance["config_hash"]  # the store's key, from the driver: threads as the sweep gave them
        summary = jsonable(tr.run(cfg, key, {**provenance, "created": started}))
        out.update(ok=True, summary=summary, columns=tr.columns(summary))
    except Exception as err:  # noqa: BLE001 - a failed run is data for the store, not a crash of the sweep
        from mrplab.errors import MrplabError

        text = err.line() if isinstance(err, MrplabError) else f"{type(err).__name__}: {err}"
        out.update(ok=False, error=text, traceback=traceback.format_exc(limit=20))
    out["finished"] = now_iso()
    out["wall_s"] = time.perf_counter() - t0
    return out
