"""The `mrplab theory` command: user errors exit 2 with one line and leave nothing behind."""

from __future__ import annotations

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
