"""The vision engine and commands: exact resume, data-parallel replicas, a tiny comparison, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mrplab.errors import MrplabError
from mrplab.vision import config as vconfig
from mrplab.vision import run_folder, train
from mrplab.vision.commands import app
from mrplab.runtime import native_bf16

_NATIVE_BF16, _BF16_WHY = native_bf16(torch.device("cpu"))
needs_native_bf16 = pytest.mark.skipif(
    not _NATIVE_BF16, reason=f"skipped: bf16 is emulated on this CPU ({_BF16_WHY}), so a bf16 run is slow here; "
    "precision=auto never picks it on such a CPU")


# Seconds on one CPU: 16-px embedded images, vit_micro, a few steps per stage.
TINY = [
    "data.image_size=16",
    "data.n_train=64",
    "data.n_test=32",
    "pretrain.batch=16",
    "finetune.batch=16",
    "linprobe.batch=16",
    "pretrain.epochs=2",
    "finetune.epochs=1",
    "pretrain.warmup_epochs=0.5",
    "finetune.warmup_epochs=0.5",
    "model.decoder_dim=32",
    "seeds=[0]",
    "log_every=1",
    "checkpoint_every=0",
    # the engine's mechanics on the training images themselves: every image labelled, no epochs menu
    "labels.per_class=null",
    "labels.val_fraction=0",
    "finetune.epochs_menu=null",
    "pretrain.data.source=train",
    # fp32 everywhere unless a test asks for bf16: with precision=auto the tests' numbers followed the
    # machine's cached probe and thread count (the timm-stem resnet18 diverged in bf16 at 1 thread only)
    "precision=fp32",
]


def tiny(*extra: str) -> vconfig.VisionConfig:
    return vconfig.load(None, [*TINY, *extra])


def _weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted((run_dir / "checkpoints").glob("*.safetensors"))}


def _records(run_dir: Path) -> list[dict]:
    """Logged records without wall-clock speed and without the marker a resumed stage logs."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("images_per_s", None)
    return [r for r in recs if r.get("event") != "resume"]


# --------------------------------------------------------------------------- resume


KILLER = """
import os, signal, sys
from mrplab.vision import config as vconfig, train

def kill(stage, step):
    if stage.kind == "pretrain" and step == 5:  # last checkpoint at step 3 (mid-epoch: 4 steps per epoch)
        os.kill(os.getpid(), signal.SIGKILL)

train.run(vconfig.load(None, sys.argv[2:]), "compare", sys.argv[1], on_step=kill)
"""


def test_resume_after_sigkill_is_bit_for_bit(tmp_path):
    """Straight run vs. killed (SIGKILL) mid-epoch in the data2vec pretraining, after the scratch stage
    finished, then --resume: every checkpoint's weights are equal (torch.equal), and so are the metrics."""
    args = [*TINY, "methods=[data2vec]", "checkpoint_every=3", "log_every=2"]
    cfg = vconfig.load(None, args)
    straight = train.run(cfg, "compare", tmp_path / "a").path

    script = tmp_path / "killed.py"
    script.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "b"), *args], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    (partial,) = (tmp_path / "b").glob(".vision-compare-*.partial")
    assert (partial / "checkpoints" / "resume.json").exists()
    assert json.loads((partial / "stages.json").read_text())["done"].keys() == {"s0-scratch"}

    cfg2, command, init = run_folder.open_resume(partial)
    assert command == "compare" and init is None and cfg2 == cfg
    resumed = train.run(cfg2, command, resume=partial).path
    assert not partial.exists() and resumed.parent == tmp_path / "b"

    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and "s0-data2vec-pretrain.safetensors" in a
    assert not any(name.startswith("resume") for name in b)
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    assert _records(straight) == _records(resumed)  # lines logged after the checkpoint were dropped, then redone
    with pytest.raises(MrplabError, match="complete"):
        run_folder.open_resume(resumed)


def test_ctrl_c_after_a_checkpoint_keeps_the_partial_folder(tmp_path):
    def stop(stage, step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(train.RunInterrupted) as info:
        train.run(tiny("checkpoint_every=2"), "scratch", tmp_path, on_step=stop)
    partial = info.value.path
    assert partial.parent == tmp_path and partial.name.endswith(".partial")
    assert json.loads((partial / "checkpoints" / "resume.json").read_text())["step"] == 2
    res = invoke("scratch", "--resume", str(partial), "--quiet")
    assert res.exit_code == 0, res.output
    assert Path(res.stdout.strip()).is_dir() and not partial.exists()


def test_interrupt_before_any_checkpoint_leaves_nothing(tmp_path):
    def stop(stage, step):
        raise KeyboardInterrupt

    with pytest.raises(train.RunInterrupted) as info:
        train.run(tiny(), "scratch", tmp_path, on_step=stop)
    assert info.value.path is None
    assert list(tmp_path.iterdir()) == []


def test_cli_prints_the_partial_folder_and_says_when_nothing_was_kept(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run_stage", interrupted)
    res = invoke("scratch", "--out", str(tmp_path / "runs"), *sum((["--set", s] for s in TINY), []))
    assert res.exit_code == 130, res.output
    assert "run folder (partial until the run completes):" in res.stdout and ".partial" in res.stdout
    assert "nothing was kept" in res.stderr and "checkpoint_every" in res.stderr
    assert list((tmp_path / "runs").iterdir()) == []


# --------------------------------------------------------------------------- data parallel

WORKER = """
import os, sys, torch
from mrplab.vision import config as vconfig, train

cfg = vconfig.load(None, sys.argv[2:])
res = train.run(cfg, "pretrain", sys.argv[1])
torch.save(res.modules["s0-mae-pretrain"].state_dict(), os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
"""


def test_torchrun_two_processes_keep_replicas_identical(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    args = [*TINY, "pretrain.epochs=1", "threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(tmp_path), *args],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    runs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(runs) == 1  # only rank 0 writes a run folder
    start = next(r for r in _records(runs[0]) if r.get("event") == "start")
    assert start["world_size"] == 2
    # two half batches with averaged gradients train the same model as one process on the whole batch
    single = train.run(vconfig.load(None, args), "pretrain", tmp_path / "single").modules["s0-mae-pretrain"]
    for k, v in single.state_dict().items():
        assert torch.allclose(v, r0[k], atol=1e-4), k


# --------------------------------------------------------------------------- the comparison and the CLI


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def test_tiny_compare_prints_and_writes_the_table(tmp_path):
    res = invoke("compare", "--out", str(tmp_path), *sets(*TINY, "seeds=[0,1]", "pretrain.epochs=1",
                                                          "model.name=resnet_small"))
    assert res.exit_code == 0, res.output
    for text in ("SL from scratch", "MAE -> FT", "multi-view", "single-view", "mean of 2"):
        assert text in res.output
    (run,) = list(tmp_path.iterdir())
    assert run.name.startswith("vision-compare-")
    report = (run / "report.md").read_text()
    assert "| SL from scratch | 0 |" in report and "| MAE -> FT | 1 |" in report
    assert "multi-view acc (%)" in report and "single-view acc (%)" in report
    summary = json.loads((run / "summary.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == [
        "s0-scratch", "s0-mae-pretrain", "s0-mae-finetune", "s1-scratch", "s1-mae-pretrain", "s1-mae-finetune"]
    steps = {r["stage"]: r["steps"] for r in summary["stages"]}
    assert steps["s0-scratch"] == steps["s0-mae-pretrain"] + steps["s0-mae-finetune"]  # same total epochs
    for row in summary["table"]:
        assert 0.0 <= row["acc_multi"] <= 1.0 and 0.0 <= row["acc_single"] <= 1.0
    assert {"curves.png", "accuracy.png", "reconstruction-s0-mae-pretrain.png"} <= set(os.listdir(run / "figures"))
    sidecar = json.loads((run / "checkpoints" / "s0-mae-pretrain.json").read_text())
    assert sidecar["config_hash"] == summary["config_hash"] and sidecar["step"] == steps["s0-mae-pretrain"]
    # a pretrain run folder initialises fine-tuning and linear probing
    res = invoke("linprobe", "--init", str(run), "--out", str(tmp_path / "lp"), *sets(*TINY, "linprobe.epochs=1",
                                                                                          "model.name=resnet_small"))
    assert res.exit_code == 0, res.output
    assert "MAE linear probe" in res.output


def test_data2vec_collapse_stops_the_run(tmp_path):
    res = invoke("pretrain", "--out", str(tmp_path),
                 *sets(*TINY, "pretrain.method=data2vec", "pretrain.min_target_var=100",
                       "pretrain.collapse_patience=2"))
    assert res.exit_code == 2, res.output
    assert "collapsed" in res.stderr
    assert list(tmp_path.iterdir()) == []  # a failed run leaves no folder


def test_a_failing_stage_keeps_the_finished_ones(tmp_path):
    """compare: SL and MAE finish, data2vec collapses; the finished stages stay on disk and are named."""
    res = invoke("compare", "--out", str(tmp_path),
                 *sets(*TINY, "seeds=[0]", "methods=[mae,data2vec]", "pretrain.min_target_var=100",
                       "pretrain.collapse_patience=2"))
    assert res.exit_code == 2, res.output
    assert "collapsed" in res.stderr and "finished stages are kept in" in res.stderr
    (partial,) = tmp_path.iterdir()
    assert partial.name.endswith(".partial") and partial.name in res.stderr
    done = json.loads((partial / "stages.json").read_text())["done"]
    assert set(done) == {"s0-scratch", "s0-mae-pretrain", "s0-mae-finetune"}
    assert (partial / "checkpoints" / "s0-mae-pretrain.encoder.safetensors").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (sets("data.source=folder", "data.root=/nonexistent/mrplab-data"), "does not exist"),
        (sets("data.source=folder", "data.root={empty}"), "no class folders"),
        (sets("data.image_size=30"), "not divisible by patch size"),
        (sets("model.name=vit_huge"), "model.name"),
        (["--config", "/nonexistent/vision.yaml"], "cannot read config file"),
        (["--config", "{bad_yaml}"], "not valid YAML"),
        (sets("labels.fraction=0"), "labels.fraction must be in (0, 1]"),
        (sets("labels.fraction=1.5"), "labels.fraction must be in (0, 1]"),
        (sets("labels.per_class=100", "data.n_train=64", "data.n_test=8", "seeds=[0]"),
         "labels.per_class = 100 but class class0 has 16 training images"),
        (sets("pretrain.data.source=folder", "pretrain.data.root={empty}"), "no class folders"),
        (sets("pretrain.data.source=embedded", "pretrain.data.coverage=0.2"), "leaves every class with no motif"),
        (sets("pretrain.data.source=folder"), "needs pretrain.data.root"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, args, needle):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed\n")
    args = [a.format(empty=empty, bad_yaml=bad) for a in args]
    out = tmp_path / "runs"
    res = invoke("pretrain", "--out", str(out), *args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert "Traceback" not in res.output
    assert not out.exists() or list(out.iterdir()) == []


def test_finetune_and_resume_misuse_are_user_errors(tmp_path):
    res = invoke("finetune", "--out", str(tmp_path))
    assert res.exit_code == 2 and "--init" in res.stderr
    res = invoke("compare", "--resume", str(tmp_path))
    assert res.exit_code == 2 and "not a stopped vision run folder" in res.stderr


def test_presets_load_and_the_embedded_one_is_the_default():
    root = Path(__file__).resolve().parents[2] / "configs" / "vision"
    assert vconfig.load(root / "embedded-compare.yaml") == vconfig.VisionConfig()
    cifar = vconfig.load(root / "cifar10.yaml")
    assert cifar.data.source == "folder" and cifar.data.image_size % cifar.model.patch_size == 0


@needs_native_bf16
def test_bf16_data2vec_pretraining_logs_variances(tmp_path):
    seen = []
    res = train.run(tiny("precision=bf16", "pretrain.method=data2vec", "pretrain.epochs=1"), "pretrain", tmp_path,
                    on_record=seen.append)
    logged = [r for r in seen if "loss" in r]
    assert logged and all(r["target_var"] > 0 and "pred_var" in r for r in logged)
    enc = load_file(str(res.path / "checkpoints" / "s0-data2vec-pretrain.encoder.safetensors"))
    assert "vit.pos_embed" in enc and all(v.dtype == torch.float32 for v in enc.values())
