"""vision/splits.py: the labelled subset, its validation images, and the pretraining set."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mrplab.errors import MrplabError
from mrplab.vision import config as vconfig
from mrplab.vision import splits, train
from mrplab.vision.data import ImageSet, load_split


def pool(per_class: tuple[int, ...]) -> ImageSet:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    return ImageSet(torch.zeros(len(labels), 3, 8, 8, dtype=torch.uint8), labels, [f"c{i}" for i in range(len(per_class))])


def test_labelled_subset_is_balanced_deterministic_and_disjoint_from_validation():
    p = pool((50, 40, 60))
    cfg = vconfig.LabelsConfig(per_class=20, val_fraction=0.25)
    a = splits.labelled_subset(p, cfg, seed=3)
    assert torch.bincount(p.labels[a.train], minlength=3).tolist() == [15, 15, 15]
    assert torch.bincount(p.labels[a.val], minlength=3).tolist() == [5, 5, 5]
    assert not set(a.train.tolist()) & set(a.val.tolist())
    again = splits.labelled_subset(p, cfg, seed=3)
    assert torch.equal(a.train, again.train) and torch.equal(a.val, again.val)  # deterministic in the seed
    other = splits.labelled_subset(p, cfg, seed=4)
    assert not torch.equal(a.train, other.train)  # another seed, another subset
    fixed = vconfig.LabelsConfig(per_class=20, val_fraction=0.25, seed=9)
    assert torch.equal(splits.labelled_subset(p, fixed, 3).train, splits.labelled_subset(p, fixed, 4).train)


def test_fraction_and_everything():
    p = pool((50, 40, 60))
    f = splits.labelled_subset(p, vconfig.LabelsConfig(fraction=0.1), seed=0)
    assert torch.bincount(p.labels[f.train], minlength=3).tolist() == [4, 3, 5]  # 5, 4, 6 less one each
    assert torch.bincount(p.labels[f.val], minlength=3).tolist() == [1, 1, 1]  # val_fraction 0.2, at least 1
    # a fraction given alone replaces the default per_class; given beside an explicit one it is an error
    assert vconfig.load(None, ["labels.fraction=0.1"]).labels.per_class is None
    with pytest.raises(MrplabError, match="not both"):
        vconfig.load(None, ["labels.fraction=0.1", "labels.per_class=5"])
    full = splits.labelled_subset(p, vconfig.LabelsConfig(per_class=None, val_fraction=0), seed=0)
    assert torch.equal(full.train, torch.arange(150)) and len(full.val) == 0  # the old behaviour, in order


def test_too_few_images_are_user_errors():
    p = pool((5, 40))
    with pytest.raises(MrplabError, match="labels.per_class = 6 but class c0 has 5 training images"):
        splits.labelled_subset(p, vconfig.LabelsConfig(per_class=6), seed=0)
    with pytest.raises(MrplabError, match="none is left to train on"):
        splits.labelled_subset(p, vconfig.LabelsConfig(per_class=1, val_fraction=0.5), seed=0)


def test_embedded_pretraining_never_holds_a_downstream_image_and_honours_coverage():
    cfg = vconfig.load(None, ["data.image_size=16", "data.n_train=200", "data.n_test=200",
                              "pretrain.data.source=embedded", "pretrain.data.n_images=300",
                              "pretrain.data.coverage=0.5", "pretrain.data.extra_classes=1"])
    test = load_split(cfg.data, "test")
    trn = load_split(cfg.data, "train")
    pre = splits.pretrain_images(cfg, trn)
    assert len(pre) == 300 and pre.classes[-1] == "extra0"
    seen = {bytes(img.numpy().tobytes()) for img in pre.images}
    assert not seen & {bytes(img.numpy().tobytes()) for img in test.images}
    assert not seen & {bytes(img.numpy().tobytes()) for img in trn.images}
    # coverage 0.5 of L = 2: only each class's first motif is ever drawn as its own motif
    assert pre.motif_present[:, 0].all() and not pre.motif_present[:, 1].any()


def test_folder_pretraining_reads_train_only_and_subsets(tmp_path):
    from PIL import Image

    for split, n in (("train", 6), ("test", 4)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                colour = (10 * i + (100 if split == "test" else 0), 50 if c == "a" else 150, 0)
                Image.new("RGB", (8, 8), colour).save(tmp_path / split / c / f"{i}.png")
    cfg = vconfig.load(None, ["data.source=folder", f"data.root={tmp_path}", "data.image_size=8",
                              f"data.cache_dir={tmp_path / 'cache'}", "model.patch_size=4",
                              "pretrain.data.source=folder", "pretrain.data.n_images=5"])
    trn, test = train.load_data(cfg)
    pre = splits.pretrain_images(cfg, trn)
    assert len(pre) == 5
    test_images = {bytes(img.numpy().tobytes()) for img in test.images}
    assert not {bytes(img.numpy().tobytes()) for img in pre.images} & test_images
    with pytest.raises(MrplabError, match="n_images = 13 but the folder source has 12 images"):
        splits.pretrain_images(cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(
            update={"data": cfg.pretrain.data.model_copy(update={"n_images": 13})})}), trn)


def test_a_run_trains_on_its_subsets_and_writes_the_index(tmp_path):
    cfg = vconfig.load(None, ["data.image_size=16", "data.n_train=80", "data.n_test=32", "seeds=[0, 1]",
                              "pretrain.epochs=1", "finetune.epochs=1", "pretrain.batch=1000", "checkpoint_every=0",
                              "labels.per_class=5", "labels.val_fraction=0.2", "precision=fp32", "finetune.epochs_menu=null",
                              "pretrain.data.source=embedded", "pretrain.data.n_images=48", "model.decoder_dim=32"])
    res = train.run(cfg, "compare", tmp_path)
    by_stage = {r["stage"]: r for r in res.stages}
    assert by_stage["s0-mae-pretrain"]["images"] == 48 and by_stage["s0-mae-pretrain"]["batch"] == 48  # capped
    assert by_stage["s0-scratch"]["images"] == 16 and by_stage["s0-mae-finetune"]["images"] == 16  # 4 classes x 4
    assert "val_acc" in by_stage["s0-scratch"] and "test_acc" in by_stage["s1-mae-finetune"]
    index = {s: json.loads((res.path / "labels" / f"s{s}.json").read_text()) for s in (0, 1)}
    for s in (0, 1):
        assert index[s]["train_per_class"] == {f"class{i}": 4 for i in range(4)}
        assert not set(index[s]["train"]) & set(index[s]["val"])
    assert index[0]["train"] != index[1]["train"]  # each seed draws its own subset


def test_a_shared_pretraining_is_reused_by_other_label_counts(tmp_path):
    base = ["data.image_size=16", "data.n_train=80", "data.n_test=32", "seeds=[0]", "pretrain.epochs=1",
            "finetune.epochs=1", "checkpoint_every=0", "precision=fp32", "threads=2", "model.decoder_dim=32",
            "finetune.epochs_menu=null", "labels.val_fraction=0",
            "pretrain.data.source=embedded", "pretrain.data.n_images=64", f"pretrain_cache={tmp_path / 'cache'}"]
    pretrainings = lambda: [p for p in (tmp_path / "cache").iterdir() if (p / "pretrainer.safetensors").is_file()]  # noqa: E731
    first = train.run(vconfig.load(None, [*base, "labels.per_class=10"]), "compare", tmp_path / "a")
    assert len(pretrainings()) == 1  # one pretraining row ...
    again = train.run(vconfig.load(None, [*base, "labels.per_class=10"]), "compare", tmp_path / "b")
    fewer = train.run(vconfig.load(None, [*base, "labels.per_class=4"]), "compare", tmp_path / "c")
    assert len(pretrainings()) == 1  # ... for every downstream run
    rec = lambda res, key: next(r for r in res.stages if r["stage"] == key)  # noqa: E731
    assert not rec(first, "s0-mae-pretrain")["reused"]
    assert rec(again, "s0-mae-pretrain")["reused"] and rec(fewer, "s0-mae-pretrain")["reused"]
    # the reused encoder is the same one: fine-tuning on the same labels gives the same model
    assert rec(again, "s0-mae-finetune")["test_acc"] == rec(first, "s0-mae-finetune")["test_acc"]
    a = load_file(str(first.path / "checkpoints" / "s0-mae-pretrain.encoder.safetensors"))
    c = load_file(str(fewer.path / "checkpoints" / "s0-mae-pretrain.encoder.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    # a different pretraining (another seed) is not confused with it
    other = train.run(vconfig.load(None, [*base, "seeds=[1]", "labels.per_class=10"]), "compare", tmp_path / "d")
    assert not rec(other, "s1-mae-pretrain")["reused"] and len(pretrainings()) == 2


def test_sl_from_scratch_is_shared_by_rows_that_differ_only_in_pretraining(tmp_path):
    """Coverage rows of a study train the same SL model: the second row loads it (same weights, the accuracies
    measured when it was trained, equal to training it again without the cache); other labels train anew."""
    base = ["data.image_size=16", "data.n_train=80", "data.n_test=32", "seeds=[0]", "pretrain.epochs=1",
            "finetune.epochs=1", "checkpoint_every=0", "precision=fp32", "threads=2", "model.decoder_dim=32",
            "finetune.epochs_menu=null", "labels.per_class=10", "methods=[mae]",
            "pretrain.data.source=embedded", "pretrain.data.n_images=64"]
    cache = f"pretrain_cache={tmp_path / 'cache'}"
    rec = lambda res, key: next(r for r in res.stages if r["stage"] == key)  # noqa: E731
    first = train.run(vconfig.load(None, [*base, cache, "pretrain.data.coverage=1.0"]), "compare", tmp_path / "a")
    half = train.run(vconfig.load(None, [*base, cache, "pretrain.data.coverage=0.5"]), "compare", tmp_path / "b")
    fresh = train.run(vconfig.load(None, [*base, "pretrain.data.coverage=0.5"]), "compare", tmp_path / "c")
    assert not rec(first, "s0-scratch")["reused"] and rec(half, "s0-scratch")["reused"]
    assert not rec(half, "s0-mae-pretrain")["reused"]  # the pretraining itself differs
    for key in ("test_acc", "test_acc_single", "test_acc_multi", "val_acc"):
        assert rec(half, "s0-scratch")[key] == rec(first, "s0-scratch")[key] == rec(fresh, "s0-scratch")[key], key
    a = load_file(str(first.path / "checkpoints" / "s0-scratch.safetensors"))
    b = load_file(str(half.path / "checkpoints" / "s0-scratch.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(json.loads(line).get("event") == "reused" for line in (half.path / "metrics.jsonl").read_text().splitlines())
    other = train.run(vconfig.load(None, [*base, cache, "labels.per_class=6"]), "compare", tmp_path / "d")
    assert not rec(other, "s0-scratch")["reused"]


def test_the_epochs_menu_is_chosen_on_validation_never_on_test():
    from mrplab.vision import report

    rec = lambda kind, seed, e, val, test: {"kind": kind, "seed": seed, "method": "mae" if kind == "finetune" else None,  # noqa: E731
                                            "epochs": e, "val_acc": val, "test_acc": test}
    recs = [rec("scratch", 0, 2, 0.5, 0.9), rec("scratch", 0, 5, 0.6, 0.1),  # the better test score is ignored
            rec("finetune", 0, 2, 0.7, 0.3), rec("finetune", 0, 5, 0.7, 0.8)]  # a tie: the fewer epochs
    report.select(recs)
    assert [r["selected"] for r in recs] == [False, True, True, False]
    table = report.accuracy_table(recs)
    assert [(r["approach"], r["epochs"], r["acc"]) for r in table] == [("SL from scratch", 5, 0.1),
                                                                        ("MAE -> FT", 2, 0.3)]
    assert len(report.accuracy_table(recs, menu=True)) == 4


def test_the_epochs_menu_needs_validation_images():
    with pytest.raises(MrplabError, match="set labels.val_fraction > 0"):
        vconfig.load(None, ["finetune.epochs_menu=[2, 5]", "labels.val_fraction=0"])
    cfg = vconfig.load(None, ["finetune.epochs_menu=[2, 5]", "labels.val_fraction=0.2", "seeds=[0]"])
    from mrplab.vision.stages import plan

    assert [s.key for s in plan(cfg, "compare")] == ["s0-scratch-e2", "s0-scratch-e5", "s0-mae-pretrain",
                                                      "s0-mae-finetune-e2", "s0-mae-finetune-e5"]
