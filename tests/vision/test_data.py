"""vision/data/: the embedded motif generator, ImageFolder loading with its cache, batch transforms."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ValidationError

from mrplab.errors import MrplabError
from mrplab.vision import data as vd
from mrplab.vision.data import (
    ImageSet,
    VisionDataConfig,
    augment,
    channel_stats,
    load_split,
    motif_bank,
    normalize,
    save_examples,
)

CIFAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10"  # beside the repo, as configs/vision/cifar10.yaml

# --------------------------------------------------------------------------- embedded


@pytest.fixture(scope="module")
def small() -> VisionDataConfig:
    return VisionDataConfig(num_classes=4, motifs_per_class=3, n_train=300, n_test=600, single_view_train=0.2)


def test_embedded_shapes_and_dtypes(small):
    for split, n in (("train", 300), ("test", 600)):
        s = load_split(small, split)
        assert isinstance(s, ImageSet)
        assert s.images.shape == (n, 3, 32, 32) and s.images.dtype == torch.uint8
        assert s.labels.shape == (n,) and s.labels.dtype == torch.int64
        assert s.view.shape == (n,) and s.view.dtype == torch.int64
        assert s.motif_boxes.shape == (n, 3, 4) and s.motif_boxes.dtype == torch.int64
        assert s.motif_present.shape == (n, 3) and s.motif_present.dtype == torch.bool
        assert s.num_classes == 4 and len(s.classes) == 4 and s.skipped == 0
        assert set(s.labels.tolist()) == {0, 1, 2, 3}
        assert set(s.view.unique().tolist()) <= {0, 1}
        # balanced classes
        counts = torch.bincount(s.labels, minlength=4)
        assert counts.max() - counts.min() <= 1


def test_embedded_deterministic(small):
    a, b = load_split(small, "train"), load_split(small, "train")
    for f in ("images", "labels", "view", "motif_boxes", "motif_present"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the bytes do not depend on the thread count
        assert torch.equal(load_split(small, "train").images, a.images)
    finally:
        torch.set_num_threads(threads)
    other = load_split(small.model_copy(update={"bank_seed": 1}), "train")
    assert not torch.equal(a.images, other.images)
    test = load_split(small, "test")
    assert not torch.equal(a.images[:300], test.images[:300])  # splits use their own streams


def test_embedded_image_size_scales():
    s = load_split(VisionDataConfig(image_size=8, n_test=50), "test")
    assert s.images.shape == (50, 3, 8, 8)
    assert ((s.motif_boxes[s.motif_present] >= 0) & (s.motif_boxes[s.motif_present] <= 8)).all()
    s = load_split(VisionDataConfig(image_size=64, n_test=20), "test")
    assert s.images.shape == (20, 3, 64, 64)


def test_boxes_inside_and_own_motifs_do_not_overlap(small):
    s = load_split(small, "test")
    boxes, present = s.motif_boxes, s.motif_present
    on = boxes[present]  # [M, 4]
    assert (on[:, :2] >= 0).all() and (on[:, 2:] <= 32).all()
    assert (on[:, 2] > on[:, 0]).all() and (on[:, 3] > on[:, 1]).all()
    assert ((on[:, 2] - on[:, 0]) >= vd.MIN_MOTIF).all()
    assert (boxes[~present] == -1).all()
    for j in range(len(s)):
        b = boxes[j][present[j]].tolist()
        for p in range(len(b)):
            for q in range(p + 1, len(b)):
                ax0, ay0, ax1, ay1 = b[p]
                bx0, by0, bx1, by1 = b[q]
                overlap = min(ax1, bx1) > max(ax0, bx0) and min(ay1, by1) > max(ay0, by0)
                assert not overlap, (j, b[p], b[q])


def test_view_fractions_and_present_counts(small):
    for split, frac, n in (("train", 0.2, 300), ("test", 0.6, 600)):
        cfg = small.model_copy(update={"single_view_test": 0.6})
        s = load_split(cfg, split)
        margin = 4 * math.sqrt(frac * (1 - frac) / n)
        assert abs(s.view.float().mean().item() - frac) < margin
        n_present = s.motif_present.sum(1)
        assert (n_present[s.view == 1] == 1).all()
        assert (n_present[s.view == 0] == 3).all()
        # the one motif of a single-view image is uniform over L
        which = s.motif_present[s.view == 1].float().mean(0)
        assert (which - 1 / 3).abs().max() < 0.15
    assert (load_split(VisionDataConfig(n_train=100), "train").view == 0).all()  # default: all multi-view


def test_motif_pixels_differ_from_background():
    """Inside a present motif's box many pixels are far outside the image's background distribution."""
    cfg = VisionDataConfig(num_classes=6, motifs_per_class=3, n_test=300, distractor_strength=0.0)
    s = load_split(cfg, "test")
    x = s.images.float() / 255
    box_frac, bg_frac = [], []
    for j in range(len(s)):
        own = torch.zeros(32, 32, dtype=torch.bool)
        drawn = [b for b, p in zip(s.motif_boxes[j].tolist(), s.motif_present[j].tolist()) if p]
        for x0, y0, x1, y1 in drawn:
            own[y0:y1, x0:x1] = True
        bg = x[j][:, ~own]  # [3, P]
        z = ((x[j] - bg.mean(1)[:, None, None]).abs() / bg.std(1)[:, None, None]).amax(0)  # [32, 32]
        bg_frac.append((z[~own] > 3).float().mean().item())
        box_frac += [(z[y0:y1, x0:x1] > 3).float().mean().item() for x0, y0, x1, y1 in drawn]
    box_frac_t = torch.tensor(box_frac)
    assert (box_frac_t >= 0.2).float().mean() >= 0.99
    assert sum(bg_frac) / len(bg_frac) < 0.02


def test_distractors_add_other_class_motifs():
    base = dict(n_test=200, bank_seed=4)
    clean = load_split(VisionDataConfig(distractor_strength=0.0, **base), "test")
    noisy = load_split(VisionDataConfig(distractor_strength=0.6, **base), "test")
    assert torch.equal(clean.motif_boxes, noisy.motif_boxes)
    own = torch.zeros(200, 32, 32, dtype=torch.bool)
    for j in range(200):
        for x0, y0, x1, y1 in clean.motif_boxes[j][clean.motif_present[j]].tolist():
            own[j, y0:y1, x0:x1] = True
    diff = (clean.images.int() - noisy.images.int()).abs().amax(1) > 0  # [N, 32, 32]
    assert not (diff & own).any()  # distractors never touch the own motifs
    changed = diff.flatten(1).any(1).float().mean().item()
    assert 0.55 < changed < 0.85  # 70% of images carry one or two distractors


def test_motif_bank_is_distinct():
    for K, L in ((4, 2), (10, 2), (7, 2), (20, 3)):
        bank = motif_bank(VisionDataConfig(num_classes=K, motifs_per_class=L))
        shape, hue = bank.shape.flatten().tolist(), bank.hue.flatten()
        assert len(set(zip(shape, hue.tolist()))) == K * L
        if K * L <= len(vd.SHAPE_NAMES):
            assert len(set(shape)) == K * L
        for p in range(K * L):
            for q in range(p + 1, K * L):
                if shape[p] == shape[q]:
                    d = abs(hue[p] - hue[q]).item()
                    assert min(d, 1 - d) >= 0.19, (K, L, p, q)
        assert ((bank.colour >= 0) & (bank.colour <= 1)).all()


def test_embedded_config_validation():
    for bad in ({"motifs_per_class": 1}, {"num_classes": 1}, {"single_view_test": 1.5},
                {"single_view_train": -0.1}, {"distractor_strength": 2.0}, {"image_size": 4},
                {"motifs_per_class": 8, "image_size": 8}, {"color": 1}):
        with pytest.raises(ValidationError):
            VisionDataConfig(**bad)
    with pytest.raises(MrplabError, match="image_size"):
        load_split(VisionDataConfig.model_construct(**{**VisionDataConfig().model_dump(), "image_size": 4}), "test")


def test_embedded_generation_speed():
    import time

    t = time.perf_counter()
    load_split(VisionDataConfig(n_train=3000), "train")
    assert time.perf_counter() - t < 10.0  # about 1 s on 2 cores; generous for loaded machines


def test_save_examples(tmp_path, small):
    out = save_examples(load_split(small, "test"), tmp_path / "figs" / "examples.png", n=12)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 2000
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- folder source


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _tree(root: Path, classes=("ant", "bee"), per_class: int = 3, size: int = 8, seed: int = 0) -> dict:
    """train/ and test/ with random tiny PNGs; returns {relative path: array}."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in ("train", "test"):
        for c in classes:
            for k in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                rel = f"{split}/{c}/{k:02d}.png"
                _png(root / rel, arr)
                arrays[rel] = arr
    return arrays


def _cfg(root: Path, cache: Path, **kw) -> VisionDataConfig:
    return VisionDataConfig(**{"source": "folder", "root": str(root), "image_size": 8, "cache_dir": str(cache), **kw})


def _add_bad_files(split_dir: Path) -> list[Path]:
    corrupt = split_dir / "ant" / "zz_truncated.png"
    _png(corrupt, np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    corrupt.write_bytes(corrupt.read_bytes()[:400])  # header intact, pixel data cut off
    empty = split_dir / "bee" / "empty.jpg"
    empty.write_bytes(b"")
    text = split_dir / "bee" / "notes.jpg"
    text.write_text("this is not an image\n")
    (split_dir / "bee" / "README.txt").write_text("ignored: not an image extension\n")
    return [corrupt, empty, text]


def test_folder_loads_skips_bad_files_and_caches(tmp_path, capsys, monkeypatch):
    root, cache = tmp_path / "data", tmp_path / "cache"
    arrays = _tree(root)
    bad = _add_bad_files(root / "train")
    cfg = _cfg(root, cache)

    s = load_split(cfg, "train")
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert s.skipped == 3
    assert len(lines) == 3 and all(ln.startswith("warning: skipped unreadable image ") for ln in lines)
    for path in bad:
        assert sum(str(path) in ln for ln in lines) == 1
    assert "(empty file)" in lines[1] and "truncated" in lines[0]
    assert s.classes == ["ant", "bee"] and s.num_classes == 2
    assert s.images.shape == (6, 3, 8, 8) and s.images.dtype == torch.uint8
    assert s.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert s.view is None and s.motif_boxes is None
    for k, rel in enumerate(sorted(r for r in arrays if r.startswith("train/"))):
        assert np.array_equal(s.images[k].permute(1, 2, 0).numpy(), arrays[rel]), rel  # PNG is lossless

    files = list((cache / "images").glob("*.safetensors"))
    assert len(files) == 1 and "-train-8px-" in files[0].name
    assert not [p for p in (cache / "images").iterdir() if p.name.startswith(".")]  # no temp file left

    def no_decode(*a, **k):
        raise AssertionError("the cached split was decoded again")

    monkeypatch.setattr(vd.folder, "decode_files", no_decode)
    again = load_split(cfg, "train")
    assert torch.equal(again.images, s.images) and torch.equal(again.labels, s.labels)
    assert again.classes == s.classes and again.skipped == 3
    assert len([ln for ln in capsys.readouterr().err.splitlines() if "skipped unreadable" in ln]) == 3

    monkeypatch.undo()
    test = load_split(cfg, "test")  # its own cache entry
    assert test.images.shape == (6, 3, 8, 8) and test.skipped == 0


def test_folder_cache_follows_file_changes(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    _tree(root)
    cfg = _cfg(root, cache)
    first = load_split(cfg, "train")
    _png(root / "train" / "bee" / "new.png", np.zeros((8, 8, 3), np.uint8))
    second = load_split(cfg, "train")
    assert len(second) == len(first) + 1 and second.images[-1].sum() == 0
    assert len(list((cache / "images").glob("*.safetensors"))) == 2
    # a damaged cache file is ignored and rebuilt
    path = vd.cache_path(cfg, "train")
    path.write_bytes(b"garbage")
    third = load_split(cfg, "train")
    assert torch.equal(third.images, second.images)


def test_folder_resizes_to_image_size(tmp_path):
    root = tmp_path / "data"
    _tree(root, size=8)
    _png(root / "train" / "ant" / "wide.png", np.full((12, 20, 3), 200, np.uint8))
    s = load_split(_cfg(root, tmp_path / "c", image_size=16), "train")
    assert s.images.shape == (7, 3, 16, 16)
    wide = s.images[3]  # ant: 00, 01, 02, wide
    assert (wide.int() - 200).abs().max() <= 1


@pytest.mark.parametrize(
    "case, words",
    [
        ("no_root", "needs a root"),
        ("missing_root", "does not exist"),
        ("missing_test", "no test/ folder"),
        ("missing_train", "no train/ folder"),
        ("no_classes", "no class folders"),
        ("empty_class", "hold no image files"),
        ("unreadable_class", "no readable images"),
        ("class_mismatch", "class folders differ"),
    ],
)
def test_folder_bad_input(tmp_path, case, words, capsys):
    root = tmp_path / "data"
    _tree(root)
    cfg = _cfg(root, tmp_path / "cache")
    if case == "no_root":
        cfg = VisionDataConfig(source="folder", cache_dir=str(tmp_path / "cache"))
    elif case == "missing_root":
        cfg = _cfg(tmp_path / "nowhere", tmp_path / "cache")
    elif case == "missing_test":
        os.rename(root / "test", root / "tst")
    elif case == "missing_train":
        os.rename(root / "train", root / "trn")
    elif case == "no_classes":
        for c in ("ant", "bee"):
            for f in (root / "test" / c).iterdir():
                f.unlink()
            (root / "test" / c).rmdir()
        (root / "test" / "loose.png").write_bytes((root / "train" / "ant" / "00.png").read_bytes())
    elif case == "empty_class":
        (root / "train" / "cat").mkdir()
        (root / "test" / "cat").mkdir()
        (root / "train" / "cat" / "notes.txt").write_text("no images here")
        _png(root / "test" / "cat" / "00.png", np.zeros((8, 8, 3), np.uint8))
    elif case == "unreadable_class":
        for f in (root / "train" / "bee").iterdir():
            f.write_bytes(b"")
    elif case == "class_mismatch":
        _png(root / "test" / "cat" / "00.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(MrplabError, match=words) as info:
        load_split(cfg, "train")
    assert info.value.fix  # every error says how to fix it
    if case == "class_mismatch":
        assert "cat" in info.value.what
    if case == "unreadable_class":
        assert capsys.readouterr().err.count("warning: skipped unreadable image") == 3


@pytest.mark.skipif(not (CIFAR / "train").is_dir() or not (CIFAR / "test").is_dir(), reason="no CIFAR-10 copy")
def test_cifar_subset_via_symlinks(tmp_path):
    root = tmp_path / "cifar"
    picked = {}
    for split, per in (("train", 2), ("test", 1)):
        for cdir in sorted((CIFAR / split).iterdir()):
            if not cdir.is_dir():
                continue
            for f in sorted(cdir.iterdir())[:per]:
                link = root / split / cdir.name / f.name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(f)
                picked.setdefault(split, []).append(f)
    cfg = VisionDataConfig(source="folder", root=str(root), cache_dir=str(tmp_path / "cache"))
    s = load_split(cfg, "train")
    assert s.images.shape == (20, 3, 32, 32) and s.skipped == 0 and s.num_classes == 10
    assert "airplane" in s.classes
    with Image.open(picked["train"][0]) as im:
        ref = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(s.images[0], ref)
    assert load_split(cfg, "test").images.shape == (10, 3, 32, 32)


# --------------------------------------------------------------------------- batch transforms


def _batch(n=12, h=10, w=10, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_augment_shape_range_and_determinism():
    x = _batch()
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    c = augment(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(augment(x.float() / 255, torch.Generator().manual_seed(1)), a)  # uint8 and float agree


def test_augment_is_a_reflect_padded_crop_maybe_flipped():
    x = _batch(n=24)
    xf = x.float() / 255
    out = augment(x, torch.Generator().manual_seed(3))
    padded = F.pad(xf, (4, 4, 4, 4), mode="reflect")  # [B, 3, 18, 18]
    flips = set()
    offsets = set()
    for j in range(len(x)):
        found = None
        for dy in range(9):
            for dx in range(9):
                crop = padded[j, :, dy:dy + 10, dx:dx + 10]
                for flip in (False, True):
                    if torch.equal(out[j], crop.flip(-1) if flip else crop):
                        found = (dy, dx, flip)
        assert found is not None, j
        offsets.add(found[:2])
        flips.add(found[2])
    assert flips == {False, True} and len(offsets) > 10


def test_augment_flip_really_flips():
    x = _batch(n=64)
    out = augment(x, torch.Generator().manual_seed(0), pad=0)  # no crop: each image is x or its mirror
    xf = x.float() / 255
    same = [torch.equal(out[j], xf[j]) for j in range(64)]
    mirrored = [torch.equal(out[j], xf[j].flip(-1)) for j in range(64)]
    assert all(s != m for s, m in zip(same, mirrored))
    assert 16 < sum(mirrored) < 48


def test_channel_stats_and_normalize():
    x = _batch(n=50, h=8, w=8)
    mean, std = channel_stats(x)
    xf = x.float() / 255
    ref_mean = xf.mean(dim=(0, 2, 3))
    ref_std = xf.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False)
    assert torch.allclose(mean, ref_mean, atol=1e-6) and torch.allclose(std, ref_std, atol=1e-6)
    assert torch.allclose(channel_stats(xf)[0], mean, atol=1e-6)
    z = normalize(xf, mean, std)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False), torch.ones(3), atol=1e-5)
    assert torch.allclose(normalize(xf, mean.tolist(), std.tolist()), z)
