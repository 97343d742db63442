"""Shared by the tests of every package: a tiny theory run through the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mrplab.cli import app

# A run small enough to take seconds on one CPU; mrp.lr is pinned so tuning
# the defaults cannot make this run diverge.
TINY = [
    "sl.steps=4",
    "mrp.steps=4",
    "mrp.lr=0.5",
    "finetune.lp_steps=2",
    "finetune.ft_steps=2",
    "probes.log_every=2",
    "seeds=[0,1]",
    "data.d=40",
    "data.n_pretrain=40",
    "data.n_train=40",
    "data.n_test=40",
    "compile=false",
]
CLAIM_IDS = {"C1", "C2", "C3a", "C3b", "C4a", "C4b", "C5a", "C5b", "C6", "C7"}


def _tiny_args(out: Path, *extra: str) -> list[str]:
    args = ["theory", "--out", str(out)]
    for item in TINY:
        args += ["--set", item]
    return args + list(extra)


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def _assert_user_error(result, out: Path) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    assert not out.exists() or list(out.iterdir()) == []




class TheoryCLI:
    """The tiny theory config and the helpers tests call through the ``theory_cli`` fixture."""

    tiny = TINY
    claim_ids = CLAIM_IDS
    args = staticmethod(_tiny_args)
    invoke = staticmethod(_invoke)
    assert_user_error = staticmethod(_assert_user_error)


@pytest.fixture(scope="session")
def theory_cli() -> TheoryCLI:
    return TheoryCLI()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny `mrplab theory` run: (CliRunner result, its run folder)."""
    out = tmp_path_factory.mktemp("runs")
    result = _invoke(_tiny_args(out))
    assert result.exit_code == 0, result.output + repr(result.exception)
    folders = list(out.iterdir())
    assert len(folders) == 1, folders
    return result, folders[0]
