"""Up-front memory check: a run whose tensors cannot fit stops before it allocates, with one line.

Without it ``data.d=2000000`` or ``data.n_train=1e8`` sample or render until the machine swaps or the kernel
kills the process. Each track estimates its largest allocations (``parts``: data tensors, step temporaries,
model and optimiser state, in bytes) and calls ``check``; the estimate is deliberately an upper-end one
(about 1-2x the measured peak of the shipped runs, see docs) so that a refused run would not have fit.
"""

from __future__ import annotations

import os

import torch

from mrplab.errors import MrplabError

HEADROOM = 0.9  # the share of the available memory a run may plan to use
PROCESS = 0.5 * 2**30  # torch and the interpreter, before any tensor (measured ~520 MiB resident)


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Free memory a new allocation can use: MemAvailable on Linux, free device memory on CUDA; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def check(parts: dict[str, float], shrink: str, device: torch.device | str = "cpu",
          available: int | None = None) -> None:
    """Raise one MrplabError when the estimated ``parts`` (plus the process itself on the host) exceed
    HEADROOM x the memory available on ``device``."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    parts = parts if on_gpu else {**parts, "process": PROCESS}  # a CUDA context is already out of mem_get_info
    need = sum(parts.values())
    have = available if available is not None else available_bytes(device)
    if have is None or need <= HEADROOM * have:
        return
    largest = ", ".join(f"{k} {gib(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:3])
    where = f"{device} memory" if on_gpu else "memory"
    raise MrplabError(f"this run needs about {gib(need)} of {where} ({largest}) but {gib(have)} is available",
                      f"shrink {shrink}")


def check_run(host: dict[str, float], on_device: dict[str, float], shrink: str,
              device: torch.device | str = "cpu", available: dict[str, int] | None = None) -> None:
    """A run's check: on the CPU every part once (a key in both dicts is one allocation) against host memory;
    on CUDA the ``host`` parts against host memory and the ``on_device`` parts against the device's free
    memory. ``available`` ({"host": bytes, "device": bytes}) replaces the measured amounts (tests)."""
    device = torch.device(device)
    available = available or {}
    if device.type != "cuda":
        check({**host, **on_device}, shrink, "cpu", available.get("host"))
        return
    check(host, shrink, "cpu", available.get("host"))
    check(on_device, shrink, device, available.get("device"))
