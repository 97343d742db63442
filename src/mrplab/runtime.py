"""How a run uses the machine: threads, precision and compilation, chosen by measurement.

Ground floor: imports nothing of mrplab but ``errors``.

- **threads**: a run takes its share of the cores actually available to the
  process (affinity mask and cgroup quota), divided among the mrplab processes
  running on the machine at the time; the share is re-read while the run goes
  on (``CoreShare.refresh``), so two runs started on one machine never hold
  more threads than there are cores (oversubscribed OpenMP threads spin and
  slowed concurrent runs ~30x).
- **precision auto**: bf16 only where the device runs it natively (CPU flags
  avx512_bf16 / amx_bf16, or a CUDA device with bf16) *and* a short probe at
  the run's own matmul shapes (fp32 and bf16 in turn) measures it clearly
  faster than fp32 (some CPUs with native bf16 instructions still run fp32
  matmuls faster).
- **compile auto**: fused elementwise kernels (theory/native.py's C++ on the
  CPU, torch.compile on CUDA) only where a compiler works and the run is long
  enough for the measured per-step saving to repay the measured build or
  compile time.

Probe results are cached in ``<cache>/runtime.json`` keyed by device model,
torch version, threads and shapes, so later runs on the machine measure
nothing. The cache folder is ``$MRPLAB_CACHE_DIR``, else
``$XDG_CACHE_HOME/mrplab``, else ``~/.cache/mrplab``. Every choice comes with
the reason, which the run folder records.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from mrplab.errors import MrplabError

# bf16 must beat fp32 by this factor at the run's shapes to be chosen: it gives up 16 mantissa bits
BF16_MIN_SPEEDUP = 1.15
CACHE_VERSION = 1
# the matmul probe's calls of one precision in a row before the next precision's (runtime.best_times): its
# first call after the other precision's refills the cache, the later ones run hot as the limit is meant
PROBE_BURST = 3
# below this much eager elementwise work in a run, fusing is not worth a probe (torch.compile with warm caches ~1 s)
MIN_COMPILE_S = 2.0


# --------------------------------------------------------------------------- device


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise MrplabError("device 'cuda' was asked for but no CUDA device is available", "use device=cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- the cache


def cache_dir() -> Path:
    if os.environ.get("MRPLAB_CACHE_DIR"):
        return Path(os.environ["MRPLAB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mrplab"


def _cache_file() -> Path:
    return cache_dir() / "runtime.json"


def _cache_blob(path: Path) -> dict:
    """The cache file's contents, or an empty cache where it is missing, unreadable, of another version or
    damaged (a probe then measures again and the next write replaces it)."""
    try:
        blob = json.loads(path.read_text())
    except (OSError, ValueError):
        blob = None
    if not isinstance(blob, dict) or blob.get("version") != CACHE_VERSION or not isinstance(blob.get("entries"), dict):
        return {"version": CACHE_VERSION, "entries": {}}
    return blob


def cache_read(key: str) -> dict | None:
    entry = _cache_blob(_cache_file())["entries"].get(key)
    return entry if isinstance(entry, dict) else None


def _number(v: Any, zero_ok: bool = False) -> bool:
    """Whether a cached value is a finite positive number (or 0 with ``zero_ok``); a damaged entry is measured
    again."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or zero_ok and v == 0)


def cache_write(key: str, entry: dict) -> None:
    """Merge one entry into the cache file (atomic rename; an unwritable cache is skipped silently)."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = _cache_blob(path)
        blob["entries"][key] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".runtime.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(blob, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


# --------------------------------------------------------------------------- the machine


def cpu_info() -> dict[str, Any]:
    """CPU model and flags (Linux /proc/cpuinfo; elsewhere the platform's name and no flags)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "model name" and val.strip():
                model = val.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(val.split())
    except OSError:
        pass
    return {"model": model, "flags": flags, "capability": torch.backends.cpu.get_cpu_capability()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_info()["model"]


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Does the device compute in bf16 natively? (answer, what showed it)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"{device_name(device)} {'supports' if ok else 'does not support'} bf16 natively"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and isa != "ALL" and not any(x in isa for x in ("BF16", "AMX", "FP16", "AVX10")):
        return False, f"ONEDNN_MAX_CPU_ISA={isa} limits torch's CPU matmuls to an ISA without bf16: bf16 would be emulated"
    info = cpu_info()
    have = sorted(info["flags"] & {"avx512_bf16", "amx_bf16"})
    if have:
        return True, f"CPU flags {', '.join(have)}"
    if info["capability"] == "AMX" or "AMX" in str(info["capability"]):
        return True, f"torch CPU capability {info['capability']}"
    return False, f"no avx512_bf16 or amx_bf16 CPU flag (torch CPU capability {info['capability']}): bf16 would be emulated"


def available_cores() -> tuple[int, str]:
    """Cores this process may use: the affinity mask, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
        why = f"{n} cores in the affinity mask"
    except AttributeError:
        n = os.cpu_count() or 1
        why = f"{n} cores"
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            q = max(1, math.ceil(int(quota) / int(period)))
            if q < n:
                n, why = q, f"cgroup CPU quota of {q} cores"
    except (OSError, ValueError):
        pass
    return n, why


# --------------------------------------------------------------------------- threads


def _start_time(pid: int) -> str | None:
    """The process's start time (Linux), to tell a live mrplab process from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started is None or _start_time(pid) in (None, started)


class CoreShare:
    """This process's share of the cores among the mrplab processes running on the machine.

    Each process that computes registers a file ``<cache>/procs/<pid>``; its
    share is ``max(1, cores // live processes)``, re-read by ``refresh`` at most
    every ``interval`` seconds. ``requested`` (the config's ``threads``) fixes
    the count instead (sweep workers are given theirs by the executor); such a
    process still registers, so that the others leave it its share.
    """

    def __init__(self, requested: int | None = None, interval: float = 0.5):
        self.requested, self.interval = requested, interval
        self.cores, self.cores_why = available_cores()
        self.threads = 0
        self.reason = ""
        self.seen: list[int] = []
        self._next = 0.0
        self._file: Path | None = None
        try:  # registered even with fixed threads, so that the others count this process
            folder = cache_dir() / "procs"
            folder.mkdir(parents=True, exist_ok=True)
            self._file = folder / str(os.getpid())
            self._file.write_text(_start_time(os.getpid()) or "")
        except OSError:
            self._file = None
        self.refresh(force=True)

    def _live(self) -> int:
        if self._file is None:
            return 1
        n = 0
        for f in self._file.parent.iterdir():
            if not f.name.isdigit():
                continue
            try:
                started = f.read_text().strip() or None
            except OSError:
                continue
            if _alive(int(f.name), started):
                n += 1
            else:
                f.unlink(missing_ok=True)
        return max(n, 1)

    def refresh(self, force: bool = False) -> int:
        now = time.monotonic()
        if not force and now < self._next:
            return self.threads
        self._next = now + self.interval
        if self.requested is not None:
            want, reason = self.requested, "set by the config (threads)"
        else:
            live = self._live()
            want = max(1, self.cores // live)
            reason = f"{self.cores_why}, shared by {live} running mrplab process{'es' if live > 1 else ''}"
        if want != self.threads:
            torch.set_num_threads(want)
            self.threads, self.reason = want, reason
            self.seen.append(want)
        return self.threads

    def close(self) -> None:
        if self._file is not None:
            self._file.unlink(missing_ok=True)
            self._file = None

    def __enter__(self) -> "CoreShare":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def record(self) -> dict[str, Any]:
        return {"threads": self.threads, "threads_reason": self.reason, "threads_seen": sorted(set(self.seen)),
                "cores": self.cores}


# --------------------------------------------------------------------------- matmul probe


def best_time(fn: Callable[[], Any], budget_s: float, sync: Callable[[], None] = lambda: None) -> float:
    """Best wall seconds of fn over at least 3 calls and up to budget_s (after one warm-up call)."""
    return best_times([fn], budget_s, sync)[0]


def best_times(fns: list[Callable[[], Any]], budget_s: float, sync: Callable[[], None] = lambda: None,
               burst: int = 1) -> list[float]:
    """Best wall seconds of each of fns, called in turn (``burst`` calls of each per round) for at least 3 rounds
    and up to budget_s or 50 calls each (after one warm-up call of each). In turn, a shared machine's drift
    during the measurement reaches every function alike, so their ratio holds where measuring one after the
    other would not; a burst lets a function's later calls find its data in cache again after the others ran."""
    for fn in fns:
        fn()
        sync()
    best, t_end, rounds = [float("inf")] * len(fns), time.perf_counter() + budget_s, 0
    while rounds < 3 or (time.perf_counter() < t_end and rounds * burst < 50):
        for i, fn in enumerate(fns):
            for _ in range(burst):
                t0 = time.perf_counter()
                fn()
                sync()
                best[i] = min(best[i], time.perf_counter() - t0)
        rounds += 1
    return best


def dtype_of(precision: str) -> torch.dtype:
    """The tensor dtype of a precision name (fp32 | bf16)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def weight_grad_reads_a_copy(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the engine's weight gradient X^T dZ reads a transposed copy of X rather than a view:
    bf16 on the CPU, where oneDNN took 1.47 ms from the view and 0.84 ms from the copy (X [16000, 300],
    K = 80, 2 threads, AMX); in fp32 the view was as fast (3.06 vs 3.44 ms), so no copy is kept."""
    return dtype == torch.bfloat16 and device.type == "cpu"


def matmul_gflops(shapes: Iterable[tuple[int, int, int]], dtype: torch.dtype, device: torch.device,
                  budget_s: float = 0.3, autocast: bool = False) -> float:
    """GFLOP/s of a training matmul pair at each shape (m, k, n) in one precision: matmul_rates of one dtype."""
    return matmul_rates(shapes, [dtype], device, budget_s, autocast)[0]


def matmul_rates(shapes: Iterable[tuple[int, int, int]], dtypes: list[torch.dtype], device: torch.device,
                 budget_s: float = 0.3, autocast: bool = False) -> list[float]:
    """GFLOP/s per dtype of a training matmul pair at each shape (m, k, n): forward Z[m, n] = X[m, k] @ W[k, n]
    and weight gradient dW[k, n] = X^T dZ. Each rate is total FLOPs / total best time.

    The dtypes' pairs run in turn at each shape (runtime.best_times, in bursts of PROBE_BURST calls, budget_s
    per dtype and shape), so the ratio that precision auto decides on does not depend on when a shared machine
    slowed down (benchmarks/probe_drift.py on a 2-core AMD EPYC, eight probes of each kind: bf16 / fp32 read
    3.17x to 3.99x in turn, 2.65x to 4.14x one after the other).

    As the theory engine runs it (default): X, Z and dZ in the dtype (its elementwise kernels read
    and write them so), X^T a transposed copy where ``weight_grad_reads_a_copy``, W and dW converted
    from and to fp32. ``autocast``: as torch.autocast runs a layer (the vision track), Z and dW
    converted to fp32 and dZ from fp32, with X^T a view.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator(device="cpu").manual_seed(0)
    flops, secs = 0.0, [0.0] * len(dtypes)
    for m, k, n in shapes:
        X32, W = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g).to(device)
        dZ32 = torch.randn(m, n, generator=g)
        pairs = [_pair(X32.to(device, dtype), W, dZ32, dtype, device, autocast) for dtype in dtypes]
        for i, t in enumerate(best_times(pairs, budget_s * len(pairs), sync, burst=PROBE_BURST)):
            secs[i] += t
        flops += 4.0 * m * k * n
    return [flops / t / 1e9 for t in secs]


def _pair(X: torch.Tensor, W: torch.Tensor, dZ32: torch.Tensor, dtype: torch.dtype, device: torch.device,
          autocast: bool) -> Callable[[], None]:
    """One forward and weight-gradient matmul pair in ``dtype`` (matmul_rates)."""
    if autocast:
        dZ = dZ32.to(device)

        def pair() -> None:
            (X @ W.to(dtype)).float()
            (X.t() @ dZ.to(dtype)).float()
        return pair
    XT = X.t().contiguous() if weight_grad_reads_a_copy(dtype, device) else X.t()
    dZ = dZ32.to(device, dtype)

    def pair() -> None:
        X @ W.to(dtype)
        (XT @ dZ).float()
    return pair


# --------------------------------------------------------------------------- choices


@dataclass
class Choice:
    """What a run uses, and why (written to the run folder)."""

    precision: str
    precision_reason: str
    compile: bool
    compile_reason: str
    matmul_gflops: dict[str, float] = field(default_factory=dict)  # measured at the run's shapes, per precision

    @property
    def limit_gflops(self) -> float | None:
        """The matmul limit at the chosen precision, at the run's shapes."""
        return self.matmul_gflops.get(self.precision)

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out["matmul_limit_gflops"] = self.limit_gflops
        return out


def _key(device: torch.device, *parts: Any) -> str:
    """Cache key: what a measurement depends on. On the CPU that includes the instruction sets torch may use:
    its capability (ATEN_CPU_CAPABILITY can lower it) and the caps of oneDNN (bf16 matmuls,
    ONEDNN_MAX_CPU_ISA) and MKL (fp32 matmuls, MKL_ENABLE_INSTRUCTIONS)."""
    caps = "/".join(os.environ.get(v, "ALL").upper() for v in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"))
    isa = [] if device.type == "cuda" else [f"isa {torch.backends.cpu.get_cpu_capability()}/{caps}"]
    return " | ".join([device_name(device), f"torch {torch.__version__}", *isa,
                       f"threads {torch.get_num_threads()}", *map(str, parts)])


def measure_matmuls(device: torch.device, shapes: list[tuple[int, int, int]], dtypes: Iterable[str],
                    autocast: bool = False) -> tuple[dict[str, float], str]:
    """(GFLOP/s per precision at these shapes, where they come from), from the cache or measured now (and
    cached). Where any precision asked for is not cached, all of them are measured again in one interleaved
    probe (matmul_rates) whose rates replace the entry, so the rates compared are always from one moment."""
    # the probe's method is part of the key: rates from an older method (precisions one after the other) are
    # measured again once
    key = _key(device, "matmul, interleaved" if autocast else "matmul pair as the theory engine runs it, interleaved",
               shapes)
    dtypes = list(dtypes)
    entry = cache_read(key) or {}
    if all(_number(entry.get(p)) for p in dtypes):
        when = entry.get("measured")
        # no path: a run folder (and a benchmark's record of it) names no folder of the machine it ran on
        return {p: float(entry[p]) for p in dtypes}, f"probe{f' of {when}' if isinstance(when, str) else ''}, cached"
    rates = dict(zip(dtypes, matmul_rates(shapes, [dtype_of(p) for p in dtypes], device, autocast=autocast)))
    # the entry holds one probe's rates only: a rate from another moment is not compared with these
    cache_write(key, {**rates, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return rates, "probed now"


def choose_precision(requested: str, device: torch.device, shapes: list[tuple[int, int, int]],
                     native: Callable[[torch.device], tuple[bool, str]] = native_bf16, autocast: bool = False,
                     ) -> tuple[str, str, dict[str, float]]:
    """(precision, reason, measured GFLOP/s per precision) for ``requested`` in auto | fp32 | bf16;
    ``autocast``: the matmuls as torch.autocast runs them (matmul_rates)."""
    if requested != "auto":
        rates, _ = measure_matmuls(device, shapes, [requested], autocast)
        return requested, "set by the config (precision)", rates
    ok, why = native(device)
    if not ok:
        return "fp32", f"auto: {why}", measure_matmuls(device, shapes, ["fp32"], autocast)[0]
    rates, source = measure_matmuls(device, shapes, ["fp32", "bf16"], autocast)
    ratio = rates["bf16"] / rates["fp32"]
    meas = (f"bf16 {rates['bf16']:.0f} vs fp32 {rates['fp32']:.0f} GFLOP/s ({ratio:.2f}x) at this run's matmul "
            f"shapes, {torch.get_num_threads()} threads ({source})")
    if ratio >= BF16_MIN_SPEEDUP:
        return "bf16", f"auto: native bf16 ({why}) and {meas}", rates
    return "fp32", f"auto: {why} but {meas}, under the {BF16_MIN_SPEEDUP}x that bf16 must gain", rates


def _compile_entry_ok(entry: dict) -> bool:
    """A cached compile probe: a failure, or a success with its timings."""
    return entry.get("works") is False or (entry.get("works") is True and _number(entry.get("eager_ms"))
                                           and _number(entry.get("compiled_ms"))
                                           and _number(entry.get("compile_s"), zero_ok=True))


def choose_compile(requested: bool | str, device: torch.device, key: Any, calls: int,
                   time_eager: Callable[[], float], time_compiled: Callable[[], tuple[float, float]],
                   ) -> tuple[bool, str, bool]:
    """Compile or not, why, and whether the compile probe ran (and so compiled) in this process.

    ``time_eager()`` is the eager function's ms per call at this run's shape;
    ``time_compiled()`` compiles it and returns (ms per call, seconds the first
    compile took), or raises when compiling fails. The probe runs once per
    machine, shape and torch version (then the cache answers), and only when
    the run has enough elementwise work to save at least the cheapest compile
    (``MIN_COMPILE_S``). Compile when ``calls`` x the per-call saving exceeds the
    compile time: the latest one measured (torch's on-disk caches make a later
    compile of the same shape cheaper, and runs record what they paid), or
    nothing when the probe just compiled it in this process.
    """
    if isinstance(requested, bool):
        return requested, "set by the config (compile)", False
    ckey = _key(device, "compile", key)
    entry, probed = cache_read(ckey), False
    if entry is not None and not _compile_entry_ok(entry):
        entry = None  # damaged: probe again
    if entry is None:
        eager_ms = time_eager()
        if calls * eager_ms / 1e3 < MIN_COMPILE_S:
            return False, (f"auto: run too short to repay compiling: {calls} calls x {eager_ms:.2f} ms of eager "
                           f"elementwise work = {calls * eager_ms / 1e3:.1f} s in all"), False
        try:
            compiled_ms, compile_s = time_compiled()
        except Exception as err:  # noqa: BLE001 - any compiler failure means: do not compile
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            entry = {"works": False, "error": first}
        else:
            entry = {"works": True, "eager_ms": eager_ms, "compiled_ms": compiled_ms, "compile_s": compile_s}
            probed = True
        cache_write(ckey, entry)
    if not entry.get("works"):
        return False, f"auto: compiling the fused kernels does not work here ({entry.get('error')})", False
    saving_s = calls * (entry["eager_ms"] - entry["compiled_ms"]) / 1e3
    cost_s = 0.0 if probed else float(entry["compile_s"])
    facts = (f"{calls} calls x ({entry['eager_ms']:.2f} eager - {entry['compiled_ms']:.2f} compiled ms) = "
             f"{saving_s:.1f} s saved vs {cost_s:.1f} s to compile"
             + (f" (compiled by the probe just now in {entry['compile_s']:.1f} s)" if probed else ""))
    if saving_s > cost_s:
        return True, f"auto: {facts}", probed
    return False, f"auto: run too short to repay compiling: {facts}", probed


def note_compile_cost(device: torch.device, key: Any, compile_s: float) -> None:
    """Record what compiling cost this run (warm on-disk caches make it cheaper than the first time)."""
    ckey = _key(device, "compile", key)
    entry = cache_read(ckey)
    if entry and entry.get("works"):
        entry["compile_s"] = round(compile_s, 3)
        cache_write(ckey, entry)


def keep_freed_memory() -> str:
    """Let glibc keep freed blocks for reuse instead of returning them to the system.

    A step allocates and frees several buffers of megabytes; by default glibc
    unmaps blocks over its (adaptive, at most 32 MiB) mmap threshold and trims
    the heap top, so every step page-faults its buffers back in (measured: the
    eager SL step at the default config 50 -> 39 ms). The process then holds
    its peak heap until it exits. No-op off glibc. Returns what was done.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "default allocator (not glibc)"
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 31)
    except (OSError, AttributeError):
        return "default allocator (mallopt unavailable)"
    return "glibc keeps freed blocks (mmap threshold 1 GiB, trim threshold 2 GiB)" if ok else "mallopt refused"


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (always, madvise or never), None where there is none."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        return text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        return None


def huge_pages() -> str:
    """Whether torch backs CPU tensors of 2 MiB and more with transparent huge pages (THP_MEM_ALLOC_ENABLE,
    which the CLI sets before importing torch; torch reads it once) and what the kernel allows."""
    mode = _thp_mode()
    if mode is None:
        return "no transparent huge pages (not Linux, or not readable)"
    if mode == "always":
        return "transparent huge pages: always (the kernel's setting; torch need not ask)"
    if mode == "never":
        return "transparent huge pages: never (the kernel's setting)"
    asked = os.environ.get("THP_MEM_ALLOC_ENABLE", "").strip() == "1"  # torch reads 0 or 1
    return (f"transparent huge pages: {mode}; " +
            ("torch asks for them for tensors >= 2 MiB (THP_MEM_ALLOC_ENABLE=1)" if asked else
             "torch does not ask for them (THP_MEM_ALLOC_ENABLE unset or off)"))


def use_persistent_compile_cache() -> None:
    """Keep torch.compile's on-disk caches under mrplab's cache folder (not /tmp, which reboots wipe),
    unless the user chose a folder; a later process then loads a compiled kernel instead of building it."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


# --------------------------------------------------------------------------- FLOP counting


class FlopCounter:
    """Matmul FLOPs the engine performed (2 m k n per product), by the shape (m, k, n) of the product that
    ran: the machine's rate differs by shape, so a run's ideal time is the sum over its shapes of FLOPs / rate
    (benchmarks/theory_walltime.py)."""

    def __init__(self) -> None:
        self.by_shape: dict[tuple[int, int, int], int] = {}

    @property
    def total(self) -> int:
        return sum(self.by_shape.values())

    def add(self, m: int, k: int, n: int, times: int = 1) -> None:
        self.by_shape[m, k, n] = self.by_shape.get((m, k, n), 0) + 2 * m * k * n * times

    def since(self, before: dict[tuple[int, int, int], int]) -> dict[tuple[int, int, int], int]:
        """FLOPs by shape counted after ``before`` (a copy of ``by_shape`` taken then)."""
        return {shape: f - before.get(shape, 0) for shape, f in self.by_shape.items() if f != before.get(shape, 0)}


matmul_flops = FlopCounter()
