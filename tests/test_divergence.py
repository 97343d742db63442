"""Divergence beyond NaN: a loss out of range or weights grown by orders of magnitude stop the run."""

from __future__ import annotations

import math

import pytest
import torch

from mrplab.divergence import LOSS_GROWTH, NORM_GROWTH, Guard, weight_norm
from mrplab.errors import MrplabError


def test_a_converging_phase_passes_and_records_its_growth():
    g = Guard("sl", "sl.lr")
    for step, (loss, norm) in enumerate([(2.3, 3.0), (1.0, 6.0), (0.1, 30.0), (0.0, 29.0)]):
        g.check(step, torch.tensor([loss, loss]), torch.tensor([norm, norm]))
    assert g.max_norm_growth == pytest.approx(10.0)


@pytest.mark.parametrize("loss, norm, fragment", [
    (float("nan"), 3.0, "loss nan"),
    (float("inf"), 3.0, "loss inf"),
    (-0.5, 3.0, "below 0"),
    (2.3 * LOSS_GROWTH * 1.01, 3.0, "its start"),
    (0.0, 3.0 * NORM_GROWTH * 1.01, "weight norm"),
    (0.0, float("inf"), "weights not finite"),
])
def test_each_rule_stops_the_phase_and_names_step_and_key(loss, norm, fragment):
    g = Guard("supervised training", "sl.lr")
    g.check(0, torch.tensor([2.3, 2.3]), torch.tensor([3.0, 3.0]))
    with pytest.raises(MrplabError, match=fragment) as info:
        g.check(7, torch.tensor([0.5, loss]), torch.tensor([3.0, norm]))  # only the second run went wrong
    assert "supervised training diverged at step 7" in str(info.value) and info.value.fix == "lower sl.lr"


def test_a_head_that_starts_at_zero_is_judged_on_the_floor():
    g = Guard("linear probing", "finetune.lp_lr")
    g.check(0, 2.3, weight_norm(torch.zeros(3, 4)))
    g.check(1, 1.0, 500.0)  # 500x a zero start, but below NORM_GROWTH x the floor of 1
    with pytest.raises(MrplabError, match="weight norm"):
        g.check(2, 1.0, 2 * NORM_GROWTH)


def test_weight_norm_per_run_and_overall():
    a, b = torch.ones(2, 3, 4), torch.ones(2, 5)
    assert weight_norm(a, b, runs=True).tolist() == pytest.approx([math.sqrt(17)] * 2)
    assert float(weight_norm(a, b)) == pytest.approx(math.sqrt(34))


def test_huge_sl_lr_is_an_error_not_a_pass(tmp_path, theory_cli):
    """sl.lr=1e30 once ended with loss -0.0, weights ~1e29, exit 0 and half the claims PASS."""
    out = tmp_path / "runs"
    result = theory_cli.invoke(theory_cli.args(out, "--set", "sl.lr=1e30"))
    theory_cli.assert_user_error(result, out)
    assert "supervised training diverged at step 1 (" in result.stderr and "(lower sl.lr)" in result.stderr


def test_huge_vision_lr_is_an_error(tmp_path):
    from typer.testing import CliRunner

    from mrplab.vision.commands import app
    from tests.vision.test_train import TINY

    sets = sum((["--set", s] for s in [*TINY, "finetune.lr=1e6"]), [])
    out = tmp_path / "runs"
    res = CliRunner().invoke(app, ["scratch", "--out", str(out), *sets])
    assert res.exit_code == 2, res.output
    line = res.stderr.strip()
    assert line.startswith("error: s0-scratch diverged at step ") and "lower finetune.lr" in line, line
    assert not out.exists() or list(out.iterdir()) == []
