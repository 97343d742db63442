"""Aggregates over seeds, one definition for every report: mean and the *sample* standard deviation
(n - 1), with missing values (None, nan) left out. Imports nothing of mrplab."""

from __future__ import annotations

import math
from typing import Any, Iterable


def finite(values: Iterable[Any]) -> list[float]:
    """The values that are numbers, as floats; None, nan, inf and non-numbers left out."""
    out = []
    for v in values:
        if isinstance(v, bool) or v is None:
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(x):
            out.append(x)
    return out


def mean_std(values: Iterable[Any]) -> tuple[float, float]:
    """(mean, sample std) of the finite values; (nan, nan) when there are none, std 0 for one value."""
    vals = finite(values)
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((x - mean) ** 2 for x in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def describe(values: Iterable[Any]) -> dict[str, float]:
    """mean, sample std, min and max of the finite values (all nan when there are none) and their count n."""
    vals = finite(values)
    mean, std = mean_std(vals)
    return {"mean": mean, "std": std, "min": min(vals) if vals else math.nan, "max": max(vals) if vals else math.nan,
            "n": len(vals)}
