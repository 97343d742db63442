"""Typed configs: validation messages name the key, overrides parse, files fail cleanly, hash is stable."""

from __future__ import annotations

import re

import pytest

from mrplab import config
from mrplab.config import DataConfig, TheoryConfig, apply_overrides, load, read_yaml, validate
from mrplab.errors import MrplabError


def test_defaults_validate_and_roundtrip(tmp_path):
    cfg = validate({})
    assert isinstance(cfg, TheoryConfig)
    assert cfg == TheoryConfig()
    assert cfg.capture_threshold == (cfg.probes.capture_threshold or cfg.net.threshold)
    # the dumped YAML loads back to the same config
    p = tmp_path / "c.yaml"
    p.write_text(config.dump_yaml(cfg))
    assert load(p) == cfg
    assert load(p).hash() == cfg.hash()


def test_capture_threshold_falls_back_to_activation_threshold():
    cfg = validate({"net": {"threshold": 0.7}, "probes": {"capture_threshold": None}})
    assert cfg.capture_threshold == 0.7
    cfg = validate({"net": {"threshold": 0.7}, "probes": {"capture_threshold": 0.3}})
    assert cfg.capture_threshold == 0.3


def test_noise_std_default():
    assert DataConfig(d=400, sigma_p=None).noise_std == pytest.approx(0.01)
    assert DataConfig(d=400, sigma_p=0.3).noise_std == 0.3


def test_unknown_top_level_key():
    with pytest.raises(MrplabError) as e:
        validate({"lerning_rate": 1.0})
    assert "lerning_rate" in str(e.value)
    assert "unknown" in str(e.value)


def test_unknown_nested_key():
    with pytest.raises(MrplabError) as e:
        validate({"mrp": {"mask_ratoi": 0.5}})
    assert "mrp.mask_ratoi" in str(e.value)
    with pytest.raises(MrplabError) as e:
        load(None, ["data.nope=3"])
    assert "data.nope" in str(e.value)


@pytest.mark.parametrize("bad", [-0.1, 1.5, 0.0, 1.0])
def test_mask_ratio_out_of_range(bad):
    with pytest.raises(MrplabError) as e:
        validate({"mrp": {"mask_ratio": bad}})
    assert "mrp.mask_ratio" in str(e.value)
    assert e.value.fix  # says how to fix it


@pytest.mark.parametrize("raw,key", [
    ({"data": {"k": 1}}, "data.k"),
    ({"net": {"sigma_0": 0.0}}, "net.sigma_0"),
    ({"mrp": {"loss_norm": 1.5}}, "mrp.loss_norm"),
    ({"data": {"gamma": 1.0}}, "data.gamma"),
    ({"data": {"coverage": -0.5}}, "data.coverage"),
    ({"finetune": {"mode": "linear"}}, "finetune.mode"),
    ({"seeds": []}, "seeds"),
    ({"name": "bad name/with slash"}, "name"),
])
def test_out_of_range_names_key(raw, key):
    with pytest.raises(MrplabError) as e:
        validate(raw)
    assert re.search(rf"'{re.escape(key)}'", str(e.value)), str(e.value)


def test_mask_ratio_in_range_ok():
    assert validate({"mrp": {"mask_ratio": 0.9}}).mrp.mask_ratio == 0.9


def test_orthonormal_features_must_fit():
    base = {"P": 20, "C_p": 2}
    with pytest.raises(MrplabError) as e:
        validate({"data": {**base, "k": 10, "L": 2, "d": 15, "features": "orthonormal"}})
    msg = str(e.value)
    assert "data" in msg and "20" in msg and "15" in msg
    # exactly fitting is fine, random features may exceed d
    assert validate({"data": {**base, "k": 10, "L": 2, "d": 20, "features": "orthonormal"}}).data.d == 20
    assert validate({"data": {**base, "k": 10, "L": 2, "d": 15, "features": "random"}}).data.features == "random"
    # extra pretraining classes count too
    with pytest.raises(MrplabError):
        validate({"data": {**base, "k": 10, "L": 2, "d": 21, "extra_pretrain_classes": 1}})
    assert validate({"data": {**base, "k": 10, "L": 2, "d": 22, "extra_pretrain_classes": 1}}).data.d == 22


def test_patches_must_fit():
    with pytest.raises(MrplabError) as e:
        validate({"data": {"L": 3, "C_p": 3, "P": 8, "k": 2, "d": 50}})
    assert "data.P" in str(e.value) or "P = 8" in str(e.value)
    assert validate({"data": {"L": 3, "C_p": 3, "P": 9, "k": 2, "d": 50}}).data.P == 9


def test_c_lo_not_above_off_class_max():
    with pytest.raises(MrplabError) as e:
        validate({"data": {"c_lo": 0.3, "off_class_max": 0.2}})
    assert "c_lo" in str(e.value)


def test_seeds_distinct():
    with pytest.raises(MrplabError) as e:
        load(None, ["seeds=[1,1]"])
    assert "distinct" in str(e.value)


# --------------------------------------------------------------------------- overrides


def test_apply_overrides_parses_types():
    raw = apply_overrides({}, [
        "data.k=7", "mrp.mask_ratio=0.6", "seeds=[4, 5]", "data.share_across_runs=true",
        "mrp.loss_norm=null", "net.decoder=diag", "mrp.lr=1e-2",
    ])
    assert raw["data"]["k"] == 7 and isinstance(raw["data"]["k"], int)
    assert raw["mrp"]["mask_ratio"] == 0.6 and isinstance(raw["mrp"]["mask_ratio"], float)
    assert raw["seeds"] == [4, 5]
    assert raw["data"]["share_across_runs"] is True
    assert raw["mrp"]["loss_norm"] is None
    assert raw["net"]["decoder"] == "diag"
    cfg = validate(raw)
    assert cfg.data.k == 7 and cfg.mrp.mask_ratio == 0.6 and cfg.seeds == [4, 5]
    assert cfg.data.share_across_runs is True and cfg.mrp.loss_norm is None and cfg.net.decoder == "diag"
    assert cfg.mrp.lr == pytest.approx(0.01)


def test_apply_overrides_does_not_mutate_and_later_wins():
    raw = {"data": {"k": 3}, "name": "x"}
    out = apply_overrides(raw, ["data.k=4", "data.k=5", "data.L=3"])
    assert raw == {"data": {"k": 3}, "name": "x"}
    assert out == {"data": {"k": 5, "L": 3}, "name": "x"}


def test_overrides_on_top_of_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: exp1\nmrp:\n  mask_ratio: 0.3\n  lr: 2.0\n")
    cfg = load(p, ["mrp.mask_ratio=0.7"])
    assert cfg.name == "exp1" and cfg.mrp.mask_ratio == 0.7 and cfg.mrp.lr == 2.0


@pytest.mark.parametrize("bad", ["mrp.mask_ratio", "=3", "..=3"])
def test_malformed_override(bad):
    with pytest.raises(MrplabError):
        apply_overrides({}, [bad])


def test_override_into_a_value_is_an_error():
    with pytest.raises(MrplabError) as e:
        apply_overrides({"name": "x"}, ["name.sub=1"])
    assert "name" in str(e.value)


# --------------------------------------------------------------------------- files


def test_missing_file(tmp_path):
    with pytest.raises(MrplabError) as e:
        load(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(e.value)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(MrplabError):
        read_yaml(tmp_path)


def test_invalid_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  k: [1, 2\n  L: 3\n")
    with pytest.raises(MrplabError) as e:
        load(p)
    assert "bad.yaml" in str(e.value) and "YAML" in str(e.value)


def test_yaml_not_a_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(MrplabError):
        load(p)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load(empty) == TheoryConfig()


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("net:\n  kernels: 4\n")
    with pytest.raises(MrplabError) as e:
        load(p)
    assert "net.kernels" in str(e.value)


# --------------------------------------------------------------------------- hash


def test_hash_stable_and_sensitive():
    a, b = validate({}), load(None, [])
    assert a.hash() == b.hash()
    assert re.fullmatch(r"[0-9a-f]{12}", a.hash())
    changed = load(None, ["mrp.mask_ratio=0.61"])
    assert changed.hash() != a.hash()
    assert load(None, ["data.gamma=0.021"]).hash() != a.hash()
    assert load(None, ["seeds=[0]"]).hash() != load(None, ["seeds=[1]"]).hash()
    # the value, not the way it was written, decides the hash
    assert load(None, ["mrp.mask_ratio=0.61"]).hash() == validate({"mrp": {"mask_ratio": 0.61}}).hash()
    # order of overrides on different keys does not matter
    h1 = load(None, ["data.k=6", "net.m=2"]).hash()
    h2 = load(None, ["net.m=2", "data.k=6"]).hash()
    assert h1 == h2


def test_a_setting_added_later_keeps_old_keys_at_its_neutral_value():
    """model.stem came after finished sweep rows and cached pretrainings were keyed: at its neutral value the
    hash is the one the config had without the setting; at any other value the hash moves."""
    import hashlib
    import json

    from mrplab.vision import checkpoints, stages
    from mrplab.vision.config import VisionConfig

    cfg = VisionConfig()
    dumped = cfg.model_dump(mode="json")
    assert dumped["model"].pop("stem") == "small" and dumped["model"].pop("timm") is None
    dumped.pop("pretrain_cache")  # never part of a vision hash
    assert cfg.hash() == hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:12]
    timm_stem = VisionConfig.model_validate({"model": {"stem": "timm"}})
    assert timm_stem.hash() != cfg.hash()
    stage = stages.Stage("pretrain", 0, "mae")
    assert checkpoints.pretrain_key(timm_stem, stage) != checkpoints.pretrain_key(cfg, stage)


def test_mrplab_error_line():
    err = MrplabError("what went wrong", "how to fix")
    assert str(err) == "what went wrong (how to fix)"
    assert MrplabError("only what").line() == "only what"


def test_default_preset_file_is_the_defaults():
    """configs/theory-default.yaml holds exactly TheoryConfig()'s defaults (regenerate with write_default_preset)."""
    from pathlib import Path

    from mrplab import config as cfgmod

    root = Path(__file__).resolve().parents[1]
    text = (root / "configs" / "theory-default.yaml").read_text()
    assert text == cfgmod.commented_defaults()
    assert cfgmod.load(root / "configs" / "theory-default.yaml") == cfgmod.TheoryConfig()


def test_teacher_momentum_schedule_is_linear_from_start_to_end():
    from mrplab.config import MRPConfig

    c = MRPConfig(steps=100, teacher_momentum=0.99, teacher_momentum_end=0.999)
    assert c.momentum(0) == pytest.approx(0.99) and c.momentum(100) == pytest.approx(0.999)
    assert c.momentum(50) == pytest.approx(0.9945) and c.momentum(500) == pytest.approx(0.999)
    assert MRPConfig(teacher_momentum=0.9).momentum(77) == 0.9  # no end: constant
    # the divisor's power applies to per_kernel / per_run only
    assert MRPConfig(target_norm="per_sample").norm_power(4) == 0.0
    assert MRPConfig().norm_power(4) == pytest.approx(0.75)
    # the target's scope: all patches for the teacher, the masked ones for pixels, unless set
    assert MRPConfig().scope == "all" and MRPConfig(target="pixels").scope == "masked"
    assert MRPConfig(target_scope="masked").scope == "masked"
