"""The `mrplab theory` command: user errors, a tiny run's folder, and atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mrplab import config as config_mod
from mrplab import io as mrplab_io
from mrplab.cli import app
from mrplab.report import figures, run_folder

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


def tiny_args(out: Path, *extra: str) -> list[str]:
    args = ["theory", "--out", str(out)]
    for item in TINY:
        args += ["--set", item]
    return args + list(extra)


def invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def assert_user_error(result, out: Path) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    assert not out.exists() or list(out.iterdir()) == []


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
def test_user_errors_print_one_line_and_exit_2(tmp_path, extra, needle):
    out = tmp_path / "runs"
    result = invoke(["theory", "--out", str(out), *extra])
    assert_user_error(result, out)
    assert needle in result.stderr


@pytest.mark.parametrize(
    "text",
    ["a: [1, 2\n", "- just\n- a list\n", "sl:\n  steps: -5\n", "data:\n  bogus: 1\n"],
    ids=["invalid-yaml", "not-a-mapping", "out-of-range", "unknown-key"],
)
def test_bad_config_file(tmp_path, text):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(text)
    out = tmp_path / "runs"
    assert_user_error(invoke(["theory", "--config", str(cfg_file), "--out", str(out)]), out)


def test_unreadable_config_file(tmp_path):
    out = tmp_path / "runs"
    a_directory = tmp_path / "cfg.yaml"
    a_directory.mkdir()
    result = invoke(["theory", "--config", str(a_directory), "--out", str(out)])
    assert_user_error(result, out)
    assert "cannot read" in result.stderr


def test_unusable_out_dir(tmp_path):
    a_file = tmp_path / "runs"
    a_file.write_text("not a folder")
    result = invoke(tiny_args(a_file))
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_usage_error_exits_2(tmp_path):
    result = invoke(["theory", "--no-such-option"])
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


def test_error_during_training_leaves_no_folder(tmp_path, monkeypatch):
    from mrplab.errors import MrplabError
    from mrplab.theory import experiment

    def diverging_run(cfg, emit, advance, on_runtime=None):
        emit({"phase": "sl", "step": 0, "loss": [2.3, 2.3]})
        advance(1)
        raise MrplabError("supervised learning diverged at step 1 (loss [nan, nan])", "lower sl.lr")

    monkeypatch.setattr(experiment, "run", diverging_run)
    out = tmp_path / "runs"
    result = invoke(tiny_args(out))
    assert_user_error(result, out)
    assert result.stderr == "error: supervised learning diverged at step 1 (loss [nan, nan]) (lower sl.lr)\n"


# --------------------------------------------------------------------------- a tiny successful run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result = invoke(tiny_args(out))
    assert result.exit_code == 0, result.output + repr(result.exception)
    folders = list(out.iterdir())
    assert len(folders) == 1, folders
    return result, folders[0]


def test_run_folder_name_and_stdout(tiny_run):
    result, folder = tiny_run
    assert folder.name.startswith("theory-")
    stamp = folder.name[len("theory-"):]
    assert len(stamp) == 15 and stamp[8] == "-" and stamp.replace("-", "").isdigit()
    assert str(folder) in result.stdout
    assert "[mrp] step" in result.stdout  # plain progress lines when not a terminal
    for cid in CLAIM_IDS:
        assert cid in result.stdout


def test_config_yaml_is_the_resolved_config(tiny_run):
    _, folder = tiny_run
    text = (folder / "config.yaml").read_text()
    expected = config_mod.load(None, TINY)
    assert text == config_mod.dump_yaml(expected)
    assert config_mod.validate(yaml.safe_load(text)) == expected


def test_metrics_jsonl(tiny_run):
    _, folder = tiny_run
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in lines]
    phases = [r["phase"] for r in records]
    assert phases[0] == "sl" and {"sl", "mrp", "lp", "ft"} <= set(phases)
    for r in records:
        assert {"phase", "step", "loss", "phi"} <= set(r)
        assert len(r["loss"]) == 2  # one value per seed


def test_summary_json(tiny_run):
    _, folder = tiny_run
    s = json.loads((folder / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    cfg = config_mod.load(None, TINY)
    assert s["config_hash"] == cfg.hash()
    assert s["seeds"] == [0, 1]
    assert s["capture_threshold"] == cfg.capture_threshold
    assert {v["id"] for v in s["verdicts"]} == CLAIM_IDS
    for v in s["verdicts"]:
        assert len(v["per_seed"]) == 2
        assert v["verdict"] in ("PASS", "FAIL", "N/A")
        assert {"statement", "metric", "rule", "mean", "std", "min", "max", "value"} <= set(v)
    assert [m["seed"] for m in s["per_seed"]] == [0, 1]
    assert {"data_s", "sl_s", "mrp_s", "finetune_s", "total_s"} <= set(s["timings"])
    assert s["wall_s"] > 0


def test_report_md(tiny_run):
    _, folder = tiny_run
    text = (folder / "report.md").read_text()
    for cid in CLAIM_IDS:
        assert f"| {cid} |" in text
    for name in figures.FIGURES:
        assert f"](figures/{name})" in text
    assert "```yaml" in text and "mask_ratio" in text
    assert "## Timings" in text


def test_figures_are_pngs(tiny_run):
    _, folder = tiny_run
    for name in ("capture.png", "phi.png", "accuracy.png"):
        data = (folder / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_checkpoints(tiny_run):
    from safetensors.torch import load_file

    _, folder = tiny_run
    ck = folder / "checkpoints"
    expect = {"sl": {"W"}, "mrp": {"W", "D", "W_fitted_decoder", "W_shuffled_pairing"}, "ft": {"W", "H", "b", "center", "scale"}}
    cfg = config_mod.load(None, TINY)
    for kind, keys in expect.items():
        tensors = load_file(str(ck / f"{kind}.safetensors"))
        assert set(tensors) == keys
        assert all(t.shape[0] == 2 for t in tensors.values())  # leading run axis
        side = json.loads((ck / f"{kind}.json").read_text())
        assert side["config_hash"] == cfg.hash()
        assert "git_commit" in side and "command" in side
        assert side["step"] == sum(side["steps"].values())
    assert json.loads((ck / "mrp.json").read_text())["steps"] == {"mrp": 4}


def test_no_temp_files_left(tiny_run):
    _, folder = tiny_run
    leftovers = [p for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []
    assert not any(p.name.endswith(".partial") for p in folder.parent.iterdir())


# --------------------------------------------------------------------------- atomicity


def test_failure_while_writing_the_report_leaves_nothing(tmp_path, monkeypatch):
    seen = {}

    def broken_write_all(result, fig_dir):
        partial = Path(fig_dir).parent
        seen["partial"] = partial
        seen["metrics_streamed"] = (partial / "metrics.jsonl").stat().st_size > 0
        raise RuntimeError("figure writer failed")

    monkeypatch.setattr(figures, "write_all", broken_write_all)
    out = tmp_path / "runs"
    result = invoke(tiny_args(out))
    assert isinstance(result.exception, RuntimeError)
    assert result.exit_code != 0
    assert seen["partial"].name.endswith(".partial") and seen["metrics_streamed"]
    assert list(out.iterdir()) == []  # neither the partial folder nor a final one


def test_failure_inside_report_md_leaves_nothing(tmp_path, monkeypatch):
    def broken_render(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(run_folder, "render_report", broken_render)
    out = tmp_path / "runs"
    result = invoke(tiny_args(out))
    assert isinstance(result.exception, OSError)
    assert list(out.iterdir()) == []


def test_atomic_write_text_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        mrplab_io.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
