"""Sweep files: expansion into keyed runs, base resolution, and one-line errors before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mrplab import config as config_mod
from mrplab.cli import app
from mrplab.errors import MrplabError
from mrplab.sweep import spec

from tests.sweep.helpers import TINY_BASE, write_sweep

REPO = Path(__file__).resolve().parents[2]
PRESETS = ["mask_ratio", "single_view_fraction", "coverage", "features_per_class", "classes"]


def test_grid_zip_and_seeds_expand_to_one_keyed_run_per_combination(tmp_path):
    path = write_sweep(
        tmp_path,
        base={**TINY_BASE, "data": {**TINY_BASE["data"], "P": 8}},
        grid={"mrp.mask_ratio": [0.2, 0.6], "data.L": [2, 3]},
        zip={"data.mu_train": [0.0, 0.1, 0.2], "data.mu_test": [0.3, 0.4, 0.5]},
        seeds=[5, 7],
    )
    sw = spec.load_sweep(path)
    assert len(sw.runs) == 2 * 2 * 3 * 2
    assert sw.axes == ["mrp.mask_ratio", "data.L", "data.mu_train", "data.mu_test"]
    # zip axes step together; grid axes form the product; every run is one seed
    combos = {(r.axes["mrp.mask_ratio"], r.axes["data.L"], r.axes["data.mu_train"], r.axes["data.mu_test"], r.seed)
              for r in sw.runs}
    assert len(combos) == 24
    assert all((mu_tr, mu_te) in {(0.0, 0.3), (0.1, 0.4), (0.2, 0.5)} for _, _, mu_tr, mu_te, _ in combos)
    for r in sw.runs:
        assert r.cfg.seeds == [r.seed]
        assert r.cfg.mrp.mask_ratio == r.axes["mrp.mask_ratio"] and r.cfg.data.mu_test == r.axes["data.mu_test"]
        assert r.cfg.data.d == TINY_BASE["data"]["d"]  # the base is applied under the axes
        assert r.key == r.cfg.hash()
    # seeds are the outermost loop; runs differing only in seed share a setting
    assert [r.seed for r in sw.runs[:12]] == [5] * 12
    assert len({r.setting for r in sw.runs}) == 12
    assert len({r.key for r in sw.runs}) == 24


def test_key_is_the_config_hash_whatever_file_produced_it(tmp_path):
    a = spec.load_sweep(write_sweep(tmp_path, name="a", grid={"mrp.mask_ratio": [0.3]}, seeds=[1]))
    b = spec.load_sweep(write_sweep(tmp_path, name="b", base={**TINY_BASE, "mrp": {**TINY_BASE["mrp"], "mask_ratio": 0.3}},
                                    seeds=[1]))
    expected = config_mod.validate({**TINY_BASE, "mrp": {**TINY_BASE["mrp"], "mask_ratio": 0.3}, "seeds": [1]}).hash()
    assert a.runs[0].key == b.runs[0].key == expected


def test_base_file_inline_overrides_and_set(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "small.yaml").write_text(yaml.safe_dump({**TINY_BASE, "seeds": [3, 4]}))
    path = write_sweep(tmp_path, base={"file": "configs/small.yaml", "sl.steps": 7, "data": {"n_test": 80}})
    sw = spec.load_sweep(path, overrides=["mrp.steps=9"])
    assert [r.seed for r in sw.runs] == [3, 4]  # no seeds axis: the base's seeds
    cfg = sw.runs[0].cfg
    assert (cfg.sl.steps, cfg.data.n_test, cfg.mrp.steps, cfg.data.d) == (7, 80, 9, 16)
    # a path-only base, relative to the sweep file
    sw2 = spec.load_sweep(write_sweep(tmp_path, name="p", base="configs/small.yaml"))
    assert sw2.runs[0].cfg.data.d == 16
    # the normalized copy is self-contained and expands to the same keys
    again = spec.from_mapping(yaml.safe_load(sw.to_yaml()))
    assert [r.key for r in again.runs] == [r.key for r in sw.runs]


def test_values_that_resolve_to_the_same_config_are_rejected(tmp_path):
    with pytest.raises(MrplabError, match="twice"):
        spec.load_sweep(write_sweep(tmp_path, grid={"data.L": [2, 2]}))


# --------------------------------------------------------------------------- bad files through the CLI


def _bad(tmp_path: Path, **keys) -> Path:
    return write_sweep(tmp_path, **keys)


BAD = {
    "unknown axis key": (dict(grid={"mrp.mask_ratoi": [0.1]}), "unknown config key 'mrp.mask_ratoi'"),
    "unknown base key": (dict(base={**TINY_BASE, "sl": {"stpes": 3}}), "unknown config key 'sl.stpes'"),
    "empty axis": (dict(grid={"mrp.mask_ratio": []}), "axis grid 'mrp.mask_ratio' is empty"),
    "wrong-type value": (dict(grid={"data.k": [2, "many"]}), "axis 'data.k' value 'many'"),
    "out-of-range value": (dict(zip={"mrp.mask_ratio": [0.5, 1.5]}), "axis 'mrp.mask_ratio' value 1.5"),
    "unequal zip": (dict(zip={"data.mu_train": [0.1, 0.2], "data.mu_test": [0.1]}), "unequal lengths"),
    "scalar axis": (dict(grid={"data.k": 3}), "must be a list"),
    "unknown top key": (dict(grids={"data.k": [2]}), "unknown key 'grids'"),
    "unknown track": (dict(track="vision-x", grid={"data.k": [2]}), "unknown sweep track 'vision-x'"),
    "missing base file": (dict(base="nowhere.yaml"), "does not exist"),
    "seeds in the grid": (dict(grid={"seeds": [[0], [1]]}), "seeds are their own axis"),
    "study x not an axis": (dict(grid={"data.k": [2, 3]}, study={"prediction": "p", "x": "data.L"}), "study x"),
    "run that does not fit": (dict(grid={"data.L": [2, 9]}), "not a valid config"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sweep_file_fails_in_one_line_before_any_run(tmp_path, case):
    keys, needle = BAD[case]
    path = _bad(tmp_path, **keys)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["sweep", str(path), "--out", str(out)])
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()  # no folder, no store


def test_unreadable_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ngrid: {data.k: [2, 3\n")
    for path, needle in ((bad, "not valid YAML"), (tmp_path / "missing.yaml", "cannot read sweep file")):
        result = CliRunner().invoke(app, ["sweep", str(path), "--out", str(tmp_path / "out")])
        assert result.exit_code == 2
        assert result.stderr.strip().startswith("error: ") and needle in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_set_may_not_change_an_axis(tmp_path):
    path = write_sweep(tmp_path, grid={"mrp.mask_ratio": [0.2, 0.4]})
    result = CliRunner().invoke(app, ["sweep", str(path), "--out", str(tmp_path / "o"), "--set", "mrp.mask_ratio=0.3"])
    assert result.exit_code == 2 and "changes the sweep axis" in result.stderr


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_expand(name):
    path = REPO / "configs" / "sweeps" / f"{name}.yaml"
    sw = spec.load_sweep(path)
    assert sw.study is not None and sw.study.prediction.strip()
    assert sw.study.trends, "a preset names the trends it predicts"
    assert 6 <= len(sw.runs) <= 40
    assert len({r.key for r in sw.runs}) == len(sw.runs)
    x = sw.study.x or sw.axes[0]
    assert len(sw.grid.get(x) or sw.zip.get(x)) >= 3  # a trend needs more than two points


@pytest.mark.parametrize("opts, needle", [
    (["--executor", "dask"], "unknown executor 'dask'"),
    (["--address", "host:6379"], "--address only applies to --executor ray"),
    (["--workers", "0"], "--workers must be at least 1"),
])
def test_bad_options_fail_before_any_folder_is_made(tmp_path, opts, needle):
    path = write_sweep(tmp_path, grid={"mrp.mask_ratio": [0.2]})
    result = CliRunner().invoke(app, ["sweep", str(path), "--out", str(tmp_path / "o"), *opts])
    assert result.exit_code == 2 and needle in result.stderr, result.output
    assert not (tmp_path / "o").exists()


def test_an_unreachable_ray_head_is_one_line_not_a_hang(tmp_path):
    pytest.importorskip("ray")
    path = write_sweep(tmp_path, grid={"mrp.mask_ratio": [0.2]})
    result = CliRunner().invoke(app, ["sweep", str(path), "--out", str(tmp_path / "o"), "--executor", "ray",
                                      "--address", "127.0.0.1:1"])
    assert result.exit_code == 2 and "cannot reach the Ray head at 127.0.0.1:1" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_study_metric_is_rejected_when_the_sweep_is_loaded(tmp_path):
    path = write_sweep(tmp_path, grid={"mrp.mask_ratio": [0.3, 0.6]},
                       study={"prediction": "p", "metrics": ["probe.ft_err_singel"]})
    with pytest.raises(MrplabError, match=r"unknown metric 'probe.ft_err_singel'.*did you mean 'probe.ft_err_single'"):
        spec.load_sweep(path)
    path = write_sweep(tmp_path, grid={"mrp.mask_ratio": [0.3, 0.6]},
                       study={"prediction": "p", "trends": {"probe.nothing_like_it": "increase"}})
    with pytest.raises(MrplabError, match="study trends: unknown metric 'probe.nothing_like_it'"):
        spec.load_sweep(path)
