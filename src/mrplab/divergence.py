"""Divergence: a training phase whose loss or weights left the range that a converging run stays in.

A learning rate far too large does not always give a NaN: with ``sl.lr=1e30`` the theory network's weights
jump to ~1e29 in one step, every training sample is then classified with an enormous margin, the logged loss
is 0 and the claims are measured on nonsense. ``Guard.check`` stops such a phase at the first step where

- the loss is not finite, or below its possible range (every loss here is a mean of squares or a
  cross-entropy, so >= 0), or
- the loss grew by more than ``LOSS_GROWTH`` over the phase's first loss (at least ``LOSS_FLOOR``), or
- the weight norm grew by more than ``NORM_GROWTH`` over its value at the phase's start (at least
  ``NORM_FLOOR``, so that a head that starts at zero is judged on an absolute scale).

The bounds are orders of magnitude, not tuned margins: the default theory run and every run of the
test suite stay under them (``Guard.max_norm_growth`` records how close a phase came). Checked on the
tensors a step already has; per run for the theory's run axis.
"""

from __future__ import annotations

import math

import torch

from mrplab.errors import MrplabError

LOSS_GROWTH = 1e3
LOSS_FLOOR = 1.0
NORM_GROWTH = 1e3
NORM_FLOOR = 1.0
LOSS_MIN = -1e-6  # a non-negative loss computed in floating point


def _per_run(x: torch.Tensor | float) -> list[float]:
    """One value, or one per run, as Python floats (one transfer; the checks below are plain Python:
    a step's guard costs microseconds, where a dozen tensor ops on three numbers cost ~0.2 ms)."""
    return x.detach().reshape(-1).tolist() if isinstance(x, torch.Tensor) else [float(x)]


def weight_norm(*tensors: torch.Tensor, runs: bool = False) -> torch.Tensor:
    """Euclidean norm over the given weights: one number, or one per run (leading axis) with ``runs``."""
    norms = [torch.linalg.vector_norm(t.detach().float().flatten(1) if runs else t.detach().float(),
                                      dim=1 if runs else None) for t in tensors]
    return norms[0] if len(norms) == 1 else torch.stack(norms).pow(2).sum(0).sqrt()


class Guard:
    """One training phase's divergence check; ``lr_key`` is the config key the error tells the user to lower."""

    def __init__(self, phase: str, lr_key: str):
        self.phase, self.lr_key = phase, lr_key
        self.loss0: list[float] | None = None
        self.norm0: list[float] | None = None
        self.max_norm_growth = 1.0  # the largest weight-norm growth seen (for reports and the bounds' margin)

    def check(self, step: int, loss: torch.Tensor | float, norm: torch.Tensor | float | None = None) -> None:
        """``loss``: one value or one per run; ``norm``: the weights' norm, same shape (``weight_norm``)."""
        losses = _per_run(loss)
        if not all(map(math.isfinite, losses)):
            self._stop(step, f"loss {self._show(losses, [not math.isfinite(v) for v in losses])}")
        if min(losses) < LOSS_MIN:
            self._stop(step, f"loss {self._show(losses, [v < LOSS_MIN for v in losses])} below 0, outside its "
                             "possible range")
        if self.loss0 is None:
            self.loss0 = [max(v, LOSS_FLOOR) for v in losses]
        for v, v0 in zip(losses, self.loss0):
            if v > LOSS_GROWTH * v0:
                self._stop(step, f"loss {v:.3g}, {v / v0:.2g}x its start")
        if norm is None:
            return
        norms = _per_run(norm)
        if not all(map(math.isfinite, norms)):
            self._stop(step, "weights not finite")
        if self.norm0 is None:
            self.norm0 = [max(v, NORM_FLOOR) for v in norms]
        growth = [v / v0 for v, v0 in zip(norms, self.norm0)]
        self.max_norm_growth = max(self.max_norm_growth, *growth)
        i = max(range(len(growth)), key=growth.__getitem__)
        if growth[i] > NORM_GROWTH:
            self._stop(step, f"weight norm {norms[i]:.3g}, {growth[i]:.2g}x its start {self.norm0[i]:.3g}")

    @staticmethod
    def _show(values: list[float], which: list[bool]) -> str:
        v = values[which.index(True)]
        return f"{v:.3g}" if math.isfinite(v) else str(v)

    def _stop(self, step: int, what: str) -> None:
        raise MrplabError(f"{self.phase} diverged at step {step} ({what})",
                          f"lower {self.lr_key}")
