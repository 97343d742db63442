"""The step's fused elementwise kernels on the CPU: patch_kernels.cpp, built once per machine.

Six small C++ functions (no torch headers) compiled with the system C++ compiler
into a shared library under ``<cache>/kernels/`` and called through ctypes. The
library's name hashes its source, the compiler and the flags, so a changed
source or instruction set builds anew, and machines that share a cache folder
keep their builds apart. Instruction sets follow torch's own CPU capability
(``ATEN_CPU_CAPABILITY`` caps both). Compared with torch.compile's fused
kernels for the same two functions (benchmarks/patch_kernels.py), a process
skips importing and setting up the compiler stack and loading one graph per
shape (~5 s per run with warm caches), and each call skips the compiled
graph's guards and wrappers.

OpenMP: torch's wheels ship ``libgomp.so.1``; the library links the same soname,
so the loader hands it the runtime torch already loaded, and the two share one
thread pool (the thread count is passed on every call).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from mrplab import runtime

SOURCE = Path(__file__).with_name("patch_kernels.cpp")
_I64, _INT, _F32, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_LAYOUT = [_PTR, _INT, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _PTR]  # Z, bf16, R, N, P, K, strides, keep
_DTYPES = (torch.float32, torch.bfloat16)


class BuildError(RuntimeError):
    """The kernels cannot be built here (no C++ compiler, or it failed)."""


def compiler() -> str:
    """The C++ compiler: $CXX, else c++, g++ or clang++ on the PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise BuildError("no C++ compiler found (install g++ or set CXX)")


def isa_flags() -> list[str]:
    """Instruction-set flags for torch's CPU capability (what torch's own kernels use on this machine)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith("AVX512"):
        return ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                "-mprefer-vector-width=512"]
    if cap == "AVX2":
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def flag_sets() -> list[list[str]]:
    """Compiler flags to try in order: with OpenMP, then without (one thread per call; a compiler that
    lacks OpenMP, such as Apple's clang, still builds the vectorised loops)."""
    base = ["-O3", "-shared", "-fPIC", "-std=c++17", *isa_flags()]
    return [[*base, "-fopenmp"], [*base, "-fopenmp-simd"]]


def kernel_dir() -> Path:
    """``<cache>/kernels``, or where that cannot be written, a folder in the system's temporary directory."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    for folder in (runtime.cache_dir() / "kernels", Path(tempfile.gettempdir()) / f"mrplab-kernels-{uid}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise BuildError("no writable folder for the fused kernels (set MRPLAB_CACHE_DIR to one)")


def library_path(cxx: str, flags: list[str]) -> tuple[Path, list[str]]:
    """Where the build for this source, compiler and flags lives, and the command that builds it."""
    tag = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), cxx.encode(), " ".join(flags).encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    return kernel_dir() / f"patch_kernels-{tag}.so", [cxx, *flags, str(SOURCE), "-o"]


def build(path: Path, command: list[str]) -> None:
    """Compile to a temporary file beside ``path`` and rename it in place (concurrent builds are safe)."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".build.", suffix=".so")
        os.close(fd)
        out = subprocess.run([*command, tmp], capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            lines = (out.stderr or out.stdout).strip().splitlines() or [f"exit code {out.returncode}"]
            raise BuildError(f"{Path(command[0]).name} failed: {lines[0][:200]}")
        os.replace(tmp, path)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BuildError(f"building the fused kernels failed: {err}") from err
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def library() -> ctypes.CDLL:
    """The loaded kernels, built first if this machine has no build of the current source; raises
    BuildError where they cannot be built (once per process: a failed build is not retried)."""
    lib = _load()
    if isinstance(lib, BuildError):
        raise lib
    return lib


def _open(path: Path, command: list[str]) -> ctypes.CDLL:
    """Load a build; one that does not load (damaged, or from another system) is built anew once."""
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        build(path, command)
        try:
            return ctypes.CDLL(str(path))
        except OSError as err:
            raise BuildError(f"loading the fused kernels failed: {err}") from err


@functools.cache
def _load() -> ctypes.CDLL | BuildError:
    try:
        cxx = compiler()
        builds = [library_path(cxx, flags) for flags in flag_sets()]
        existing = [(path, cmd) for path, cmd in builds if path.exists()]
        failures: list[BuildError] = []
        for path, cmd in existing[:1] or builds:  # a build already there, else the first that builds
            if not existing:
                try:
                    build(path, cmd)
                except BuildError as err:
                    failures.append(err)
                    continue
            return _typed(_open(path, cmd))
        return failures[0]
    except BuildError as err:
        return err


def _typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.mrplab_pool.argtypes = [*_LAYOUT, _INT, _F32, _PTR, _PTR, _INT]
    lib.mrplab_grad.argtypes = [*_LAYOUT, _PTR, _INT, _F32, _PTR, _I64, _I64, _I64, _PTR, _INT]
    lib.mrplab_compact16.argtypes = [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _I64, _INT, _INT]
    lib.mrplab_compact16.restype = _INT
    lib.mrplab_pool.restype = lib.mrplab_grad.restype = _INT
    lib.mrplab_sl.argtypes = [*_LAYOUT[:-1], _PTR, _I64, _I64, _INT, _F32, _PTR, _I64, _I64, _I64, _PTR, _PTR, _INT]
    lib.mrplab_sl.restype = _INT
    lib.mrplab_diag_loss.argtypes = [_PTR, _PTR, _PTR, _I64, _I64, _I64, _F32, _INT, _PTR, _PTR, _PTR, _PTR, _INT]
    lib.mrplab_diag_loss.restype = None
    lib.mrplab_noise_max.argtypes = [*_LAYOUT[:-1], _PTR, _I64, _I64, _PTR, _PTR, _INT]
    lib.mrplab_noise_max.restype = None
    return lib


def supports(Z: torch.Tensor) -> bool:
    """Whether the kernels take this Z: a CPU [R, N, P, K] tensor in fp32 or bf16, stride 1 along K."""
    return Z.device.type == "cpu" and Z.dim() == 4 and Z.dtype in _DTYPES and (Z.stride(3) == 1 or Z.shape[3] == 1)


def _fits(out: torch.Tensor, Z: torch.Tensor) -> bool:
    """Whether the kernels can write Z's result into ``out``."""
    return out.shape == Z.shape and out.dtype == Z.dtype and supports(out)


def _keep(keep: torch.Tensor | None, Z: torch.Tensor):
    if keep is None:
        return None, None
    k = keep.expand(Z.shape[:3]).contiguous().view(torch.uint8)
    return k, k.data_ptr()


def _taken_q(Z: torch.Tensor, q) -> int | None:
    """q as the C int the kernels take, or None where they do not take this Z (``supports``) or q is not whole."""
    return int(q) if supports(Z) and float(q).is_integer() else None


def pool(Z: torch.Tensor, keep: torch.Tensor | None, q: int, thr: float):
    """steps.pool_patches, fused; None where the kernels do not take this Z or q."""
    if (q := _taken_q(Z, q)) is None:
        return None
    R, N, P, K = Z.shape
    h_all = torch.empty(R, N, K, dtype=torch.float32)
    h_vis = torch.empty_like(h_all) if keep is not None else h_all
    k, k_ptr = _keep(keep, Z)
    rc = library().mrplab_pool(Z.data_ptr(), Z.dtype == torch.bfloat16, R, N, P, K, *Z.stride()[:3], k_ptr,
                               q, float(thr), h_vis.data_ptr(), h_all.data_ptr(), torch.get_num_threads())
    return None if rc else (h_vis, h_all)


def grad(Z: torch.Tensor, keep: torch.Tensor | None, dh: torch.Tensor, q: int, thr: float,
         out: torch.Tensor | None = None, rows: torch.Tensor | None = None):
    """steps.patch_grad, fused: dZ in Z's dtype and layout, or written into ``out`` (Z's shape and dtype, any
    strides with stride 1 along K: a slice of a larger buffer), or with ``rows`` into the compacted ``out`` (steps
    ._into_rows); None where the kernels do not take this Z or q."""
    if (q := _taken_q(Z, q)) is None or (out is not None and not (_fits_rows(out, Z, rows) if rows is not None
                                                                   else _fits(out, Z))):
        return None
    R, N, P, K = Z.shape
    dZ = torch.empty_like(Z) if out is None else out
    g = dh.to(torch.float32).expand(R, N, K).contiguous()
    k, k_ptr = _keep(keep, Z)
    rows_ptr = None if rows is None else rows.data_ptr()
    strides = (0, 0, 0) if rows is not None else dZ.stride()[:3]
    rc = library().mrplab_grad(Z.data_ptr(), Z.dtype == torch.bfloat16, R, N, P, K, *Z.stride()[:3], k_ptr,
                               g.data_ptr(), q, float(thr), dZ.data_ptr(), *strides, rows_ptr, torch.get_num_threads())
    return None if rc else dZ


def _fits_rows(out: torch.Tensor, Z: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether the kernels can write Z's visible rows into the compacted ``out`` at the offsets ``rows``."""
    return (out.dtype == Z.dtype and out.device.type == "cpu" and out.is_contiguous() and rows.dtype == torch.int64
            and rows.is_contiguous() and rows.shape == Z.shape[:3])


def compact16(A: torch.Tensor, keep: torch.Tensor, starts: list[int], out: torch.Tensor, simd: bool = True) -> bool:
    """Packs the columns of A [Ra, d, M] (bf16, contiguous; Ra = 1: shared by the runs, or c) where keep [c, M]
    (bool) is True, run after run, into out [d, >= total + 1] (contiguous; one spare column): the columns of run r
    from out[:, starts[r]] on. False where the kernels do not take A or out (not bf16 on the CPU). ``simd``: AVX-512
    VBMI2's compress where the CPU has it and the kernels are built for AVX-512, else a portable loop (False:
    always that loop); the same result either way."""
    c, M = keep.shape
    d = A.shape[1]
    if (A.dtype != torch.bfloat16 or A.device.type != "cpu" or not A.is_contiguous() or out.dtype != A.dtype
            or out.device.type != "cpu" or not out.is_contiguous() or out.shape[0] != d
            or out.shape[1] < starts[-1] + int(keep[-1].sum()) + 1):  # the last run's columns and the spare one
        return False
    k = keep.contiguous().view(torch.uint8)
    s = torch.tensor(starts, dtype=torch.int64)
    library().mrplab_compact16(A.data_ptr(), 0 if A.shape[0] == 1 else d * M, c, d, M, k.data_ptr(), s.data_ptr(),
                               out.data_ptr(), out.shape[1], int(simd), torch.get_num_threads())
    return True


def sl(Z: torch.Tensor, y: torch.Tensor, q: int, thr: float, k: int, m: int):
    """steps.sl_patch_step, fused (one pass over Z): (loss [R], dZ in Z's dtype and layout, fitted [R]);
    None where the kernels do not take this Z or q."""
    if (q := _taken_q(Z, q)) is None:
        return None
    R, N, P, K = Z.shape
    assert K == k * m, (K, k, m)
    labels = y.to(torch.int64).contiguous()
    dZ = torch.empty_like(Z)
    row_loss, correct = torch.empty(R, N), torch.empty(R, N, dtype=torch.uint8)
    rc = library().mrplab_sl(Z.data_ptr(), Z.dtype == torch.bfloat16, R, N, P, K, *Z.stride()[:3], labels.data_ptr(),
                             0 if labels.shape[0] == 1 else N, k, q, float(thr), dZ.data_ptr(), *dZ.stride()[:3],
                             row_loss.data_ptr(), correct.data_ptr(), torch.get_num_threads())
    return None if rc else (row_loss.mean(-1), dZ, correct.bool().all(-1))


def diag_loss(h: torch.Tensor, t: torch.Tensor, D: torch.Tensor, power: float, fit: bool = False):
    """steps.diag_loss, fused: (loss [R], dD [R, K], dh [R, N, K], the decoder used [R, K]); None where the
    kernels do not take these tensors (not fp32 on the CPU)."""
    if any(x.device.type != "cpu" or x.dtype != torch.float32 for x in (h, t, D)):
        return None
    R, N, K = h.shape
    h, t, D = h.contiguous(), t.expand(R, N, K).contiguous(), D.expand(R, K).contiguous()
    col_loss, dD, dh, used = torch.empty(R, K), torch.empty(R, K), torch.empty(R, N, K), torch.empty(R, K)
    library().mrplab_diag_loss(h.data_ptr(), t.data_ptr(), D.data_ptr(), R, N, K, float(power), int(fit),
                               col_loss.data_ptr(), dD.data_ptr(), dh.data_ptr(), used.data_ptr(), torch.get_num_threads())
    return col_loss.sum(-1), dD, dh, used


def noise_max(Z: torch.Tensor, coef: torch.Tensor, Cf: torch.Tensor):
    """probes.noise_max in one pass over Z: [R]; None where the kernels do not take these tensors."""
    if not supports(Z) or coef.device.type != "cpu" or Cf.device.type != "cpu":
        return None
    R, N, P, K = Z.shape
    coef = coef.to(torch.float32).contiguous()  # [Rc, N, P, F]
    Cf = Cf.to(torch.float32).contiguous()  # [R, F, K]
    row_max = torch.empty(R, N)
    library().mrplab_noise_max(Z.data_ptr(), Z.dtype == torch.bfloat16, R, N, P, K, *Z.stride()[:3], coef.data_ptr(),
                               coef.shape[0], coef.shape[-1], Cf.data_ptr(), row_max.data_ptr(), torch.get_num_threads())
    return row_max.amax(-1)
