"""Explicit randomness: named, independent generator streams per seed.

Library code never seeds a global generator; it takes a ``torch.Generator``.
``generator(seed, "init")`` and ``generator(seed, "mask")`` are independent
streams, so changing how many numbers one consumer draws never shifts another.
The theory engine draws every stream on the CPU (``generator``'s default) and moves
what it drew to the run's device, so a seed is the same run on a GPU as on the CPU,
to rounding (tests/test_accelerator.py); a CUDA generator would draw other numbers.
"""

from __future__ import annotations

import hashlib

import torch


def stream_seed(seed: int, stream: str) -> int:
    digest = hashlib.sha256(f"{int(seed)}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, stream: str, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(seed, stream))
    return g
