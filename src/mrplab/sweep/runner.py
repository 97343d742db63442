"""The sweep driver: plan the runs into the store, execute what is not done, record every outcome.

    <out>/<name>/
      sweep.yaml        the sweep as last started here (base resolved inline)
      results.sqlite    the store (sweep/store.py), one row per run
      .lock             held while a driver runs, so two drivers never share a folder

Resume: a run whose row is ``done`` is skipped; ``pending``, ``running`` (a
driver was killed while it ran) and ``failed`` runs execute again. A changed
sweep file adds rows for its new runs and leaves the old rows alone. Each
finished run is written in its own transaction, so Ctrl-C or SIGKILL of the
driver loses only the runs that were still in flight.
"""

from __future__ import annotations

import contextlib
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from mrplab.errors import MrplabError
from mrplab.io import atomic_write_text, command_line, git_commit
from mrplab.sweep import executors, tracks
from mrplab.sweep.spec import PlannedRun, Sweep
from mrplab.sweep.store import DB_NAME, Store
from mrplab.sweep.worker import now_iso, run_one

try:
    import fcntl
except ImportError:  # not POSIX: no folder lock
    fcntl = None  # type: ignore[assignment]


class Progress(Protocol):
    def start(self, total: int, done_before: int, todo: int, executor: str) -> None: ...
    def run_finished(self, run: PlannedRun, out: dict[str, Any]) -> None: ...
    def tick(self) -> None: ...


class _Silent:
    def start(self, total: int, done_before: int, todo: int, executor: str) -> None:
        pass

    def run_finished(self, run: PlannedRun, out: dict[str, Any]) -> None:
        pass

    def tick(self) -> None:
        pass


@dataclass
class SweepOutcome:
    folder: Path
    planned: int  # runs of this sweep file
    skipped: int  # already done before this call
    executed: int  # runs executed by this call
    failed: list[str]  # keys of this sweep's runs that are failed after this call
    executor: str | None  # what ran them (None when nothing was left to run)


def sweep_folder(out: str | Path, sweep: Sweep) -> Path:
    return Path(out) / sweep.name


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    fh = open(folder / ".lock", "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise MrplabError(f"another `mrplab sweep` is running in {folder}",
                              "wait for it to finish or stop it; it resumes from the store") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()


def run_sweep(
    sweep: Sweep,
    out: str | Path = "sweeps",
    executor: str = "local",
    address: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    run_fn: Callable[[str, dict[str, Any], int, dict[str, Any]], dict[str, Any]] = run_one,
    folder: str | Path | None = None,
) -> SweepOutcome:
    """Execute every run of ``sweep`` that is not done yet in ``<out>/<name>/`` (or ``folder``)."""
    progress = progress or _Silent()
    folder = Path(folder) if folder is not None else sweep_folder(out, sweep)
    if workers is not None and workers < 1:
        raise MrplabError(f"--workers must be at least 1 (got {workers})", "e.g. --workers 2")
    if executor not in ("local", "ray"):
        raise MrplabError(f"unknown executor '{executor}'", "use --executor local or --executor ray")
    if address and executor != "ray":
        raise MrplabError("--address only applies to --executor ray", "drop --address or add --executor ray")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MrplabError(f"cannot create the sweep folder {folder}: {err.strerror or err}", "choose a writable --out") from None
    with folder_lock(folder), Store(folder / DB_NAME) as store:
        atomic_write_text(folder / "sweep.yaml", sweep.to_yaml())
        store.plan(sweep.name, sweep.runs)
        status = store.statuses()
        todo = [r for r in sweep.runs if status.get(r.key) != "done"]
        done_before = len(sweep.runs) - len(todo)
        executed, desc = 0, None
        if todo:
            ex = executors.make_executor(executor, len(todo), workers, address)
            desc = ex.describe()
            progress.start(len(sweep.runs), done_before, len(todo), desc)
            executed = _drive(ex, store, todo, progress, run_fn, folder)
        status = store.statuses()
        failed = [r.key for r in sweep.runs if status.get(r.key) == "failed"]
    return SweepOutcome(folder=folder, planned=len(sweep.runs), skipped=done_before, executed=executed,
                        failed=failed, executor=desc)


def _next_run(queue: deque, leading: set[str], started: set[str]) -> PlannedRun | None:
    """The next run that may start: the first of its group starts alone; the rest of a group wait until it
    has finished (it did the shared work, or failed and they do it themselves)."""
    for i, run in enumerate(queue):
        if run.group is None or (run.group not in leading and run.group in started):
            del queue[i]
            return run
        if run.group not in started:
            started.add(run.group)
            leading.add(run.group)
            del queue[i]
            return run
    return None


def _drive(ex: Any, store: Store, todo: list[PlannedRun], progress: Progress, run_fn: Callable[..., Any],
           folder: Path) -> int:
    provenance = {"git_commit": git_commit(), "command": command_line(), "runs_dir": str(folder.resolve() / "runs")}
    queue = deque(todo)
    leading: set[str] = set()  # groups whose first run is in flight
    started: set[str] = set()
    in_flight: dict[Future, PlannedRun] = {}
    executed = 0
    clean = False
    try:
        while queue or in_flight:
            while queue and len(in_flight) < ex.slots:
                run = _next_run(queue, leading, started)
                if run is None:
                    break
                store.mark_running(run.key, now_iso(), ex.threads)
                cfg_json = tracks.get(run.track).prepare(run.cfg.model_dump(mode="json"), folder)
                in_flight[ex.submit(run_fn, run.track, cfg_json, ex.threads, {**provenance, "config_hash": run.key})] = run
            done, _ = wait(list(in_flight), timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in done:
                run = in_flight.pop(fut)
                leading.discard(run.group)
                try:
                    out = fut.result()
                except Exception as err:  # noqa: BLE001 - the worker died (killed, out of memory, lost node) or raised
                    out = {"ok": False, "error": f"{type(err).__name__}: {err}", "finished": now_iso()}
                store.finish(run.key, out)
                executed += 1
                progress.run_finished(run, out)
            progress.tick()
        clean = True
    finally:
        if not clean:  # Ctrl-C, SIGTERM or an internal error: what was in flight runs again next time
            store.reset_running()
        ex.close(cancel=not clean)
    return executed
