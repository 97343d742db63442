"""The `mrplab theory` command: user errors exit 2 with one line and leave nothing behind."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest


# --------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--set", "nope=1"], "nope"),
        (["--set", "mrp.mask_ratio=1.5"], "mrp.mask_ratio"),
        (["--set", "mrp.mask_ratio=-0.2"], "mrp.mask_ratio"),
        (["--set", "data.k=200"], "do not fit in d"),
        (["--set", "data.C_p=9"], "feature patches"),
        (["--set", "seeds=[1,1]"], "distinct"),
        (["--set", "data.k=abc"], "data.k"),
        (["--set", "novalue"], "key=value"),
        (["--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(tmp_path, extra, needle, theory_cli):
    out = tmp_path / "runs"
    result = theory_cli.invoke(["theory", "--out", str(out), *extra])
    theory_cli.assert_user_error(result, out)
    assert needle in result.stderr


@pytest.mark.parametrize(
    "text",
    ["a: [1, 2\n", "- just\n- a list\n", "sl:\n  steps: -5\n", "data:\n  bogus: 1\n"],
    ids=["invalid-yaml", "not-a-mapping", "out-of-range", "unknown-key"],
)
def test_bad_config_file(tmp_path, text, theory_cli):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(text)
    out = tmp_path / "runs"
    theory_cli.assert_user_error(theory_cli.invoke(["theory", "--config", str(cfg_file), "--out", str(out)]), out)


def test_unreadable_config_file(tmp_path, theory_cli):
    out = tmp_path / "runs"
    a_directory = tmp_path / "cfg.yaml"
    a_directory.mkdir()
    result = theory_cli.invoke(["theory", "--config", str(a_directory), "--out", str(out)])
    theory_cli.assert_user_error(result, out)
    assert "cannot read" in result.stderr


def test_unusable_out_dir(tmp_path, theory_cli):
    a_file = tmp_path / "runs"
    a_file.write_text("not a folder")
    result = theory_cli.invoke(theory_cli.args(a_file))
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_usage_error_exits_2(tmp_path, theory_cli):
    result = theory_cli.invoke(["theory", "--no-such-option"])
    assert result.exit_code == 2


def test_python_dash_m_reports_user_error(tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "mrplab", "theory", "--set", "nope=1", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: unknown config key 'nope'")
    assert not out.exists() or list(out.iterdir()) == []


EXIT_PROBE = """
import atexit, sys, threading
from mrplab.cli import exit_now
atexit.register(lambda: print("handler ran", flush=True))
print("work done", end=" ")
sys.stderr.write("err kept")
if sys.argv[1] == "thread":
    threading.Thread(target=lambda: (__import__("time").sleep(0.3), print("thread finished", end=" "))).start()
exit_now(int(sys.argv[2]))
"""


@pytest.mark.parametrize("thread", ["none", "thread"])
@pytest.mark.parametrize("code", [0, 3])
def test_exit_now_keeps_exit_handlers_output_and_code(thread, code):
    """The quick exit still runs exit handlers, flushes both streams and keeps the exit code; a non-daemon
    thread still running is waited for (the usual exit)."""
    proc = subprocess.run([sys.executable, "-c", EXIT_PROBE, thread, str(code)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == code
    expect = "work done thread finished handler ran" if thread == "thread" else "work done handler ran"
    assert proc.stdout.strip() == expect
    assert proc.stderr == "err kept"


def test_error_during_training_leaves_no_folder(tmp_path, monkeypatch, theory_cli):
    from mrplab.errors import MrplabError
    from mrplab.theory import experiment

    def diverging_run(cfg, emit, advance, on_runtime=None):
        emit({"phase": "sl", "step": 0, "loss": [2.3, 2.3]})
        advance(1)
        raise MrplabError("supervised learning diverged at step 1 (loss [nan, nan])", "lower sl.lr")

    monkeypatch.setattr(experiment, "run", diverging_run)
    out = tmp_path / "runs"
    result = theory_cli.invoke(theory_cli.args(out))
    theory_cli.assert_user_error(result, out)
    assert result.stderr == "error: supervised learning diverged at step 1 (loss [nan, nan]) (lower sl.lr)\n"


# --------------------------------------------------------------------------- progress lines


def _progress_lines(text: str) -> list[tuple[str, str, int, int, str]]:
    """(stage label, step text, overall done, overall total, the whole line) of every plain progress line."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"\[(.+?)\] step (\S+(?: \(planned \d+; until fit\))?).*overall (\d+)/(\d+) ", line)
        if m:
            rows.append((m[1], m[2], int(m[3]), int(m[4]), line))
    return rows


def test_theory_progress_shows_mrp_and_controls_as_one_stage_and_sl_past_its_plan():
    """MRP and its two controls advance in lockstep: one stage, counted in MRP's steps, with MRP's own captured
    count (the controls capture nothing here); SL running 5 steps past its plan (until_fit) moves the end, so
    overall never passes 100 % and every plain line's step stays within the stage; past its plan a stage says so."""
    from rich.console import Console

    from mrplab.cli import _Progress

    out = io.StringIO()
    plan = {"sl": 10, "mrp": 10, "mrp_fitted_decoder": 10, "mrp_shuffled_pairing": 10, "ft": 10}
    phi = [[[0.0, 0.0]] * 5]  # one run, 5 classes x 2 features

    def rec(phase, captured):
        return {"phase": phase, "loss": [0.5], "n_captured": [captured], "phi": phi}

    with _Progress(plan, quiet=False, console=Console(file=out, force_terminal=False, width=200)) as p:
        p.EXTRA_LINE_S = 0.0  # past its plan, a stage prints a line at least this often: here every step
        for t in range(16):  # SL fits after 15 steps
            if t % 5 == 0:
                p.record(rec("sl", 3))
            if t < 15:
                p.advance()
        for t in range(11):  # the lockstep loop: every variant logs, then one advance for all three
            if t % 5 == 0:
                for phase, captured in (("mrp", 8), ("mrp_fitted_decoder", 0), ("mrp_shuffled_pairing", 0)):
                    p.record(rec(phase, captured))
            if t < 10:
                p.advance(3)
        for t in range(11):
            if t % 5 == 0:
                p.record(rec("ft", 9))
            if t < 10:
                p.advance()
    rows = _progress_lines(out.getvalue())
    assert out.getvalue().startswith("theory run: 50 steps planned")
    assert [r[2] for r in rows] == sorted({r[2] for r in rows}), out.getvalue()  # overall strictly increasing
    assert all(done <= total for _, _, done, total, _ in rows) and rows[-1][2:4] == (55, 55), out.getvalue()
    assert {r[0] for r in rows} == {"sl", "mrp + 2 controls", "ft"}, out.getvalue()
    mrp = [r for r in rows if r[0] == "mrp + 2 controls"]
    steps = [int(r[1].split("/")[0]) for r in mrp]
    assert steps == sorted(steps) and all(1 <= s <= 10 for s in steps) and all(r[1].endswith("/10") for r in mrp)
    assert all("captured 8.0/10" in r[4] for r in mrp), out.getvalue()
    past = [r for r in rows if r[0] == "sl" and "until fit" in r[1]]
    assert [int(r[1].split()[0]) for r in past] == [11, 12, 13, 14, 15], out.getvalue()
