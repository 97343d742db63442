"""Vision MRP objectives: mask polarity and ratio, losses on masked patches only, EMA, momentum, collapse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mrplab.errors import MrplabError
from mrplab.vision.models import build_encoder
from mrplab.vision.objectives import (MAE, CollapseCheck, Data2Vec, channel_var, d2v_target_cnn, d2v_target_vit,
                                      ema_update, mae_loss, momentum_at, normalize_patches, patch_mask, patchify,
                                      regression_loss, unpatchify)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- masks and patches


@pytest.mark.parametrize("ratio,N", [(0.75, 64), (0.5, 16), (0.3, 10), (0.9, 49)])
def test_patch_mask_exact_count_per_row(ratio, N):
    m = patch_mask(50, N, ratio, _gen())
    assert m.dtype == torch.bool and m.shape == (50, N)
    assert (m.sum(1) == round(ratio * N)).all()  # True = masked: exactly round(ratio * N) per image
    assert len({tuple(r.tolist()) for r in m}) > 1  # rows are masked independently


def test_patch_mask_follows_its_generator():
    assert torch.equal(patch_mask(4, 16, 0.5, _gen(3)), patch_mask(4, 16, 0.5, _gen(3)))
    assert not torch.equal(patch_mask(4, 16, 0.5, _gen(3)), patch_mask(4, 16, 0.5, _gen(4)))


def test_patchify_layout_and_inverse():
    x = torch.randn(2, 3, 8, 12, generator=_gen())
    t = patchify(x, 4)  # grid 2 x 3
    assert t.shape == (2, 6, 48)
    # patch 4 = row 1, column 1: pixels x[:, :, 4:8, 4:8] in (row, col, channel) order
    assert torch.equal(t[:, 4], x[:, :, 4:8, 4:8].permute(0, 2, 3, 1).reshape(2, 48))
    assert torch.equal(unpatchify(t, 4, (2, 3)), x)


# --------------------------------------------------------------------------- losses


def test_mae_loss_counts_masked_patches_only():
    pred, target = torch.randn(2, 2, 8, 12, generator=_gen(1)).reshape(2, 16, 12).unbind(0)
    pred, target = pred.unsqueeze(0), target.unsqueeze(0)  # [1, 16, 12]
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, [1, 5, 9]] = True
    for norm_pix in (False, True):
        base = mae_loss(pred, target, mask, norm_pix)
        p2 = pred.clone()
        p2[0, 0] += 10.0  # visible patch
        assert torch.equal(mae_loss(p2, target, mask, norm_pix), base)
        p2[0, 5] += 1.0  # masked patch
        assert mae_loss(p2, target, mask, norm_pix) > base
    # the value: mean over masked patches of the per-patch mean squared error
    expect = (pred[0, [1, 5, 9]] - target[0, [1, 5, 9]]).pow(2).mean()
    assert torch.allclose(mae_loss(pred, target, mask, False), expect)
    t_norm = normalize_patches(target)
    assert torch.allclose(mae_loss(pred, target, mask, True), (pred[0, [1, 5, 9]] - t_norm[0, [1, 5, 9]]).pow(2).mean())


def test_normalize_patches_zero_mean_unit_var():
    t = normalize_patches(torch.randn(3, 5, 48, generator=_gen()) * 4 + 2)
    assert torch.allclose(t.mean(-1), torch.zeros(3, 5), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(3, 5), atol=1e-4)


def test_regression_loss_counts_masked_positions_only():
    pred, target = torch.randn(2, 3, 10, 8, generator=_gen(2)).unbind(0)
    mask = patch_mask(3, 10, 0.5, _gen())
    base = regression_loss(pred, target, mask)
    i, j = (~mask).nonzero()[0].tolist()
    p2 = pred.clone()
    p2[i, j] += 5.0
    assert torch.equal(regression_loss(p2, target, mask), base)
    i, j = mask.nonzero()[0].tolist()
    p2[i, j] += 5.0
    assert regression_loss(p2, target, mask) > base


# --------------------------------------------------------------------------- data2vec pieces


def test_d2v_targets_layer_normed_average():
    outs = [torch.randn(2, 16, 8, generator=_gen(s)) * (s + 1) + s for s in range(3)]
    t = d2v_target_vit(outs[1:])
    ln = [(o - o.mean(-1, keepdim=True)) / (o.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt() for o in outs[1:]]
    assert t.shape == (2, 16, 8)
    assert torch.allclose(t, (ln[0] + ln[1]) / 2, atol=1e-5)
    fmap = torch.randn(2, 8, 4, 4, generator=_gen())
    c = d2v_target_cnn(fmap, (8, 8))  # coarser map spread over the finer patch grid
    assert c.shape == (2, 64, 8)
    assert torch.allclose(c.mean(-1), torch.zeros(2, 64), atol=1e-5)


def test_ema_update_formula_and_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    teacher = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    student[1].running_mean.fill_(0.7)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t0, t, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-7)
    assert torch.equal(teacher[1].running_mean, student[1].running_mean)
    ema_update(teacher, student, 0.0)  # momentum 0 copies the student
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))


def test_momentum_schedule_endpoints():
    assert momentum_at(0, 100, 0.999, 0.9999) == 0.999
    assert momentum_at(100, 100, 0.999, 0.9999) == pytest.approx(0.9999)
    assert momentum_at(50, 100, 0.99, 0.999) == pytest.approx(0.9945)
    assert momentum_at(500, 100, 0.99, 0.999) == pytest.approx(0.999)  # clamped past the end


def test_collapse_check_raises_after_patience_and_resets():
    c = CollapseCheck(floor=0.01, patience=3)
    c.update(0.001, 1)
    c.update(0.001, 2)
    c.update(0.5, 3)  # a healthy value resets the count
    c.update(0.001, 4)
    c.update(0.001, 5)
    with pytest.raises(MrplabError, match="collapsed"):
        c.update(0.001, 6)


def test_channel_var_sees_collapse_after_layer_norm():
    healthy = d2v_target_vit([torch.randn(4, 16, 8, generator=_gen())])
    collapsed = d2v_target_vit([torch.randn(1, 1, 8, generator=_gen()).expand(4, 16, 8)])  # every token alike
    assert channel_var(healthy) > 0.5
    assert channel_var(collapsed) < 1e-6


# --------------------------------------------------------------------------- pretrainers


@pytest.mark.parametrize("name", ["vit_micro", "resnet_small"])
def test_pretrainers_loss_and_stats(name):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=_gen())
    mask = patch_mask(4, 16, 0.5, _gen())
    mae = MAE(build_encoder(name, 16, 4, 3), 0.5, True, 32, 1)
    assert mae.predict(x, mask).shape == (4, 16, 48)
    loss, stats = mae(x, mask)
    loss.backward()
    assert loss.ndim == 0 and stats == {}
    assert mae.encoder.head.weight.grad is None  # the classification head takes no part in pretraining
    d2v = Data2Vec(build_encoder(name, 16, 4, 3), 0.5, 1, 32, 1)
    loss, stats = d2v(x, mask)
    loss.backward()
    assert set(stats) == {"target_var", "pred_var"} and stats["target_var"] > 0
    assert all(p.grad is None for p in d2v.teacher.parameters())  # the teacher learns only by EMA
    assert any(p.grad is not None for p in d2v.encoder.parameters())
