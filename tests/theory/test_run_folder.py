"""A theory run folder, through a tiny `mrplab theory` run: names, files, checkpoints, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mrplab import config as config_mod
from mrplab.theory import figures, run_folder


def test_run_folder_name_and_stdout(tiny_run, theory_cli):
    result, folder = tiny_run
    assert folder.name.startswith("theory-")
    stamp = folder.name[len("theory-"):]
    assert len(stamp) == 15 and stamp[8] == "-" and stamp.replace("-", "").isdigit()
    assert str(folder) in result.stdout
    assert "[sl] step" in result.stdout  # plain progress lines when not a terminal
    # SL runs far past its 4 planned steps here (until_fit): the end moves with it, so "overall" never passes
    # 100 % and the lines stay about one per tenth of the run
    overall = [line.split("overall ")[1].split()[0].split("/") for line in result.stdout.splitlines()
               if line.startswith("[") and "overall " in line]
    assert 5 <= len(overall) <= 15 and all(int(a) <= int(b) for a, b in overall), result.stdout
    assert overall[-1][0] == overall[-1][1]
    for cid in theory_cli.claim_ids:
        assert cid in result.stdout


def test_config_yaml_is_the_resolved_config(tiny_run, theory_cli):
    _, folder = tiny_run
    text = (folder / "config.yaml").read_text()
    expected = config_mod.load(None, theory_cli.tiny)
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


def test_summary_json(tiny_run, theory_cli):
    _, folder = tiny_run
    s = json.loads((folder / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    cfg = config_mod.load(None, theory_cli.tiny)
    assert s["config_hash"] == cfg.hash()
    assert s["seeds"] == [0, 1]
    assert s["capture_threshold"] == cfg.capture_threshold
    assert {v["id"] for v in s["verdicts"]} == theory_cli.claim_ids
    for v in s["verdicts"]:
        assert len(v["per_seed"]) == 2
        assert v["verdict"] in ("PASS", "FAIL", "N/A")
        assert {"statement", "metric", "rule", "mean", "std", "min", "max", "value"} <= set(v)
    assert [m["seed"] for m in s["per_seed"]] == [0, 1]
    assert {"data_s", "sl_s", "mrp_s", "finetune_s", "total_s"} <= set(s["timings"])
    assert s["wall_s"] > 0


def test_report_md(tiny_run, theory_cli):
    _, folder = tiny_run
    text = (folder / "report.md").read_text()
    for cid in theory_cli.claim_ids:
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


def test_checkpoints(tiny_run, theory_cli):
    from safetensors.torch import load_file

    _, folder = tiny_run
    ck = folder / "checkpoints"
    expect = {"sl": {"W"}, "mrp": {"W", "D", "W_fitted_decoder", "W_shuffled_pairing"}, "ft": {"W", "H", "b", "center", "scale"}}
    cfg = config_mod.load(None, theory_cli.tiny)
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


def test_failure_while_writing_the_report_leaves_nothing(tmp_path, monkeypatch, theory_cli):
    seen = {}

    def broken_write_all(result, fig_dir):
        partial = Path(fig_dir).parent
        seen["partial"] = partial
        seen["metrics_streamed"] = (partial / "metrics.jsonl").stat().st_size > 0
        raise RuntimeError("figure writer failed")

    monkeypatch.setattr(figures, "write_all", broken_write_all)
    out = tmp_path / "runs"
    result = theory_cli.invoke(theory_cli.args(out))
    assert isinstance(result.exception, RuntimeError)
    assert result.exit_code != 0
    assert seen["partial"].name.endswith(".partial") and seen["metrics_streamed"]
    assert list(out.iterdir()) == []  # neither the partial folder nor a final one


def test_failure_inside_report_md_leaves_nothing(tmp_path, monkeypatch, theory_cli):
    def broken_render(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(run_folder, "render_report", broken_render)
    out = tmp_path / "runs"
    result = theory_cli.invoke(theory_cli.args(out))
    theory_cli.assert_user_error(result, out)  # a write error is one line, exit 2, and nothing left
    assert "disk full" in result.stderr


