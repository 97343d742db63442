"""Hostile and malformed input: alias bombs, oversized files, YAML 1.1 surprises, non-plain values."""

from __future__ import annotations

import tracemalloc

import pytest

from mrplab import config
from mrplab.config import apply_overrides, read_yaml, validate, yaml_load
from mrplab.errors import MrplabError


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A few hundred bytes whose aliases expand to width ** levels scalars (9 ** 9 = 387 million)."""
    names = [f"l{i}" for i in range(levels)]
    lines = [f"{names[0]}: &{names[0]} [{', '.join(['x'] * width)}]"]
    for prev, name in zip(names, names[1:]):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_with_bounded_memory(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert path.stat().st_size < 600
    tracemalloc.start()
    try:
        with pytest.raises(MrplabError, match="expands to more than 100,000 YAML nodes"):
            read_yaml(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20, peak  # the expansion never happens: a few hundred KiB of parser state


def test_aliases_within_the_bound_still_load():
    doc = yaml_load("a: &v [1, 2]\nb: *v\n", "doc")
    assert doc == {"a": [1, 2], "b": [1, 2]}


def test_alias_bomb_through_the_cli(tmp_path, theory_cli):
    path = tmp_path / "bomb.yaml"
    path.write_text("name: x\n" + alias_bomb())
    out = tmp_path / "runs"
    result = theory_cli.invoke(["theory", "--config", str(path), "--out", str(out)])
    theory_cli.assert_user_error(result, out)
    assert "expands to more than" in result.stderr


def test_oversized_and_binary_files_are_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("name: x\n" + "#" * (config.MAX_CONFIG_BYTES + 1))
    with pytest.raises(MrplabError, match="is over 1 MiB"):
        read_yaml(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00name")
    with pytest.raises(MrplabError, match="not UTF-8"):
        read_yaml(binary)


@pytest.mark.parametrize("text, fragment", [
    ("a: !!binary aGk=\n", "bytes value"),
    ("a: !!set {x}\n", "set value"),
    ("1: x\n", "not a string"),
    ("a: {1: x}\n", "not a string"),
    ("a: !!python/object:os.system x\n", "not valid YAML"),
])
def test_values_outside_plain_data_are_refused(tmp_path, text, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(MrplabError, match=fragment):
        read_yaml(path)


def test_deep_nesting_is_one_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(MrplabError):
        read_yaml(path)


def test_set_uses_yaml_1_2_scalars():
    raw = apply_overrides({}, ["name=no", "sl.steps=1e3", "data.share_across_runs=true", "mrp.lr=.5",
                               "seeds=[0x1, 0o2]"])
    assert raw["name"] == "no"                      # YAML 1.1 would make this False
    cfg = validate(raw)
    assert cfg.name == "no" and cfg.sl.steps == 1000  # YAML 1.1 would make 1e3 a string
    assert cfg.data.share_across_runs is True and cfg.mrp.lr == 0.5 and cfg.seeds == [1, 2]
    assert apply_overrides({}, ["name=2001-12-14"])["name"] == "2001-12-14"  # not a date
    for word in ("yes", "on", "off", "y"):
        assert apply_overrides({}, [f"name={word}"])["name"] == word


def test_files_use_the_same_scalars(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: off\nsl: {steps: 2e2}\n")
    cfg = validate(read_yaml(path))
    assert cfg.name == "off" and cfg.sl.steps == 200


# --------------------------------------------------------------------------- memory


def test_memory_check_names_the_largest_parts_and_the_keys():
    from mrplab import memory

    memory.check({"data": 1e9}, "data.d", available=10 * 2**30)  # fits
    with pytest.raises(MrplabError, match=r"needs about .* GiB of memory \(data .*\) but 1 GiB is available") as info:
        memory.check({"data": 4e9, "weights": 1e3}, "data.d", available=2**30)
    assert info.value.fix == "shrink data.d"


def test_on_cuda_host_and_device_memory_are_checked_apart():
    """On the CPU every part counts once against host memory; on CUDA sampling is judged against the host and a
    step's tensors against the device, each with its own line (no GPU needed: the amounts are given)."""
    import torch

    from mrplab.config import load
    from mrplab.theory.experiment import check_memory, memory_parts
    from mrplab.vision import config as vconfig
    from mrplab.vision import stages as vstages
    from mrplab.vision.train import check_memory as vision_check

    cfg = load(None, ["data.n_train=200000"])
    parts = memory_parts(cfg)
    host = parts["data"] + parts["sampling"]
    device = parts["data"] + parts["step temporaries"] + parts["weights"]
    cpu_need = sum(parts.values()) + 2**29
    cuda = torch.device("cuda", 0)
    check_memory(cfg, torch.device("cpu"), {"host": int(cpu_need / 0.85)})  # fits
    with pytest.raises(MrplabError, match=r"GiB of memory .* but"):
        check_memory(cfg, torch.device("cpu"), {"host": int(cpu_need / 1.2)})
    check_memory(cfg, cuda, {"host": int((host + 2**29) / 0.85), "device": int(device / 0.85)})  # each fits
    with pytest.raises(MrplabError, match=r"GiB of cuda:0 memory \(.*step temporaries"):
        check_memory(cfg, cuda, {"host": 10**15, "device": int(device / 1.2)})
    with pytest.raises(MrplabError, match=r"GiB of memory \(.*sampling"):
        check_memory(cfg, cuda, {"host": int((host + 2**29) / 1.2), "device": 10**15})
    vcfg = vconfig.load(None, ["model.timm=vit_base_patch16_224", "model.patch_size=16", "data.image_size=32"])
    plan = vstages.plan(vcfg, "compare")
    with pytest.raises(MrplabError, match=r"GiB of cuda:0 memory \(.*weights and optimiser"):
        vision_check(vcfg, plan, cuda, {"host": 10**15, "device": 2 * 2**30})  # 86 M parameters: 1.7 GiB with Adam


@pytest.mark.parametrize("key", ["data.d=2000000", "data.n_train=1e8"])
def test_theory_runs_that_cannot_fit_are_refused_before_allocating(tmp_path, theory_cli, key):
    out = tmp_path / "runs"
    result = theory_cli.invoke(["theory", "--out", str(out), "--set", key, "--set", "compile=false"])
    theory_cli.assert_user_error(result, out)
    assert "of memory" in result.stderr and "data.n_pretrain" in result.stderr


def test_vision_runs_that_cannot_fit_are_refused_before_rendering(tmp_path):
    from typer.testing import CliRunner

    from mrplab.vision.commands import app

    out = tmp_path / "runs"
    res = CliRunner().invoke(app, ["compare", "--out", str(out), "--set", "data.n_train=100000000"])
    assert res.exit_code == 2, res.output
    assert "of memory (images" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() or list(out.iterdir()) == []


# --------------------------------------------------------------------------- disk full


def _disk_full(after: int = 0):
    """A save_file that works ``after`` times, then fails as a full disk does."""
    import errno

    from safetensors.torch import save_file as real

    calls = []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > after:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, metadata=metadata)

    return save_file


def test_theory_disk_full_is_one_line_and_leaves_nothing(tmp_path, theory_cli, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _disk_full())
    out = tmp_path / "runs"
    result = theory_cli.invoke(theory_cli.args(out))
    theory_cli.assert_user_error(result, out)
    assert "No space left on device" in result.stderr and "nothing of this run was kept" in result.stderr


@pytest.mark.parametrize("after, kept", [(0, False), (2, True)])
def test_vision_disk_full_keeps_only_a_resumable_folder_and_says_where(tmp_path, monkeypatch, after, kept):
    from typer.testing import CliRunner

    from mrplab.vision import checkpoints
    from mrplab.vision.commands import app
    from tests.vision.test_train import TINY

    monkeypatch.setattr(checkpoints, "save_file", _disk_full(after))
    out = tmp_path / "runs"
    sets = sum((["--set", s] for s in [*TINY, "methods=[mae]"]), [])
    res = CliRunner().invoke(app, ["compare", "--out", str(out), *sets])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write ") and "No space left" in lines[0]
    left = list(out.iterdir())
    if kept:
        (partial,) = left
        assert f"kept in {partial}" in lines[0] and f"mrplab vision compare --resume {partial}" in lines[0]
        assert (partial / "stages.json").is_file()
    else:
        assert left == [] and "nothing of this run was kept" in lines[0]


# --------------------------------------------------------------------------- presets and data roots


def test_presets_load_by_name_from_any_directory(tmp_path, monkeypatch):
    from mrplab.sweep import spec
    from mrplab.vision import config as vconfig

    monkeypatch.chdir(tmp_path)
    assert vconfig.load("cifar10").data.source == "folder"
    assert vconfig.load("embedded-compare.yaml") == vconfig.VisionConfig()
    assert config.load("theory-default") == config.TheoryConfig()
    assert spec.load_sweep("mask_ratio").name == "mask-ratio"
    with pytest.raises(MrplabError, match="neither a file nor a preset name.*cifar10, embedded-compare"):
        vconfig.load("cifar100")
    (tmp_path / "cifar10").write_text("name: local\n")  # a file of that name wins over the preset
    assert vconfig.load("cifar10").name == "local"


def test_presets_are_package_data():
    text = (config.presets_dir().parents[2] / "pyproject.toml").read_text()
    assert '"configs/*.yaml", "configs/*/*.yaml"' in text
    assert {"cifar10", "embedded-compare"} <= set(config.presets("vision"))


def test_data_root_takes_environment_variables(monkeypatch, tmp_path):
    from mrplab.vision.data.folder import expand_root

    monkeypatch.delenv("MRPLAB_CIFAR10", raising=False)
    assert expand_root("${MRPLAB_CIFAR10:-../shared/data/cifar10}") == "../shared/data/cifar10"
    elsewhere = str(tmp_path / "c10")
    monkeypatch.setenv("MRPLAB_CIFAR10", elsewhere)
    assert expand_root("${MRPLAB_CIFAR10:-../shared/data/cifar10}") == elsewhere
    assert expand_root("$MRPLAB_CIFAR10/x") == f"{elsewhere}/x"
    monkeypatch.delenv("MRPLAB_NOPE", raising=False)
    with pytest.raises(MrplabError, match=r"names \$MRPLAB_NOPE, which is not set"):
        expand_root("${MRPLAB_NOPE}/c10")


def test_data_root_is_filled_when_the_config_is_read(monkeypatch, tmp_path):
    """The key of a run, a sweep row and a cached pretraining names the folder actually read: the same folder
    spelled through a variable is the same key (a preset that gained ${MRPLAB_CIFAR10:-...} keeps its finished
    sweep rows), another folder behind the variable is another key (never a reused pretraining of other data)."""
    from mrplab.vision import checkpoints, stages
    from mrplab.vision.config import VisionConfig

    def cfg(root: str, pretrain_root: str | None = None) -> VisionConfig:
        return VisionConfig.model_validate({"data": {"source": "folder", "root": root},
                                            "pretrain": {"data": {"source": "folder", "root": pretrain_root}}})

    def pretrain_key(c: VisionConfig) -> str:
        return checkpoints.pretrain_key(c, stages.Stage("pretrain", 0, "mae"))

    monkeypatch.delenv("MRPLAB_CIFAR10", raising=False)
    spelled, literal = cfg("${MRPLAB_CIFAR10:-../c10}", "$HOME_OF_NOTHING_${MRPLAB_CIFAR10:-x}"), cfg("../c10")
    assert spelled.data.root == "../c10"
    assert spelled.pretrain.data.root == "$HOME_OF_NOTHING_${MRPLAB_CIFAR10:-x}"  # an unset variable: kept as written
    spelled = cfg("${MRPLAB_CIFAR10:-../c10}")
    assert spelled.hash() == literal.hash() and pretrain_key(spelled) == pretrain_key(literal)
    monkeypatch.setenv("MRPLAB_CIFAR10", str(tmp_path / "other"))
    moved = cfg("${MRPLAB_CIFAR10:-../c10}")
    assert moved.data.root == str(tmp_path / "other")
    assert moved.hash() != literal.hash() and pretrain_key(moved) != pretrain_key(literal)
    monkeypatch.setenv("PRETRAIN_ROOT", str(tmp_path / "unlabelled"))
    assert cfg("../c10", "$PRETRAIN_ROOT/train").pretrain.data.root == f"{tmp_path / 'unlabelled'}/train"


def test_no_shipped_file_names_an_absolute_data_path():
    for path in config.presets_dir().rglob("*.yaml"):
        for line in path.read_text().splitlines():
            value = line.split("#")[0]
            key, _, setting = value.partition(":")
            if key.strip() in ("root", "cache_dir"):
                assert not setting.strip().startswith(("/", "~")), (path, line)  # a setting or a relative path


@pytest.mark.parametrize("text", ["&a [*a]\n", "a: &x {b: *x}\n", "a: &x [1, [2, *x]]\n"])
def test_self_referring_aliases_are_refused(text):
    with pytest.raises(MrplabError, match="refers to itself"):
        yaml_load(text, "doc")


# --------------------------------------------------------------------------- smaller items


def test_version():
    from typer.testing import CliRunner

    from mrplab import __version__
    from mrplab.cli import app

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.startswith(f"mrplab {__version__} (torch ")


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "-x"])
def test_names_cannot_leave_or_hide_in_the_output_folder(name):
    from mrplab.sweep import spec
    from tests.sweep.helpers import TINY_BASE

    with pytest.raises(MrplabError, match="name"):
        spec.from_mapping({"name": name, "base": TINY_BASE})
    with pytest.raises(MrplabError, match="name"):
        validate({"name": name})


def test_evidence_names_a_missing_path(tmp_path):
    from typer.testing import CliRunner

    from mrplab.cli import app

    res = CliRunner().invoke(app, ["evidence", str(tmp_path / "nope"), str(tmp_path / "nope2"), "--out",
                                   str(tmp_path / "ev")])
    assert res.exit_code == 2 and f"{tmp_path / 'nope'} does not exist" in res.stderr
    assert not (tmp_path / "ev").exists()


def test_a_full_sweep_store_is_one_error_and_keeps_its_rows(tmp_path):
    """SQLite's own full-disk condition (max_page_count reached): one MrplabError, earlier rows intact."""
    from mrplab.sweep import spec
    from mrplab.sweep.store import Store
    from tests.sweep.helpers import TINY_BASE

    sw = spec.from_mapping({"name": "full", "base": TINY_BASE, "seeds": [0, 1]})
    with Store(tmp_path / "results.sqlite") as st:
        st.plan(sw.name, sw.runs)
        st.finish(sw.runs[0].key, {"ok": False, "error": "first", "started": "t0", "finished": "t1"})
        pages = st.conn.execute("PRAGMA page_count").fetchone()[0]
        st.conn.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(MrplabError, match="cannot write the results store .*full") as info:
            st.finish(sw.runs[1].key, {"ok": False, "error": "x" * 200_000, "started": "t0", "finished": "t1"})
        assert "finished runs are kept" in info.value.fix
        assert st.statuses() == {sw.runs[0].key: "failed", sw.runs[1].key: "pending"}
