"""Any timm ViT or ResNet as an encoder (model.timm), and --init timm:NAME=FILE: a published checkpoint's
architecture (class token, register tokens, its own pooling) fine-tuned and probed by mrplab."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import yaml

from mrplab.errors import MrplabError
from mrplab.vision import train
from mrplab.vision.checkpoints import load_classifier
from mrplab.vision.interop import config_for_init, timm_encoder_state
from mrplab.vision.models import ViTEncoder, build_encoder
from tests.vision.test_train import tiny

ARCH = "vit_tiny_patch16_224"  # a class-token ViT, pooled by its class token


def _cfg(*extra: str):
    return tiny("data.image_size=32", "model.patch_size=16", *extra)


def test_a_wrapped_timm_vit_computes_what_timm_computes():
    """Class token + register tokens + average pooling + fc_norm: mrplab's forward is timm's forward; a mask
    drops exactly the masked patch tokens (what they show cannot change the features)."""
    torch.manual_seed(0)
    vit = timm.create_model(ARCH, img_size=32, num_classes=5, reg_tokens=2, global_pool="avg", fc_norm=True).eval()
    enc = ViTEncoder(vit, own_pool=True)
    assert enc.prefix == 3 and enc.grid == (2, 2) and enc.patch_size == 16
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(enc(x), vit(x), atol=1e-5)
        mask = torch.tensor([[True, False, False, True], [False, True, True, False]])
        f = enc.features(x, mask)
        assert f.shape == (2, 3 + 2, 192) and enc.patch_tokens(f).shape == (2, 2, 192)
        y = x.clone()
        y[0, :, :16, :16] += 5.0  # patch 0 of image 0 is masked
        y[1, :, :16, 16:] += 5.0  # patch 1 of image 1 is masked
        assert torch.allclose(enc.features(y, mask), f, atol=1e-6)
        y[0, :, :16, 16:] += 5.0  # patch 1 of image 0 is visible
        assert not torch.allclose(enc.features(y, mask)[0], f[0], atol=1e-3)
    token = ViTEncoder(timm.create_model(ARCH, img_size=32, num_classes=5).eval(), own_pool=True)
    with torch.no_grad():
        assert torch.allclose(token(x), token.vit(x), atol=1e-5)


def test_build_encoder_takes_timm_architectures_and_refuses_others():
    assert isinstance(build_encoder("vit_micro", 32, 16, 3, timm_name=ARCH), ViTEncoder)
    cnn = build_encoder("vit_micro", 32, 4, 3, timm_name="resnet10t")
    assert cnn.kind == "cnn" and cnn.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(MrplabError, match="16-px patches, model.patch_size is 4"):
        build_encoder("vit_micro", 32, 4, 3, timm_name=ARCH)
    with pytest.raises(MrplabError, match="neither a VisionTransformer nor a ResNet"):
        build_encoder("vit_micro", 32, 4, 3, timm_name="convnext_atto")
    with pytest.raises(Exception, match="timm has no model vit_nope"):
        _cfg("model.timm=vit_nope")


def test_finetune_and_linprobe_from_a_timm_weights_file(tmp_path):
    """A torch checkpoint of a class-token timm ViT ({"model": state_dict}, as published MAE checkpoints are)
    initialises fine-tuning and probing exactly; the runs record model.timm and their checkpoints load back."""
    torch.manual_seed(1)
    source = timm.create_model(ARCH, img_size=32, num_classes=7)
    file = tmp_path / "published.pth"
    torch.save({"model": source.state_dict(), "epoch": 99}, file)
    spec = f"timm:{ARCH}={file}"
    cfg = config_for_init(_cfg(), spec)
    assert cfg.model.timm == ARCH
    state = timm_encoder_state(spec, cfg)
    body = {f"vit.{k}": v for k, v in source.state_dict().items() if not k.startswith("head.")}
    assert state.keys() == body.keys() and all(torch.equal(state[k], body[k]) for k in body)

    runs = {}
    for command in ("finetune", "linprobe"):
        res = train.run(_cfg(), command, tmp_path / command, init=Path(spec))
        assert [r["approach"] for r in res.table] == [{"finetune": "timm -> FT", "linprobe": "timm linear probe"}[command]]
        assert yaml.safe_load((res.path / "config.yaml").read_text())["model"]["timm"] == ARCH
        runs[command] = res.path
    probe = load_classifier(runs["linprobe"] / "checkpoints" / "s0-timm-linprobe.safetensors").encoder
    assert probe.prefix == 1 and probe.vit.global_pool == "token"
    for k, v in source.state_dict().items():  # a probe trains only the head: the body is the file's
        if not k.startswith("head."):
            assert torch.equal(probe.vit.state_dict()[k], v), k
    from mrplab.vision import evidence

    ev = evidence.run_evidence([str(runs["finetune"]), str(runs["linprobe"])], None, tmp_path / "ev", 8,
                               ("eigencam",))
    assert (ev / "evidence.json").is_file()


def test_timm_weights_at_another_resolution_and_wrong_files(tmp_path):
    big = tmp_path / "224.safetensors"
    from safetensors.torch import save_file

    save_file(timm.create_model(ARCH, num_classes=0).state_dict(), str(big))  # positions for 14 x 14 patches
    spec = f"timm:{ARCH}={big}"
    state = timm_encoder_state(spec, config_for_init(_cfg(), spec))
    assert state["vit.pos_embed"].shape == (1, 1 + 4, 192)  # resampled to the 2 x 2 grid of 32-px images
    wrong = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=0).state_dict(), str(wrong))
    bad = f"timm:{ARCH}={wrong}"
    with pytest.raises(MrplabError, match=f"is not timm's {ARCH}"):
        timm_encoder_state(bad, config_for_init(_cfg(), bad))
    with pytest.raises(MrplabError, match="but model.timm is resnet10t"):
        config_for_init(_cfg("model.timm=resnet10t"), spec)
    with pytest.raises(MrplabError, match="not timm:NAME=FILE with an existing file"):
        config_for_init(_cfg(), f"timm:{ARCH}={tmp_path / 'missing.pth'}")


def test_mae_and_data2vec_pretrain_a_class_token_timm_vit(tmp_path):
    """Pretraining sees only patch tokens in the decoder and targets; the class token rides along."""
    res = train.run(_cfg(f"model.timm={ARCH}", "methods=[mae, data2vec]", "pretrain.epochs=1"), "compare",
                    tmp_path / "runs")
    import json
    import math

    assert sorted(r["approach"] for r in res.table) == ["MAE -> FT", "SL from scratch", "data2vec -> FT"]
    losses = {}
    for line in (res.path / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "pretrain" and "loss" in r:
            losses.setdefault(r["method"], []).append(r["loss"])
    assert set(losses) == {"mae", "data2vec"} and all(math.isfinite(v) for vs in losses.values() for v in vs)
