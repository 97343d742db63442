"""timm in both directions: exported folders load in timm with strict keys and compute what mrplab's encoder
computes; evidence explains plain timm models loaded from local files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mrplab.vision import train
from mrplab.vision.checkpoints import load_classifier, load_encoder
from mrplab.vision.commands import app
from mrplab.vision.models import build_encoder
from tests.vision.test_train import tiny


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory) -> Path:
    """A finished tiny compare run (vit_micro): SL, MAE pretraining, fine-tuning."""
    return train.run(tiny("methods=[mae]"), "compare", tmp_path_factory.mktemp("runs")).path


def _timm_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_features(x)  # [B, N, D] tokens after the last norm


@pytest.mark.parametrize("name", ["vit_micro", "vit_tiny"])
def test_exported_vit_loads_strictly_in_timm_and_matches(tmp_path, micro_run, name):
    if name == "vit_micro":
        run = micro_run
    else:
        run = train.run(tiny("model.name=vit_tiny", "finetune.epochs=1", "pretrain.epochs=1"), "scratch",
                        tmp_path / "runs").path
    out = tmp_path / "timm"
    res = CliRunner().invoke(app, ["export", str(run), str(out)])
    assert res.exit_code == 0, res.output
    folders = sorted(p.name for p in out.iterdir())
    expected = {"vit_micro": ["s0-mae-finetune", "s0-mae-pretrain.encoder", "s0-scratch"],
                "vit_tiny": ["s0-scratch"]}[name]
    assert folders == expected
    x = torch.randn(3, 3, 16, 16)
    for folder in folders:
        cfg = json.loads((out / folder / "config.json").read_text())
        assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["model_args"]["class_token"] is False
        model = timm.create_model(f"local-dir:{out / folder}", pretrained=True, pretrained_strict=True).eval()
        if folder.endswith(".encoder"):
            file = run / "checkpoints" / "s0-mae-pretrain.encoder.safetensors"
            enc = build_encoder(name, 16, 4, load_file(str(file))["vit.head.weight"].shape[0])
            load_encoder(file, enc)
            assert model.num_classes == 0
        else:
            enc = load_classifier(run / "checkpoints" / f"{folder}.safetensors").encoder
            with torch.no_grad():
                assert torch.allclose(model(x), enc.eval()(x), atol=1e-5)
        with torch.no_grad():
            assert torch.allclose(_timm_features(model, x), enc.eval().features(x), atol=1e-5)


def test_small_stem_resnet_export_is_refused_with_the_reason(tmp_path):
    run = train.run(tiny("model.name=resnet_small", "finetune.epochs=1", "pretrain.epochs=1"), "scratch",
                    tmp_path / "runs").path
    res = CliRunner().invoke(app, ["export", str(run), str(tmp_path / "timm")])
    assert res.exit_code == 2 and "3x3 stride-1 stem" in res.stderr and "model.stem=timm" in res.stderr
    assert not (tmp_path / "timm").exists()


def test_timm_stem_resnet18_exports_loads_strictly_and_fine_tunes_back(tmp_path):
    """A ResNet trained with timm's stem is exactly timm's resnet18 (with mrplab's stage sizes in model_args): strict load, the
    same logits and feature maps; its exported encoder starts a fine-tuning with the same weights."""
    from mrplab.vision.interop import timm_encoder_state

    cfg = tiny("model.name=resnet18", "model.stem=timm", "methods=[mae]", "finetune.epochs=1",
               "pretrain.epochs=1")
    run = train.run(cfg, "compare", tmp_path / "runs").path
    out = tmp_path / "timm"
    res = CliRunner().invoke(app, ["export", str(run), str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["s0-mae-finetune", "s0-mae-pretrain.encoder", "s0-scratch"]
    x = torch.randn(3, 3, 16, 16)
    for folder in ("s0-mae-finetune", "s0-scratch"):
        conf = json.loads((out / folder / "config.json").read_text())
        assert conf["architecture"] == "resnet18"
        assert conf["model_args"]["layers"] == [2, 2, 2, 2] and conf["model_args"]["channels"] == [64, 128, 256, 512]
        model = timm.create_model(f"local-dir:{out / folder}", pretrained=True, pretrained_strict=True).eval()
        enc = load_classifier(run / "checkpoints" / f"{folder}.safetensors").encoder.eval()
        assert enc.net.conv1.kernel_size == (7, 7)  # the run's own network has timm's stem
        with torch.no_grad():
            assert torch.allclose(model(x), enc(x), atol=1e-5)
            assert torch.allclose(model.forward_features(x), enc.features(x), atol=1e-5)
    spec = f"local-dir:{out / 's0-mae-pretrain.encoder'}"
    original = load_file(str(run / "checkpoints" / "s0-mae-pretrain.encoder.safetensors"))
    loaded = timm_encoder_state(spec, cfg)
    body = {k: v for k, v in original.items() if not k.startswith("net.fc.")}
    assert loaded.keys() == body.keys() and all(torch.equal(loaded[k], body[k]) for k in body)
    res = train.run(cfg, "finetune", tmp_path / "ft", init=Path(spec))
    assert [r["approach"] for r in res.table] == ["timm -> FT"]
    with pytest.raises(Exception, match="holds a timm resnet18, not the configured vit_micro"):
        train.run(tiny(), "finetune", tmp_path / "c", init=Path(spec))


def test_evidence_explains_plain_timm_models_from_local_files(tmp_path, micro_run):
    classes = load_classifier(micro_run / "checkpoints" / "s0-scratch.safetensors").encoder.head.out_features
    plain = timm.create_model("resnet18", num_classes=classes)
    weights = tmp_path / "resnet18.safetensors"
    save_file(plain.state_dict(), str(weights))
    exported = tmp_path / "sl-timm"
    assert CliRunner().invoke(app, ["export", str(micro_run / "checkpoints" / "s0-scratch.safetensors"),
                                    str(exported)]).exit_code == 0
    from mrplab.vision import evidence

    path = evidence.run_evidence([str(micro_run), f"timm:resnet18={weights}", f"local-dir:{exported}"], None,
                                 tmp_path / "ev", 16, ("eigencam",))
    ev = json.loads((path / "evidence.json").read_text())
    approaches = [r["approach"] for r in ev["per_model"]]
    assert approaches == ["MRP+FT (mae)", "SL", "timm resnet18", "timm vit_tiny_patch16_224"]
    by = {r["approach"]: r for r in ev["per_model"]}
    # the exported SL model, re-normalised by its own (training) statistics, predicts as the original
    assert by["timm vit_tiny_patch16_224"]["acc"] == pytest.approx(by["SL"]["acc"], abs=1e-6)


def test_bad_timm_specs_are_one_line(tmp_path, micro_run):
    from mrplab.vision import evidence
    from mrplab.errors import MrplabError

    with pytest.raises(MrplabError, match="not timm:NAME=FILE"):
        evidence.run_evidence([str(micro_run), "timm:resnet18"], None, tmp_path, 8, ("eigencam",))
    with pytest.raises(MrplabError, match="timm has no model"):
        evidence.run_evidence([str(micro_run), f"timm:nonet={__file__}"], None, tmp_path, 8, ("eigencam",))
    with pytest.raises(MrplabError, match="cannot read weights"):
        evidence.run_evidence([str(micro_run), f"timm:resnet18={__file__}"], None, tmp_path, 8, ("eigencam",))


def test_finetune_from_an_exported_timm_folder_starts_from_the_same_encoder(tmp_path, micro_run):
    from mrplab.vision.interop import timm_encoder_state

    out = tmp_path / "timm"
    assert CliRunner().invoke(app, ["export", str(micro_run), str(out)]).exit_code == 0
    cfg = tiny("methods=[mae]")
    spec = f"local-dir:{out / 's0-mae-pretrain.encoder'}"
    original = load_file(str(micro_run / "checkpoints" / "s0-mae-pretrain.encoder.safetensors"))
    loaded = timm_encoder_state(spec, cfg)
    body = {k: v for k, v in original.items() if not k.startswith("vit.head.")}  # exported without its head
    assert loaded.keys() == body.keys() and all(torch.equal(loaded[k], body[k]) for k in body)
    res = train.run(cfg, "finetune", tmp_path / "ft", init=Path(spec))
    assert [r["approach"] for r in res.table] == ["timm -> FT"]
    with pytest.raises(Exception, match="model_args differ"):
        train.run(tiny("model.patch_size=8"), "finetune", tmp_path / "c", init=Path(spec))
