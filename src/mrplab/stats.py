"""Aggregates over seeds, one definition for every report: mean and the *sample* standard deviation
(n - 1), with missing values (None, nan) left out; standard errors; numbers and markdown tables as the
reports show them. Imports nothing of mrplab."""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence


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


def standard_error(std: float, n: int) -> float:
    """Standard error of a mean of n values with sample std ``std``; nan when n < 1."""
    return std / math.sqrt(n) if n > 0 else math.nan


def diff_noise(*groups: tuple[float, int]) -> float:
    """Two standard errors of a difference of independent means, each group given as (sample std, n);
    groups with n = 0 add nothing."""
    return 2.0 * math.sqrt(sum(std**2 / n for std, n in groups if n > 0))


# --------------------------------------------------------------------------- markdown tables


def fmt(x: Any, digits: int = 4) -> str:
    """A number as a report shows it: None and nan as n/a, bools and ints as they are, floats to ``digits``
    significant digits; anything else as str."""
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.{digits}g}"
    return str(x)


def md_cell(text: Any) -> str:
    """A markdown table cell: whitespace (newlines too) collapsed, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def md_table(head: Sequence[Any], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a markdown table; every cell (head too) through ``md_cell``."""
    lines = ["| " + " | ".join(md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return lines
