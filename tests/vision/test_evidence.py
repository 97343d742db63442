"""`mrplab evidence`: checkpoint loading and its errors, and a tiny end-to-end report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from mrplab.cli import app
from mrplab.vision import checkpoints
from mrplab.vision.config import VisionConfig
from mrplab.vision.models import build_encoder

TINY_DATA = {"num_classes": 3, "n_train": 60, "n_test": 60, "single_view_test": 0.5}


def write_checkpoint(folder: Path, stage: str, kind: str, seed: int, method: str | None = None,
                     num_classes: int = 3, data: dict | None = None, model: str = "vit_micro") -> Path:
    cfg = VisionConfig.model_validate({"data": data or TINY_DATA, "model": {"name": model}})
    torch.manual_seed(seed + (7 if kind == "finetune" else 0))
    enc = build_encoder(cfg.model.name, cfg.data.image_size, cfg.model.patch_size, num_classes)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stage}.safetensors"
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(
        {"stage": stage, "kind": kind, "seed": seed, "method": method, "config": cfg.model_dump(mode="json")}))
    return path


def run_cli(args: list[str]):
    return CliRunner().invoke(app, args)


def assert_user_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert line.startswith("error: ") and len(line.splitlines()) == 1, line
    for w in words:
        assert w in line, (w, line)


def test_load_classifier_reads_approach_seed_and_weights(tmp_path):
    p = write_checkpoint(tmp_path / "checkpoints", "s1-mae-finetune", "finetune", 1, "mae")
    m = checkpoints.load_classifier(p)
    assert (m.approach, m.seed, m.label) == ("MRP+FT (mae)", 1, "MRP+FT (mae) s1")
    assert m.encoder.head.out_features == 3
    sl = checkpoints.load_classifier(write_checkpoint(tmp_path / "checkpoints", "s1-scratch", "scratch", 1))
    assert sl.approach == "SL"


def test_bad_checkpoints_get_one_line_and_exit_2(tmp_path):
    good = write_checkpoint(tmp_path / "a", "s0-scratch", "scratch", 0)
    out = tmp_path / "out"
    # a file that is not a checkpoint (with a valid sidecar)
    junk = tmp_path / "b" / "s0-scratch.safetensors"
    junk.parent.mkdir()
    junk.write_bytes(b"not a safetensors file")
    junk.with_suffix(".json").write_text(good.with_suffix(".json").read_text())
    assert_user_error(run_cli(["evidence", str(good), str(junk), "--out", str(out)]), "not a safetensors")
    # no sidecar
    lone = tmp_path / "c" / "x.safetensors"
    lone.parent.mkdir()
    lone.write_bytes(good.read_bytes())
    assert_user_error(run_cli(["evidence", str(good), str(lone), "--out", str(out)]), "no sidecar")
    # a model trained for another number of classes
    other = write_checkpoint(tmp_path / "d", "s0-mae-finetune", "finetune", 0, "mae", num_classes=5,
                             data={**TINY_DATA, "num_classes": 5})
    assert_user_error(run_cli(["evidence", str(good), str(other), "--out", str(out)]), "different numbers of classes")
    # models with a 4-way head for 3-class data
    w1 = write_checkpoint(tmp_path / "e", "s0-scratch", "scratch", 0, num_classes=4)
    w2 = write_checkpoint(tmp_path / "e", "s0-mae-finetune", "finetune", 0, "mae", num_classes=4)
    assert_user_error(run_cli(["evidence", str(w1), str(w2), "--out", str(out)]), "the models have 4 classes, the data 3")
    # a pretraining checkpoint has no classifier
    pre = write_checkpoint(tmp_path / "f", "s0-mae-pretrain", "pretrain", 0, "mae")
    assert_user_error(run_cli(["evidence", str(good), str(pre), "--out", str(out)]), "no classifier")
    # missing file, one model only, bad --cam
    assert_user_error(run_cli(["evidence", str(good), str(tmp_path / "nope.safetensors"), "--out", str(out)]),
                      "does not exist")
    assert_user_error(run_cli(["evidence", str(good), "--out", str(out)]), "at least two models")
    assert_user_error(run_cli(["evidence", str(good), str(good), "--cam", "lime", "--out", str(out)]), "--cam")
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_mismatched_weights_and_sidecar(tmp_path):
    good = write_checkpoint(tmp_path / "a", "s0-scratch", "scratch", 0)
    cnn = write_checkpoint(tmp_path / "b", "s0-mae-finetune", "finetune", 0, "mae", model="resnet_small")
    # sidecar says vit_micro, weights are a resnet
    bad = tmp_path / "c" / "s0-mae-finetune.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(cnn.read_bytes())
    bad.with_suffix(".json").write_text(good.with_suffix(".json").read_text().replace('"scratch"', '"finetune"'))
    assert_user_error(run_cli(["evidence", str(good), str(bad), "--out", str(tmp_path / "o")]), "does not fit")


@pytest.mark.parametrize("model", ["vit_micro", "resnet_small"])
def test_tiny_end_to_end_report(tmp_path, model):
    run = tmp_path / "run"
    for s in (0, 1):
        write_checkpoint(run / "checkpoints", f"s{s}-scratch", "scratch", s, model=model)
        write_checkpoint(run / "checkpoints", f"s{s}-mae-finetune", "finetune", s, "mae", model=model)
    write_checkpoint(run / "checkpoints", "s0-mae-pretrain", "pretrain", 0, "mae", model=model)  # skipped
    result = run_cli(["evidence", str(run), "--images", "24", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    folder = next((tmp_path / "out").iterdir())
    ev = json.loads((folder / "evidence.json").read_text())
    assert len(ev["per_model"]) == 4
    assert {a["approach"] for a in ev["per_approach"]} == {"SL", "MRP+FT (mae)"}
    for rec in ev["per_model"]:
        for method in ("eigencam", "gradcam"):
            assert 0.0 <= rec[f"{method}.motif_coverage"] <= 1.0
            assert rec[f"{method}.regions_mean"] >= 0
        assert 0.0 <= rec["single_view.motifs_recognised_share"] <= 1.0
    # every model is occluded by its own map and by the other approach's same-seed map
    occ = ev["occlusion"]
    assert len(occ) == 8
    assert {(o["model"], o["map_model"]) for o in occ if o["map_of"] != "own"} == {
        ("SL s0", "MRP+FT (mae) s0"), ("SL s1", "MRP+FT (mae) s1"),
        ("MRP+FT (mae) s0", "SL s0"), ("MRP+FT (mae) s1", "SL s1")}
    report = (folder / "report.md").read_text()
    assert "motif coverage" in report and "| SL |" in report
    assert (folder / "figures" / "cams-eigencam.png").stat().st_size > 0
    assert (folder / "figures" / "cams-gradcam.png").stat().st_size > 0


def test_one_seed_claims_a_direction_only_beyond_the_image_level_error():
    from mrplab.vision.evidence import Evidence, measured_sentences

    def agg(approach, regions, se, seeds=(0,)):
        return {"approach": approach, "seeds": list(seeds), "eigencam.regions_mean": (regions, 0.0),
                "eigencam.regions_mean_se": (se, 0.0)}

    # 2 * sqrt(0.05^2 + 0.05^2) = 0.141: a 0.1 gap is within it, a 0.2 gap is not
    near = Evidence(per_approach=[agg("SL", 1.5, 0.05), agg("MRP+FT (mae)", 1.6, 0.05)])
    (line,) = measured_sentences(near)
    assert "no clear difference" in line and "image-level" in line
    far = Evidence(per_approach=[agg("SL", 1.5, 0.05), agg("MRP+FT (mae)", 1.7, 0.05)])
    assert "as the theory predicts" in measured_sentences(far)[0]
    lower = Evidence(per_approach=[agg("SL", 1.7, 0.05), agg("MRP+FT (mae)", 1.5, 0.05)])
    assert "**not** as the theory predicts" in measured_sentences(lower)[0]
    # with two seeds a side, the seeds' stds decide, not the image-level error
    two = [dict(agg("SL", 1.5, 0.001, (0, 1)), **{"eigencam.regions_mean": (1.5, 0.2)}),
           dict(agg("MRP+FT (mae)", 1.7, 0.001, (0, 1)), **{"eigencam.regions_mean": (1.7, 0.2)})]
    assert "no clear difference" in measured_sentences(Evidence(per_approach=two))[0]


def test_a_menu_run_folder_contributes_only_the_validation_chosen_stages(tmp_path):
    run = tmp_path / "run"
    for stage in ("s0-scratch-e25", "s0-scratch-e50"):
        write_checkpoint(run / "checkpoints", stage, "scratch", 0)
    (run / "summary.json").write_text(json.dumps({"stages": [
        {"stage": "s0-scratch-e25", "kind": "scratch", "selected": False},
        {"stage": "s0-scratch-e50", "kind": "scratch", "selected": True}]}))
    assert [p.name for p in checkpoints.classifier_files([str(run)])] == ["s0-scratch-e50.safetensors"]
    (run / "summary.json").unlink()  # a folder without the record (a run before menus): every stage
    assert len(checkpoints.classifier_files([str(run)])) == 2
