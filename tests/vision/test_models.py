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
