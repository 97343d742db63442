"""One definition of mean ± std for every report: the sample std, missing values left out."""

from __future__ import annotations

import math

import pytest

from mrplab.stats import describe, diff_noise, finite, fmt, md_cell, md_table, mean_std, standard_error


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


def test_standard_errors():
    assert standard_error(0.3, 9) == pytest.approx(0.1)
    assert math.isnan(standard_error(0.3, 0))
    # two SE of a difference: 2 * sqrt(0.2^2/4 + 0.1^2/1); an empty group adds nothing
    assert diff_noise((0.2, 4), (0.1, 1), (5.0, 0)) == pytest.approx(2 * math.sqrt(0.01 + 0.01))


def test_numbers_and_markdown_tables():
    assert fmt(None) == "n/a" and fmt(math.nan) == "n/a" and fmt(True) == "True" and fmt(7) == "7"
    assert fmt(0.123456) == "0.1235" and fmt(0.123456, 3) == "0.123"
    assert md_cell("a |b\n c") == "a \\|b c"
    lines = md_table(("x", "y|z"), [(1, "two\nlines"), (fmt(0.5), None)])
    assert lines == ["| x | y\\|z |", "|---|---|", "| 1 | two lines |", "| 0.5 | None |"]
