"""The CAM measures on planted maps with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from mrplab.vision import measures


def blob(H: int, W: int, cy: float, cx: float, r: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    return torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))


def test_two_separated_blobs_count_two_and_one_blob_counts_one():
    two = blob(32, 32, 8, 8, 2) + blob(32, 32, 24, 24, 2)
    one = blob(32, 32, 16, 16, 3)
    merged = blob(32, 32, 16, 14, 3) + blob(32, 32, 16, 18, 3)  # overlapping: one region
    flat = torch.zeros(32, 32)
    counts = measures.count_regions(torch.stack([two, one, merged, flat]))
    assert counts.tolist() == [2, 1, 1, 0]


def test_small_specks_below_the_size_floor_are_not_regions():
    m = blob(32, 32, 10, 10, 3)
    m[25, 25] = 1.0  # a single hot pixel
    assert measures.count_regions(m[None]).tolist() == [1]
    assert measures.count_regions(m[None], min_pixels=1).tolist() == [2]


def test_region_count_is_scale_and_offset_free():
    two = blob(32, 32, 8, 8, 2) + blob(32, 32, 24, 24, 2)
    assert measures.count_regions(torch.stack([two, 5 * two - 3])).tolist() == [2, 2]


def test_motif_coverage_equals_the_planted_share():
    # three motif boxes; the map lights up motifs 0 and 2 only
    boxes = torch.tensor([[[2, 2, 10, 10], [20, 2, 28, 10], [12, 20, 20, 28]]])  # [1, 3, 4] (x0, y0, x1, y1)
    present = torch.tensor([[True, True, True]])
    cam = blob(32, 32, 6, 6, 1.5) + blob(32, 32, 24, 16, 1.5)  # centres (y, x): box 0 and box 2
    cov = measures.motif_covered(cam[None], boxes, present)
    assert cov.tolist() == [[True, False, True]]
    assert math.isclose(float(measures.motif_coverage(cam[None], boxes, present)[0]), 2 / 3, rel_tol=1e-6)
    # an absent motif is never counted, and coverage is over the present ones
    present2 = torch.tensor([[True, True, False]])
    assert float(measures.motif_coverage(cam[None], boxes, present2)[0]) == 0.5
    none = torch.zeros(1, 3, dtype=torch.bool)
    assert math.isnan(float(measures.motif_coverage(cam[None], boxes, none)[0]))


def test_top_window_finds_the_planted_region_and_occlusion_changes_exactly_it():
    cam = torch.zeros(2, 32, 32)
    cam[0, 5:13, 17:25] = 1.0  # an 8x8 hot square at y=5, x=17
    cam[1] = blob(32, 32, 20, 9, 2)
    corners = measures.top_window(cam, 8)
    assert corners[0].tolist() == [5, 17]
    y, x = corners[1].tolist()
    assert y <= 20 < y + 8 and x <= 9 < x + 8
    images = torch.rand(2, 3, 32, 32)
    fill = torch.tensor([0.25, 0.5, 0.75])
    before = images.clone()
    out = measures.occlude(images, corners, 8, fill)
    assert torch.equal(images, before)  # the input is not changed
    changed = (out != images).any(1)  # [2, 32, 32]
    inside = torch.zeros_like(changed)
    for b, (yy, xx) in enumerate(corners.tolist()):
        inside[b, yy:yy + 8, xx:xx + 8] = True
    assert torch.equal(changed, inside)
    assert torch.equal(out[0, :, 5, 17], fill)


def test_mean_se_is_std_over_sqrt_n_and_ignores_nan():
    v = torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan")])
    m, se = measures.mean_se(v)
    assert m == pytest.approx(2.5)
    assert se == pytest.approx(torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item() / 2.0)


def test_ratio_se_matches_a_bootstrap_of_paired_accuracies():
    """Occlusion's retained accuracy: the delta-method error must match a bootstrap over images, pairing
    included (an unpaired formula would overstate it: correct-after implies mostly correct-before)."""
    g = torch.Generator().manual_seed(0)
    n = 400
    clean = (torch.rand(n, generator=g) < 0.8).float()
    after = clean * (torch.rand(n, generator=g) < 0.7).float()  # most errors after occlusion are new ones
    r, se = measures.ratio_se(after, clean)
    assert r == pytest.approx((after.mean() / clean.mean()).item())
    boots = []
    for _ in range(2000):
        i = torch.randint(0, n, (n,), generator=g)
        boots.append((after[i].mean() / clean[i].mean()).item())
    boot_se = torch.tensor(boots).std().item()
    assert se == pytest.approx(boot_se, rel=0.1)
    unpaired = (after.var() / n) ** 0.5 / clean.mean()  # ignoring the pairing and the denominator's noise
    assert abs(se - unpaired.item()) > 0.1 * boot_se  # the pairing term matters here
