"""Sweep files: a base theory config, axes, and the runs they expand to.

A sweep file (YAML)::

    name: mask-ratio                 # the sweep folder is <out>/<name>/
    track: theory                    # which track runs (sweep/tracks.py); default theory
    description: one line, optional
    base: ../theory-small.yaml       # a theory config file, relative to this file, or
    # base: {mrp.steps: 600, data: {k: 5}}            an inline mapping of overrides, or
    # base: {file: ../theory-small.yaml, sl.steps: 600}   both (``file`` names the YAML)
    grid:                            # cartesian product of every listed value
      mrp.mask_ratio: [0.1, 0.5, 0.9]
    zip:                             # lists of equal length, stepped together
      data.mu_train: [0.1, 0.2]
      data.mu_test: [0.1, 0.2]
    seeds: [0, 1, 2]                 # one run per seed (cfg.seeds = [s]); default: the base's seeds
    study:                           # optional: what the theory predicts and what to plot
      prediction: one sentence
      x: mrp.mask_ratio              # axis of the line plots and the trends (default: the first axis)
      metrics: [probe.mrp_captured_share, probe.ft_err_single]
      trends: {probe.mrp_captured_share: increase}   # increase | decrease | flat, first -> last x
      heatmap: [data.k, data.L]      # two axes for the phase diagram (default: the first two)

Every expanded run is validated with the track's config model before anything runs; a
mistake raises one ``MrplabError`` that names the axis and the value. A run is
keyed by ``cfg.hash()`` of its resolved config, so the same config always maps
to the same row of the store, whichever sweep file produced it.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from mrplab import config as config_mod
from mrplab.config import Strict, config_hash
from mrplab.sweep import tracks
from mrplab.errors import MrplabError

SEE_DOCS = "see docs/sweeps.md"


class Trend(Strict):
    trend: Literal["increase", "decrease", "flat"]
    tolerance: float = Field(0.05, ge=0.0, description="flat: |last - first| at most this")


class StudySpec(Strict):
    prediction: str = Field(min_length=1, description="one sentence: what the theory predicts")
    x: str | None = Field(None, description="axis of the line plots and the trends; default: the first axis")
    metrics: list[str] = Field(default_factory=list, description="store columns to tabulate and plot")
    trends: dict[str, Trend] = Field(default_factory=dict, description="predicted change from the first to the last x")
    heatmap: list[str] | None = Field(None, min_length=2, max_length=2, description="two axes of the phase diagram")

    @field_validator("trends", mode="before")
    @classmethod
    def _short_trends(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: ({"trend": t} if isinstance(t, str) else t) for k, t in v.items()}
        return v


class SweepFile(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    track: str = "theory"
    description: str | None = None
    base: str | dict[str, Any] | None = None
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    zip: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: list[int] | None = Field(None, min_length=1)
    study: StudySpec | None = None


# --------------------------------------------------------------------------- expanded runs


@dataclass(frozen=True)
class PlannedRun:
    key: str  # cfg.hash(): the store's primary key
    setting: str  # hash of the config without its seed: the runs that aggregate together
    seed: int
    axes: dict[str, Any]  # axis key -> value of this run (grid and zip axes)
    cfg: BaseModel  # the track's config model
    track: str = "theory"
    group: str | None = None  # runs of one group share expensive work; the first runs before the others start


@dataclass
class Sweep:
    name: str
    track: str
    description: str | None
    base: dict[str, Any]  # the merged base mapping (file + inline + --set), before the axes
    grid: dict[str, list[Any]]
    zip: dict[str, list[Any]]
    seeds: list[int]
    study: StudySpec | None
    source: Path | None
    runs: list[PlannedRun] = field(default_factory=list)

    @property
    def axes(self) -> list[str]:
        return [*self.grid, *self.zip]

    def normalized(self) -> dict[str, Any]:
        """A self-contained sweep file (base inline) that expands to the same runs."""
        out: dict[str, Any] = {"name": self.name, "track": self.track}
        if self.description:
            out["description"] = self.description
        out["base"] = copy.deepcopy(self.base)
        if self.grid:
            out["grid"] = copy.deepcopy(self.grid)
        if self.zip:
            out["zip"] = copy.deepcopy(self.zip)
        out["seeds"] = list(self.seeds)
        if self.study is not None:
            out["study"] = self.study.model_dump(mode="json", exclude_none=True)
        return out

    def to_yaml(self) -> str:
        head = f"# sweep '{self.name}' as last started in this folder (base resolved inline)\n"
        return head + yaml.safe_dump(self.normalized(), sort_keys=False)


def setting_hash(cfg: BaseModel) -> str:
    """Hash of the resolved config without its seeds: runs that differ only in seed share it."""
    return config_hash(cfg, drop=("seeds",))


# --------------------------------------------------------------------------- keys


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def check_key(dotted: str, config: type[BaseModel]) -> None:
    """Raise ValueError if ``dotted`` is not a path of ``config``'s fields."""
    model: Any = config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            raise ValueError(f"unknown config key '{'.'.join(parts[: i + 1])}'")
        ann = model.model_fields[part].annotation
        model = ann if _is_model(ann) else None
        if model is None and i < len(parts) - 1:
            raise ValueError(f"unknown config key '{dotted}' ('{'.'.join(parts[: i + 1])}' has no sub-keys)")


def _leaves(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested and dotted keys -> {dotted leaf: value}; an empty mapping sets nothing."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        dotted = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_leaves(v, dotted + "."))
        else:
            out[dotted] = v
    return out


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[parts[-1]] = copy.deepcopy(value)


def _nested(leaves: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in leaves.items():
        set_path(out, k, v)
    return out


# --------------------------------------------------------------------------- loading


def _err(source: Path | None, what: str, fix: str) -> MrplabError:
    where = f"sweep file {source}" if source is not None else "sweep"
    return MrplabError(f"{where}: {what}", fix)


def _fmt_value(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else repr(v)


def read_sweep_yaml(path: str | Path) -> dict[str, Any]:
    return config_mod.read_yaml(path, what="sweep file", shape="a mapping (name, base, grid, zip, seeds, study)",
                                fix=SEE_DOCS, empty_ok=False)


def _parse_file(raw: dict[str, Any], source: Path | None) -> SweepFile:
    try:
        spec = SweepFile.model_validate(raw)
        tracks.get(spec.track)
        return spec
    except MrplabError as err:
        raise _err(source, err.what, err.fix or SEE_DOCS) from None
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            return_what = f"unknown key '{key}' (the keys are name, track, description, base, grid, zip, seeds, study)"
            raise _err(source, return_what, SEE_DOCS) from None
        if first["type"] == "missing":
            raise _err(source, f"missing key '{key}'", SEE_DOCS) from None
        if first["type"] == "list_type" and first["loc"][0] in ("grid", "zip"):
            raise _err(source, f"axis {first['loc'][0]} '{first['loc'][1]}' must be a list of values "
                               f"(got {_fmt_value(first.get('input'))})", "write the values as [v1, v2, ...]") from None
        raise _err(source, f"key '{key}': {first['msg']} (got {first.get('input')!r})", SEE_DOCS) from None


def _resolve_base(spec: SweepFile, source: Path | None, overrides: list[str]) -> dict[str, Any]:
    base = spec.base
    file_ref: str | None = None
    inline: dict[str, Any] = {}
    if isinstance(base, str):
        file_ref = base
    elif isinstance(base, dict):
        inline = dict(base)
        ref = inline.pop("file", None)
        if ref is not None and not isinstance(ref, str):
            raise _err(source, f"base 'file' must be a path (got {_fmt_value(ref)})", "e.g. base: {file: theory.yaml}")
        file_ref = ref
    raw: dict[str, Any] = {}
    if file_ref is not None:
        path = Path(file_ref)
        if not path.is_absolute() and source is not None:
            path = source.parent / path
        if not path.is_file():
            raise _err(source, f"base config file {path} does not exist", "base paths are relative to the sweep file")
        try:
            raw = config_mod.read_yaml(path)
        except MrplabError as err:
            raise _err(source, f"base {err.what}", err.fix or SEE_DOCS) from None
    track = tracks.get(spec.track)
    leaves = {**_leaves(raw), **_leaves(inline)}
    for k in leaves:
        try:
            check_key(k, track.config)
        except ValueError as e:
            raise _err(source, f"base: {e}", f"see {track.keys_doc} for the keys") from None
    merged = _nested(leaves)
    if overrides:
        set_leaves = _leaves(config_mod.apply_overrides({}, overrides))
        for k in set_leaves:
            try:
                check_key(k, track.config)
            except ValueError as e:
                raise MrplabError(f"--set {k}: {e}", f"see {track.keys_doc} for the keys") from None
        merged = _nested({**_leaves(merged), **set_leaves})
    return merged


def _check_axes(spec: SweepFile, source: Path | None, overrides: list[str]) -> None:
    track = tracks.get(spec.track)
    seen: dict[str, str] = {}
    for kind, axes in (("grid", spec.grid), ("zip", spec.zip)):
        for key, values in axes.items():
            if key in ("seeds",):
                raise _err(source, f"axis {kind} 'seeds': seeds are their own axis", "use the top-level seeds: [..]")
            try:
                check_key(key, track.config)
            except ValueError as e:
                raise _err(source, f"axis {kind} '{key}': {e}", f"see {track.keys_doc} for the keys") from None
            if not values:
                raise _err(source, f"axis {kind} '{key}' is empty", "give it at least one value")
            if key in seen:
                raise _err(source, f"axis '{key}' is in both {seen[key]} and {kind}", "keep it in one of them")
            for other in seen:
                if key.startswith(other + ".") or other.startswith(key + "."):
                    raise _err(source, f"axes '{other}' and '{key}' overlap", "sweep one of them")
            seen[key] = kind
            dup = [v for i, v in enumerate(values) if v in values[:i]]
            if dup:
                raise _err(source, f"axis {kind} '{key}' lists {_fmt_value(dup[0])} twice", "list each value once")
    lengths = {k: len(v) for k, v in spec.zip.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"'{k}' has {n}" for k, n in lengths.items())
        raise _err(source, f"zip lists have unequal lengths ({desc})", "give every zip axis the same number of values")
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in seen:
            raise MrplabError(f"--set {key} changes the sweep axis '{key}'", "edit the axis in the sweep file instead")
    if spec.seeds is not None and len(set(spec.seeds)) != len(spec.seeds):
        raise _err(source, "seeds must be distinct", "list each seed once")


def _check_study(spec: SweepFile, source: Path | None) -> None:
    st = spec.study
    if st is None:
        return
    axes = [*spec.grid, *spec.zip]
    for label, key in [("x", st.x), *(("heatmap", a) for a in (st.heatmap or []))]:
        if key is not None and key not in axes:
            raise _err(source, f"study {label} '{key}' is not one of the axes ({', '.join(axes) or 'none'})",
                       "name a grid or zip axis")
    track = tracks.get(spec.track)
    known = track.result_columns()
    for where, names in (("metrics", st.metrics), ("trends", list(st.trends))):
        for name in names:
            if name not in known and f"probe.{name}" not in known:  # a bare metric name means probe.<name>
                close = difflib.get_close_matches(name, sorted(known), n=1)
                raise _err(source, f"study {where}: unknown metric '{name}'",
                           f"did you mean '{close[0]}'? ({track.metrics_doc} lists them)" if close
                           else f"see {track.metrics_doc} for the metrics")


def _locate(err: ValidationError) -> str:
    first = err.errors()[0]
    return ".".join(str(p) for p in first["loc"])


def _expand(spec: SweepFile, base: dict[str, Any], source: Path | None) -> tuple[list[int], list[PlannedRun]]:
    track = tracks.get(spec.track)
    seeds = spec.seeds if spec.seeds is not None else base.get("seeds", track.config.model_fields["seeds"].default_factory())
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _err(source, f"base seeds must be a non-empty list of integers (got {_fmt_value(seeds)})", SEE_DOCS)
    grid_keys = list(spec.grid)
    zip_keys = list(spec.zip)
    n_zip = len(next(iter(spec.zip.values()))) if spec.zip else 1
    settings: list[dict[str, Any]] = []
    for combo in itertools.product(*(spec.grid[k] for k in grid_keys)):
        for j in range(n_zip):
            axes = dict(zip(grid_keys, combo))
            axes.update({k: spec.zip[k][j] for k in zip_keys})
            settings.append(axes)
    runs: list[PlannedRun] = []
    by_key: dict[str, dict[str, Any]] = {}
    for seed in seeds:  # seeds outermost: an interrupted sweep already covers every setting once
        for axes in settings:
            raw = copy.deepcopy(base)
            for k, v in axes.items():
                set_path(raw, k, v)
            raw["seeds"] = [seed]
            try:
                cfg = track.config.model_validate(raw)
            except ValidationError as err:
                raise _run_error(err, axes, seed, source, track.keys_doc) from None
            key = cfg.hash()
            if key in by_key:
                raise _err(source, f"runs {_describe(by_key[key])} and {_describe({**axes, 'seed': seed})} resolve to "
                                   "the same config", "make the axis values distinct")
            by_key[key] = {**axes, "seed": seed}
            runs.append(PlannedRun(key=key, setting=setting_hash(cfg), seed=seed, axes=axes, cfg=cfg, track=track.name,
                                   group=track.group(cfg)))
    return list(seeds), runs


def _describe(axes: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={_fmt_value(v)}" for k, v in axes.items()) + "}"


def _run_error(err: ValidationError, axes: dict[str, Any], seed: int, source: Path | None,
               keys_doc: str) -> MrplabError:
    loc = _locate(err)
    first = err.errors()[0]
    detail = first["msg"].removeprefix("Value error, ")
    for k, v in axes.items():
        if loc == k or loc.startswith(k + "."):
            return _err(source, f"axis '{k}' value {_fmt_value(v)}: {detail}", "fix or remove that value")
    if first["type"] == "extra_forbidden":
        return _err(source, f"unknown config key '{loc}'", f"see {keys_doc} for the keys")
    where = f" (config key '{loc}')" if loc else ""
    return _err(source, f"the run {_describe({**axes, 'seed': seed})} is not a valid config{where}: {detail}",
                "change the base or the axis values")


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read, validate and expand a sweep file; raises ``MrplabError`` before anything runs."""
    source = config_mod.resolve_config(path, "sweep")
    return from_mapping(read_sweep_yaml(source), source=source, overrides=overrides)


def from_mapping(raw: dict[str, Any], source: Path | None = None, overrides: list[str] | None = None) -> Sweep:
    overrides = list(overrides or [])
    spec = _parse_file(raw, source)
    _check_axes(spec, source, overrides)
    _check_study(spec, source)
    base = _resolve_base(spec, source, overrides)
    seeds, runs = _expand(spec, base, source)
    return Sweep(name=spec.name, track=spec.track, description=spec.description, base=base, grid=dict(spec.grid), zip=dict(spec.zip),
                 seeds=seeds, study=spec.study, source=source, runs=runs)
