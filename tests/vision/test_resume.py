"""--resume checks the stopped run's config: a hand-edited config.yaml is refused, and only the documented
keys may change with --set (recorded in run.json with the step they took effect; a new lr really applies)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mrplab.vision import train
from mrplab.vision.run_folder import RESUMABLE_KEYS
from tests.vision.test_train import invoke, tiny


def _stopped(tmp_path: Path) -> Path:
    def stop(stage, step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(train.RunInterrupted) as info:
        train.run(tiny("checkpoint_every=2"), "scratch", tmp_path / "runs", on_step=stop)
    return info.value.path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_hand_edited_config_is_refused_and_the_folder_left_alone(tmp_path):
    partial = _stopped(tmp_path)
    cfg = yaml.safe_load((partial / "config.yaml").read_text())
    cfg["model"]["decoder_dim"] = 16
    (partial / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = _snapshot(partial)
    res = invoke("scratch", "--resume", str(partial))
    assert res.exit_code == 2, res.output
    assert "was changed after the run started" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert _snapshot(partial) == before


def test_only_the_documented_keys_may_change(tmp_path):
    partial = _stopped(tmp_path)
    before = _snapshot(partial)
    res = invoke("scratch", "--resume", str(partial), "--set", "model.decoder_dim=16")
    assert res.exit_code == 2 and "--set model.decoder_dim cannot change on --resume" in res.stderr
    res = invoke("scratch", "--resume", str(partial), "--config", str(partial / "config.yaml"))
    assert res.exit_code == 2 and "drop --config" in res.stderr
    assert _snapshot(partial) == before
    assert "finetune.lr" in RESUMABLE_KEYS and "model.name" not in RESUMABLE_KEYS


def test_a_lower_lr_on_resume_applies_from_the_resume_step_and_is_recorded(tmp_path):
    straight = train.run(tiny("checkpoint_every=2"), "scratch", tmp_path / "straight").path
    partial = _stopped(tmp_path)
    old_lr = yaml.safe_load((partial / "config.yaml").read_text())["finetune"]["lr"]
    res = invoke("scratch", "--resume", str(partial), "--set", f"finetune.lr={old_lr / 4}", "--quiet")
    assert res.exit_code == 0, res.output
    final = Path(res.stdout.strip())
    run = json.loads((final / "run.json").read_text())
    (change,) = run["changes"]
    assert change["keys"] == {"finetune.lr": [old_lr, old_lr / 4]}
    assert change["stage"] == "s0-scratch" and change["step"] == 2
    assert yaml.safe_load((final / "config.yaml").read_text())["finetune"]["lr"] == old_lr / 4

    def lrs(folder: Path) -> dict[int, float]:
        recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["lr"] for r in recs if "lr" in r and r.get("stage") == "s0-scratch"}

    a, b = lrs(straight), lrs(final)
    assert a[1] == b[1] and a[2] == b[2]  # before the resume point: the old lr
    later = [s for s in a if s > 2]
    assert later and all(b[s] == pytest.approx(a[s] / 4) for s in later)
