"""Fuzzed configs: malformed YAML text, mutated mappings and --set strings for the theory, vision and sweep
readers. In-process only MrplabError may escape; through the CLI the exit code is 0 or 2, never a traceback,
and a refused command leaves no files."""

from __future__ import annotations

import copy
import random
import string

import pytest
import yaml
from typer.testing import CliRunner

from mrplab import config
from mrplab.cli import app
from mrplab.errors import MrplabError
from mrplab.sweep import spec
from mrplab.vision import config as vconfig
from tests.sweep.helpers import TINY_BASE

SEED = 20261201
N_MAPPINGS = 240  # per reader
N_TEXTS = 120
N_SETS = 240
N_CLI = 24

WEIRD_SCALARS = [
    None, True, False, 0, -1, 1, 2**63, -(2**70), 1e308, -1e-320, float("nan"), float("inf"), float("-inf"), "",
    "x" * 5000, "1e3", "no", "0x1f", "-.inf", "~", "[", "{a: 1", "ü∂", "\x00", "../..", "/", [], {}, [1, "a", None],
    {"a": {"b": {"c": [1, {"d": 2}]}}}, [[[[[]]]]], list(range(50)),
]
YAML_SNIPPETS = [
    "a: &x [1, 2]\nb: *x\n", "a: *undefined\n", "a: !!binary aGk=\n", "a: !!python/name:os.system\n", "\t- a\n",
    "a: [1, 2\n", "? [1, 2]\n: 3\n", "a: {b: c\n", "%YAML 1.1\n---\na: 1\n", "---\na: 1\n---\nb: 2\n", "a: 1\na: 2\n",
    "<<: {x: 1}\n", "a: !!float abc\n", "a: !!int 1.5\n", "a: 0o99\n", "a: '\\x00'\n", "- 1\n- 2\n", "just text\n",
    "a: |\n  multi\n  line\n", "a: b: c\n", "a: @x\n", "&a [*a]\n", "a: 1e400\n", "\ufeffa: 1\n",
]


def _paths(d: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out += _paths(v, (*prefix, k))
    return out


def _rand_key(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + "_.-") for _ in range(rng.randint(1, 12)))


def mutate(base: dict, rng: random.Random) -> dict:
    """1-4 random edits: a key set to a weird value, deleted, an unknown key added, a section replaced."""
    doc = copy.deepcopy(base)
    for _ in range(rng.randint(1, 4)):
        paths = _paths(doc)
        op = rng.random()
        if not paths or op < 0.15:
            doc[_rand_key(rng)] = rng.choice(WEIRD_SCALARS)
            continue
        path = rng.choice(paths)
        node = doc
        for k in path[:-1]:
            node = node[k]
        if op < 0.6:
            node[path[-1]] = copy.deepcopy(rng.choice(WEIRD_SCALARS))
        elif op < 0.75:
            del node[path[-1]]
        elif op < 0.9 and isinstance(node[path[-1]], dict):
            node[path[-1]][_rand_key(rng)] = rng.choice(WEIRD_SCALARS)
        else:
            node[path[-1]] = {"nested": {"deeper": copy.deepcopy(rng.choice(WEIRD_SCALARS))}}
    return doc


def mutated_text(base: dict, rng: random.Random) -> str:
    """A YAML document of a mutated mapping, sometimes cut short, spliced with a hostile snippet or re-aliased."""
    text = yaml.safe_dump(mutate(base, rng), sort_keys=False, allow_unicode=True)
    r = rng.random()
    if r < 0.25:
        return text[: rng.randint(0, len(text))]
    if r < 0.55:
        return text + rng.choice(YAML_SNIPPETS)
    if r < 0.7:
        return rng.choice(YAML_SNIPPETS) + text
    if r < 0.85:
        lines = text.splitlines()
        i = rng.randrange(len(lines))
        lines[i] = lines[i].replace(":", rng.choice(["", "::", ": &a", ": *a", ":\t", ": [", ": {"]), 1)
        return "\n".join(lines) + "\n"
    return text


def random_set(keys: list[str], rng: random.Random) -> str:
    key = rng.choice(keys) if rng.random() < 0.7 else _rand_key(rng)
    value = rng.choice([
        *(str(v) for v in WEIRD_SCALARS[:20]), "[1, 2", "{a: [1", "!!binary aGk=", "*x", "&a [*a]", "1e999",
        "[" * 200 + "]" * 200, "&a [&b [*a]]", "a=b=c", " ", "null", "[0, 0]", "{}",
    ])
    return f"{key}={value}" if rng.random() < 0.95 else key


def _theory_base() -> dict:
    return config.TheoryConfig().model_dump(mode="json")


def _vision_base() -> dict:
    return vconfig.VisionConfig().model_dump(mode="json")


def _sweep_base() -> dict:
    return {"name": "fuzz", "base": copy.deepcopy(TINY_BASE), "grid": {"mrp.mask_ratio": [0.3, 0.6]},
            "zip": {"sl.steps": [10, 20], "mrp.steps": [10, 20]}, "seeds": [0, 1],
            "study": {"x": "mrp.mask_ratio", "metrics": ["probe.mrp_captured_frac"]}}


READERS = {
    "theory": (_theory_base, lambda raw, sets: config.validate(config.apply_overrides(raw, sets))),
    "vision": (_vision_base, lambda raw, sets: vconfig.validate(config.apply_overrides(raw, sets))),
    "sweep": (_sweep_base, lambda raw, sets: spec.from_mapping(raw, overrides=sets)),
}


def _only_user_errors(fn, *args) -> str:
    try:
        fn(*args)
    except MrplabError as err:
        line = err.line()
        assert "\n" not in line.strip() and line.strip(), line
        return "refused"
    return "accepted"


@pytest.mark.parametrize("reader", list(READERS))
def test_mutated_mappings_and_sets_raise_only_user_errors(reader):
    base_fn, load = READERS[reader]
    base = base_fn()
    keys = [".".join(map(str, p)) for p in _paths(base)]
    rng = random.Random(f"{SEED}-{reader}")
    outcomes = {"refused": 0, "accepted": 0}
    for _ in range(N_MAPPINGS):
        outcomes[_only_user_errors(load, mutate(base, rng), [])] += 1
    for _ in range(N_SETS):
        sets = [random_set(keys, rng) for _ in range(rng.randint(1, 3))]
        outcomes[_only_user_errors(load, copy.deepcopy(base), sets)] += 1
    assert outcomes["refused"] > N_MAPPINGS // 2, outcomes  # the generator really produces malformed input


@pytest.mark.parametrize("reader", list(READERS))
def test_malformed_yaml_texts_raise_only_user_errors(reader, tmp_path):
    base_fn, load = READERS[reader]
    rng = random.Random(f"{SEED}-{reader}-text")
    path = tmp_path / "c.yaml"
    refused = 0
    for _ in range(N_TEXTS):
        path.write_text(mutated_text(base_fn(), rng), encoding="utf-8")

        def read_and_load() -> None:
            load(config.read_yaml(path), [])

        refused += _only_user_errors(read_and_load) == "refused"
    assert refused > N_TEXTS // 2


def test_malformed_configs_through_the_cli(tmp_path):
    """Exit 0 or 2 only, no traceback; a refused command writes nothing. Each case carries a defect the CLI
    must refuse before running (an out-of-range or unknown key), so no case trains for minutes."""
    rng = random.Random(f"{SEED}-cli")
    cases = 0
    for i in range(N_CLI):
        command = ["theory", "vision", "sweep"][i % 3]
        out = tmp_path / f"out{i}"
        cfg_file = tmp_path / f"c{i}.yaml"
        defect = rng.choice(["nope=1", "seeds=[]", "name=..", "threads=0"])
        if command == "theory":
            cfg_file.write_text(mutated_text(_theory_base(), rng))
            args = ["theory", "--config", str(cfg_file), "--out", str(out), "--set", defect]
        elif command == "vision":
            cfg_file.write_text(mutated_text(_vision_base(), rng))
            args = ["vision", "compare", "--config", str(cfg_file), "--out", str(out), "--set", defect]
        else:
            cfg_file.write_text(mutated_text(_sweep_base(), rng))
            args = ["sweep", str(cfg_file), "--out", str(out), "--set", rng.choice(["nope=1", "seeds=[]",
                                                                                    "threads=0"])]
        result = CliRunner().invoke(app, args)
        assert result.exit_code in (0, 2), (args, result.output, result.exception)
        assert "Traceback" not in result.output
        if result.exit_code == 2:
            assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
            assert not out.exists() or not any(out.rglob("*")), list(out.rglob("*"))
        cases += 1
    assert cases >= 20
