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


def _per_run(x: torch.Tensor | float) -> torch.Tensor:
    """One value, or one per run, as a float64 vector on the CPU."""
    return torch.as_tensor(x).detach().to("cpu", torch.float64).reshape(-1)


def weight_norm(*tensors: torch.Tensor, runs: bool = False) -> torch.Tensor:
    """Euclidean norm over the given weights: one number, or one per run (leading axis) with ``runs``."""
    if runs:
        sq = sum(t.detach().float().flatten(1).pow(2).sum(1) for t in tensors)
    else:
        sq = sum(t.detach().float().pow(2).sum() for t in tensors)
    return torch.as_tensor(sq).sqrt()


class Guard:
    """One training phase's divergence check; ``lr_key`` is the config key the error tells the user to lower."""

    def __init__(self, phase: str, lr_key: str):
        self.phase, self.lr_key = phase, lr_key
        self.loss0: torch.Tensor | None = None
        self.norm0: torch.Tensor | None = None
        self.max_norm_growth = 1.0  # the largest weight-norm growth seen (for reports and the bounds' margin)

    def check(self, step: int, loss: torch.Tensor | float, norm: torch.Tensor | float | None = None) -> None:
        """``loss``: one value or one per run; ``norm``: the weights' norm, same shape (``weight_norm``)."""
        losses = _per_run(loss)
        bad = ~torch.isfinite(losses)
        if bad.any():
            self._stop(step, f"loss {self._show(losses, bad)}")
        low = losses < LOSS_MIN
        if low.any():
            self._stop(step, f"loss {self._show(losses, low)} below 0, outside its possible range")
        if self.loss0 is None:
            self.loss0 = losses.clamp(min=LOSS_FLOOR)
        grown = losses > LOSS_GROWTH * self.loss0
        if grown.any():
            i = int(grown.nonzero()[0])
            self._stop(step, f"loss {losses[i].item():.3g}, {losses[i].item() / self.loss0[i].item():.2g}x its start")
        if norm is None:
            return
        norms = _per_run(norm)
        if not torch.isfinite(norms).all():
            self._stop(step, "weights not finite")
        if self.norm0 is None:
            self.norm0 = norms.clamp(min=NORM_FLOOR)
        growth = norms / self.norm0
        self.max_norm_growth = max(self.max_norm_growth, float(growth.max()))
        if (growth > NORM_GROWTH).any():
            i = int(growth.argmax())
            self._stop(step, f"weight norm {norms[i].item():.3g}, {growth[i].item():.2g}x its start "
                             f"{self.norm0[i].item():.3g}")

    @staticmethod
    def _show(values: torch.Tensor, which: torch.Tensor) -> str:
        v = values[which.nonzero()[0]].item()
        return f"{v:.3g}" if math.isfinite(v) else str(v)

    def _stop(self, step: int, what: str) -> None:
        raise MrplabError(f"{self.phase} diverged at step {step} ({what})",
                          f"lower {self.lr_key}")
