"""Vision encoders: one contract for ViT and CNN, shapes, the mask path's polarity, layer groups, errors."""

from __future__ import annotations

import pytest
import torch

from mrplab.errors import MrplabError
from mrplab.vision.models import ENCODER_NAMES, build_decoder, build_encoder
from mrplab.vision.objectives import patch_mask

FEATURE_DIMS = {"vit_tiny": 192, "vit_micro": 96, "resnet18": 512, "resnet_small": 256}


def _x(B=2, S=32, seed=0):
    return torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_encoder_contract_shapes(name):
    torch.manual_seed(0)
    enc = build_encoder(name, 32, 4, 5).eval()
    assert enc.grid == (8, 8) and enc.patch_size == 4 and enc.feature_dim == FEATURE_DIMS[name]
    x = _x()
    mask = patch_mask(2, 64, 0.75, torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, part, logits = enc.features(x), enc.features(x, mask), enc(x)
    assert logits.shape == (2, 5)
    if enc.kind == "vit":
        assert full.shape == (2, 64, enc.feature_dim)
        assert part.shape == (2, 16, enc.feature_dim)  # visible tokens only: 64 - 48
    else:
        assert full.shape == (2, enc.feature_dim, 4, 4)  # 32 px, stride-1 stem, no max-pool: stride 8
        assert part.shape == full.shape
    enc.reset_head(7)
    assert enc(x).shape == (2, 7)
    # layer groups cover every parameter exactly once, input side first
    grouped = [p for g in enc.layer_groups() for _, p in g]
    assert len(grouped) == len(list(enc.parameters()))
    assert {id(p) for p in grouped} == {id(p) for p in enc.parameters()}
    assert any(p is enc.head.weight for _, p in enc.layer_groups()[-1])


@pytest.mark.parametrize("name", ["vit_micro", "resnet_small"])
def test_masked_patches_are_hidden_from_the_encoder(name):
    """True = masked: the pixels of a masked patch cannot change the features, a visible patch's can."""
    torch.manual_seed(0)
    enc = build_encoder(name, 16, 4, 3).eval()
    x = _x(1, 16)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, [0, 5, 6, 15]] = True
    with torch.no_grad():
        base = enc.features(x, mask)
        x2 = x.clone()
        x2[:, :, 4:8, 4:8] += 3.0  # patch 5 (row 1, col 1): masked
        assert torch.allclose(enc.features(x2, mask), base, atol=1e-6)
        x2[:, :, 4:8, 0:4] += 3.0  # patch 4: visible
        assert not torch.allclose(enc.features(x2, mask), base, atol=1e-3)


def test_vit_masked_tokens_match_the_full_pass_on_visible_positions_at_depth_zero():
    """With no blocks to mix tokens, the visible tokens are exactly the full pass's tokens at those positions."""
    torch.manual_seed(0)
    enc = build_encoder("vit_micro", 16, 4, 3).eval()
    enc.vit.blocks = torch.nn.Sequential()
    x = _x(2, 16)
    mask = patch_mask(2, 16, 0.5, torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, part = enc.features(x), enc.features(x, mask)
    assert torch.allclose(part, full[~mask].reshape(2, 8, -1), atol=1e-6)


@pytest.mark.parametrize("name", ["vit_micro", "resnet_small"])
def test_decoder_predicts_every_patch(name):
    enc = build_encoder(name, 16, 4, 3)
    dec = build_decoder(enc, out_dim=48, dim=32, depth=1)
    mask = patch_mask(2, 16, 0.75, torch.Generator().manual_seed(0))
    assert dec(enc.features(_x(2, 16), mask), mask).shape == (2, 16, 48)


def test_build_encoder_errors():
    with pytest.raises(MrplabError, match="unknown model name 'vit_huge'"):
        build_encoder("vit_huge", 32, 4, 10)
    with pytest.raises(MrplabError, match="not divisible by patch size"):
        build_encoder("vit_micro", 30, 4, 10)
    with pytest.raises(MrplabError, match="not divisible by patch size"):
        build_encoder("resnet_small", 32, 5, 10)


def _mae_loss_and_grads(fused: bool):
    from mrplab.vision.objectives import MAE

    torch.manual_seed(0)
    mae = MAE(build_encoder("vit_micro", 16, 4, 3), 0.5, True, 32, 1)
    for m in mae.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    loss, _ = mae(_x(4, 16), patch_mask(4, 16, 0.5, torch.Generator().manual_seed(1)))
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in mae.named_parameters() if p.grad is not None}


def test_choose_attention_takes_the_explicit_path_only_for_bf16_on_cpu():
    from mrplab.vision.models import choose_attention

    enc = build_encoder("vit_micro", 16, 4, 3)
    cases = [("cpu", "bf16", False), ("cpu", "fp32", True), ("cuda", "bf16", True), ("cuda", "fp32", True)]
    for device, precision, fused in cases:
        assert choose_attention(enc, torch.device(device), precision) == 4  # vit_micro's 4 blocks
        assert all(blk.attn.fused_attn is fused for blk in enc.vit.blocks), (device, precision)
    assert choose_attention(build_encoder("resnet_small", 16, 4, 3), torch.device("cpu"), "bf16") == 0


def test_both_attention_kernels_compute_the_same_function():
    loss_f, grads_f = _mae_loss_and_grads(fused=True)
    loss_m, grads_m = _mae_loss_and_grads(fused=False)
    torch.testing.assert_close(loss_f, loss_m, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_m.keys()
    for k in grads_f:
        torch.testing.assert_close(grads_f[k], grads_m[k], rtol=1e-4, atol=1e-6)
