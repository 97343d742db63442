"""Where sweep runs execute: a local process pool or a Ray cluster, behind one small interface.

An executor has ``slots`` (runs at once), ``threads`` (torch threads per
run, so that slots x threads never oversubscribes the cores), ``submit(fn,
*args) -> concurrent.futures.Future``, ``describe()`` and ``close(cancel)``.
The driver keeps at most ``slots`` runs in flight, so a run marked running in
the store is really running.

* ``LocalExecutor``: ``ProcessPoolExecutor`` with the 'spawn' start method;
  workers = min(runs, cores) unless given, threads = max(1, cores // workers).
  Workers ignore SIGINT (the driver handles Ctrl-C and stops them) and exit
  on their own when the driver disappears (SIGKILL), so no orphan keeps
  computing.
* ``RayExecutor``: ``ray.init(address=...)`` attaches to a running cluster;
  without an address Ray starts locally with ``num_cpus = cores``. Each run is
  a ``@ray.remote`` task with ``num_cpus = threads``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from mrplab.errors import MrplabError


def cpu_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def plan_slots(n_runs: int, workers: int | None, cores: int) -> tuple[int, int]:
    """(runs at once, torch threads per run) for ``n_runs`` runs on ``cores`` cores."""
    slots = workers if workers is not None else max(1, min(n_runs, cores))
    return slots, max(1, cores // slots)


# --------------------------------------------------------------------------- local


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)  # the driver is gone: stop computing a result nobody will store


def _init_worker(threads: int, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="watch-driver").start()


class LocalExecutor:
    kind = "local"

    def __init__(self, n_runs: int, workers: int | None = None):
        self.cores = cpu_cores()
        self.slots, self.threads = plan_slots(n_runs, workers, self.cores)
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.slots,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.threads, os.getpid()),
        )

    def describe(self) -> str:
        return f"local pool: {self.slots} workers x {self.threads} threads on {self.cores} cores"

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        try:
            return self._pool.submit(fn, *args)
        except BrokenProcessPool:  # a worker died (killed, out of memory): its run is failed, go on with a new pool
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            return self._pool.submit(fn, *args)

    def close(self, cancel: bool = False) -> None:
        if not cancel:
            self._pool.shutdown(wait=True)
            return
        # ProcessPoolExecutor cannot stop a running task: kill the workers (their runs stay "pending" in the store)
        procs = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)


# --------------------------------------------------------------------------- ray


def _check_reachable(address: str) -> None:
    """Fail fast on a HOST:PORT nobody listens on (``ray.init`` would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", ray:// client addresses: leave them to Ray
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise MrplabError(f"cannot reach the Ray head at {address}: {err.strerror or err}",
                          "start it with `ray start --head --port=6379` and check the address") from None


def _use_token_if_available() -> bool:
    """Token authentication for an explicit ``--address``, as ``ray start`` decides it for the head.

    Ray >= 2.5x starts a head with token authentication when a token exists (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), but a driver turns it on by itself only for ``address="auto"``:
    with an explicit address it would connect without the token and the head would refuse it
    (InvalidAuthToken). Returns whether token mode is on (always False for a Ray without authentication)."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return False
    return bool(maybe_enable_token_auth_if_token_available(warn_if_disabled=False))


def _attach_error(err: Exception, address: str | None, token: bool) -> MrplabError:
    """One line naming Ray's own reason (its exception type and message) and the likely fix."""
    reason = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    if not address:
        return MrplabError(f"cannot start a local Ray instance ({reason})", "check `ray status`, or use --executor local")
    if "auth" in reason.lower() or "token" in reason.lower() or type(err).__name__ == "AuthenticationError":
        fix = ("the head uses token authentication: on the head run `ray get-auth-token` and export RAY_AUTH_TOKEN=<it> "
               "here (or copy its ~/.ray/auth_token)" if not token else
               "the token found here is not the head's: export RAY_AUTH_TOKEN=$(ray get-auth-token) from the head")
    else:
        fix = ("start the head with `ray start --head --port=6379`, pass --address HOST:6379; a head started with a token "
               "needs RAY_AUTH_TOKEN here too (docs/sweeps.md)")
    return MrplabError(f"cannot attach to the Ray cluster at {address} ({reason})", fix)


class RayExecutor:
    kind = "ray"

    def __init__(self, n_runs: int, workers: int | None = None, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise MrplabError("the ray executor needs Ray, which is not installed", "pip install 'ray>=2.9'") from None
        import logging

        self._ray = ray
        self._owned = False
        if not ray.is_initialized():
            token = False
            if address:
                _check_reachable(address)
                token = _use_token_if_available()
            try:
                if address:
                    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
                else:
                    ray.init(num_cpus=cpu_cores(), include_dashboard=False, logging_level=logging.WARNING,
                             log_to_driver=False)
            except Exception as err:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, its own RayErrors
                raise _attach_error(err, address, token) from None
            self._owned = True
        self.address = address or "local"
        resources = ray.cluster_resources()
        self.cores = max(1, int(resources.get("CPU", 1)))
        node_cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        self.slots, threads = plan_slots(n_runs, workers, self.cores)
        self.threads = max(1, min(threads, max(node_cpus, default=1)))  # a task must fit on one node
        self._remote: dict[Callable[..., Any], Any] = {}
        self._refs: list[Any] = []

    def describe(self) -> str:
        return f"ray ({self.address}): {self.slots} runs at once x {self.threads} threads, {self.cores} CPUs in the cluster"

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self._ray.remote(num_cpus=self.threads, max_retries=0)(fn)
        ref = remote.remote(*args)
        self._refs.append(ref)
        if len(self._refs) > 4 * self.slots:
            _, self._refs = self._ray.wait(self._refs, num_returns=len(self._refs), timeout=0)
        return ref.future()

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for ref in self._refs:
                try:
                    self._ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - already finished or gone
                    pass
        self._refs = []
        if self._owned:
            self._ray.shutdown()


def make_executor(kind: str, n_runs: int, workers: int | None = None, address: str | None = None):
    if kind == "local":
        if address:
            raise MrplabError("--address only applies to --executor ray", "drop --address or add --executor ray")
        return LocalExecutor(n_runs, workers)
    if kind == "ray":
        return RayExecutor(n_runs, workers, address)
    raise MrplabError(f"unknown executor '{kind}'", "use --executor local or --executor ray")
