"""One definition of mean ± std for every report: the sample std, missing values left out."""

from __future__ import annotations

import math

import pytest

from mrplab.stats import describe, finite, mean_std


def test_sample_std_with_missing_values_left_out():
    mean, std = mean_std([0.2, None, 0.4, math.nan, 0.9])
    assert mean == pytest.approx(0.5)
    assert std == pytest.approx(math.sqrt((0.3**2 + 0.1**2 + 0.4**2) / 2))  # n - 1, not n
    assert mean_std([0.7]) == (0.7, 0.0)
    assert all(math.isnan(x) for x in mean_std([None, math.nan]))


def test_describe_and_finite():
    d = describe([3, 1.0, float("inf"), "x", True, 2])
    assert d == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}
    assert finite([1, None, float("-inf"), 2.5]) == [1.0, 2.5]
    empty = describe([])
    assert empty["n"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["max"])


def test_vision_report_uses_the_sample_std():
    from mrplab.vision.report import mean_rows

    rows = [{"approach": "sl", "acc": a, "acc_multi": a, "acc_single": a} for a in (0.7, 0.8, 0.9)]
    out = mean_rows(rows)[0]
    assert out["acc_std"] == pytest.approx(0.1)  # the population std would be 0.0816
