"""Typed configs: defaults live here and only here.

A theory run is described by one ``TheoryConfig``. YAML presets in
``configs/`` and ``--set a.b=c`` overrides are validated against it: unknown
keys and out-of-range values fail with a message that names the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from mrplab.errors import MrplabError


class Strict(BaseModel):
    """Every mrplab config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: {"data": {"k": 2}} -> {"data.k": 2}."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def since(neutral: Any) -> dict[str, Any]:
    """``json_schema_extra`` of a setting added after runs were keyed: at ``neutral`` (the value that does what
    mrplab did before the setting existed) it is left out of the config hash, so finished sweep rows, run
    folders and cached pretrainings keep their keys; any other value is hashed as usual."""
    return {"hash_neutral": neutral}


def hash_view(model: BaseModel) -> dict[str, Any]:
    """The config as the hash sees it: ``model_dump(mode="json")`` without settings at their neutral value."""
    dumped = model.model_dump(mode="json")
    _drop_neutral(model, dumped)
    return dumped


def _drop_neutral(model: BaseModel, dumped: dict[str, Any]) -> None:
    for name, field in type(model).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        value = getattr(model, name)
        if "hash_neutral" in extra and dumped.get(name) == extra["hash_neutral"]:
            dumped.pop(name, None)
        elif isinstance(value, BaseModel) and isinstance(dumped.get(name), dict):
            _drop_neutral(value, dumped[name])


def config_hash(cfg: BaseModel | dict[str, Any], drop: tuple[str, ...] = ()) -> str:
    """12 hex digits of the SHA-256 of the config as sorted JSON (``hash_view``), without the top-level keys
    ``drop``: the key of a run folder, a checkpoint and a sweep row."""
    dumped = hash_view(cfg) if isinstance(cfg, BaseModel) else dict(cfg)
    for key in drop:
        dumped.pop(key, None)
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:12]


def _distinct(seeds: list[int]) -> list[int]:
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds must be distinct")
    return seeds


Seeds = Annotated[list[int], Field(min_length=1), AfterValidator(_distinct)]
"""A run's seeds (theory and vision): at least one, no repeats (a repeated seed would be the same run twice)."""


class DataConfig(Strict):
    """The multi-view data model (theory/data.py)."""

    k: int = Field(10, ge=2, description="number of classes")
    L: int = Field(2, ge=2, description="discriminative features per class")
    d: int = Field(300, ge=2, description="patch dimension")
    P: int = Field(16, ge=2, description="patches per sample")
    C_p: int = Field(2, ge=1, description="patches that carry one feature")
    features: Literal["orthonormal", "random"] = Field(
        "orthonormal", description="orthonormal bank (QR) or incoherent random unit vectors"
    )
    c_hi: float = Field(1.5, ge=1.0, description="a strong feature's weights sum to U[1, c_hi]")
    rho: float = Field(0.05, ge=0.0, lt=1.0, description="single-view: weight sum of the non-dominant own features")
    s: float = Field(2.0, ge=0.0, description="each feature of another class joins a sample with probability s/k")
    off_class: Literal["per_feature", "per_class"] = Field(
        "per_feature", description="per_feature: off-class features join one at a time (the multi-view model); "
        "per_class: a whole class joins or not"
    )
    c_lo: float = Field(0.1, ge=0.0, description="multi-view: off-class feature weight sum in U[c_lo, off_class_max]")
    off_class_max: float = Field(0.4, gt=0.0, lt=1.0, description="upper end of the multi-view off-class weight")
    Gamma: float = Field(0.2, ge=0.0, lt=1.0, description="single-view: off-class feature weight sum")
    gamma: float = Field(0.02, ge=0.0, lt=1.0, description="feature noise: U[0, gamma] along every feature on every patch")
    sigma_p: float | None = Field(
        None, ge=0.0, description="Gaussian patch noise std; null = 0.2/sqrt(d), i.e. ||xi|| ~ 0.2, well below a "
        "feature's norm 1 as the multi-view model wants"
    )
    n_pretrain: int = Field(1000, ge=1, description="unlabelled pretraining samples")
    n_train: int = Field(1000, ge=1, description="labelled samples (SL from scratch and fine-tuning)")
    n_test: int = Field(2000, ge=2, description="test samples")
    mu_pretrain: float = Field(0.0, ge=0.0, le=1.0, description="single-view fraction of the pretraining data")
    mu_train: float = Field(0.0, ge=0.0, le=1.0, description="single-view fraction of the labelled data")
    mu_test: float = Field(0.5, ge=0.0, le=1.0, description="single-view fraction of the test data")
    coverage: float = Field(
        1.0, ge=0.0, le=1.0, description="fraction of the downstream features that the pretraining data shows"
    )
    extra_pretrain_classes: int = Field(
        0, ge=0, description="classes that appear only in the pretraining data (features downstream never uses)"
    )
    bank_seed: int = Field(
        0, description="seed of the feature bank; every run (seed) shares the bank, so a run's numbers do not "
        "depend on which other seeds are batched with it"
    )
    share_across_runs: bool = Field(
        False, description="all runs (seeds) share one data set; otherwise each seed samples its own"
    )

    @model_validator(mode="after")
    def _fits(self) -> "DataConfig":
        n_feat = (self.k + self.extra_pretrain_classes) * self.L
        if self.features == "orthonormal" and n_feat > self.d:
            raise ValueError(
                f"(k + extra_pretrain_classes) * L = {n_feat} orthonormal features do not fit in d = {self.d}; "
                "raise data.d or use data.features=random"
            )
        if self.L * self.C_p > self.P:
            raise ValueError(
                f"a multi-view sample needs L * C_p = {self.L * self.C_p} feature patches but P = {self.P}; "
                "raise data.P or lower data.C_p"
            )
        if self.c_lo > self.off_class_max:
            raise ValueError("data.c_lo must not exceed data.off_class_max")
        return self

    @property
    def noise_std(self) -> float:
        return self.sigma_p if self.sigma_p is not None else 0.2 / math.sqrt(self.d)


class NetConfig(Strict):
    """The two-layer conv encoder and the heads (theory/net.py)."""

    m: int = Field(8, ge=1, description="kernels per class: K = k * m")
    q: int = Field(4, ge=2, description="power of the smoothed ReLU's polynomial part")
    threshold: float = Field(1.0, gt=0.0, description="rho_t: where the smoothed ReLU turns linear")
    sigma_0: float = Field(0.023, gt=0.0, description="init std of every kernel coordinate")
    decoder: Literal["full", "diag"] = Field("diag", description="linear decoder: full K x K or diagonal (see docs/regime.md)")


class SLConfig(Strict):
    """Supervised learning from scratch with the analysed head F_i = sum of class i's kernels."""

    steps: int = Field(1200, ge=1, description="steps every run trains")
    until_fit: bool = Field(
        True, description="a run that does not classify every training sample correctly after `steps` goes on "
        "until it does (or max_steps): SL is judged once every class fits, as in the theory"
    )
    max_steps: int = Field(6000, ge=1, description="cap on steps with until_fit")
    lr: float = Field(20.0, gt=0.0)
    batch_size: int | None = Field(None, ge=1, description="null = full-batch gradient descent")


class MRPConfig(Strict):
    """Mask-reconstruction pretraining (theory/objectives.py)."""

    steps: int = Field(1200, ge=1)
    lr: float = Field(0.08, gt=0.0)
    decoder_lr: float | None = Field(0.01, gt=0.0, description="null = same as lr")
    batch_size: int | None = Field(None, ge=1, description="null = full-batch gradient descent")
    mask_ratio: float = Field(0.5, gt=0.0, lt=1.0, description="probability that a patch is masked")
    target: Literal["teacher", "pixels"] = Field(
        "teacher", description="teacher: data2vec-style, the teacher encoder's code; pixels: MAE-style patch content"
    )
    target_scope: Literal["all", "masked"] | None = Field(
        None, description="which patches the target pools: all (the full input) or masked (only what the student "
        "does not see); null = all for the teacher target, masked for pixels (MAE)"
    )
    target_norm: Literal["none", "per_kernel", "per_run", "per_sample"] = Field(
        "per_kernel", description="none: plain squared error; per_kernel / per_run: each kernel's (or the run's) "
        "error divided by its target mean square ^ loss_norm; per_sample: the target normalised across kernels per "
        "sample (data2vec's instance-normalised targets), plain error"
    )
    loss_norm: float | None = Field(
        None, ge=0.0, le=1.0,
        description="power of the per_kernel / per_run divisor: 0 = plain, 1 = scale-free, "
        "null = (q-1)/q (constant relative step in the polynomial phase)",
    )
    decoder_fit: Literal["sgd", "lstsq"] = Field(
        "sgd", description="sgd: the decoder learns by gradient descent at decoder_lr; lstsq: the decoder is set at "
        "every step to its least-squares optimum for the current encoder (the fitted-decoder control)"
    )
    teacher_momentum: float = Field(
        0.0, ge=0.0, lt=1.0, description="EMA momentum of the teacher; 0 = stop-gradient copy of the student"
    )
    teacher_momentum_end: float | None = Field(
        None, ge=0.0, lt=1.0, description="momentum at the last step, reached linearly from teacher_momentum "
        "(data2vec's schedule); null = constant"
    )
    target_pairing: Literal["same", "shuffled"] = Field(
        "same", description="same: each sample's target is its own; shuffled: sample n is given sample n+1's target "
        "(a control: growth that survives it does not come from predicting the sample's own masked content)"
    )
    controls: list[Literal["fitted_decoder", "shuffled_pairing"]] = Field(
        default_factory=lambda: ["fitted_decoder", "shuffled_pairing"],
        description="control runs beside MRP (same init, data and masks, one thing changed), from which the report "
        "says what grew the features: fitted_decoder = decoder_fit lstsq; shuffled_pairing = target_pairing shuffled"
    )

    @property
    def scope(self) -> str:
        if self.target_scope is not None:
            return self.target_scope
        return "all" if self.target == "teacher" else "masked"

    def norm_power(self, q: int) -> float:
        if self.target_norm in ("none", "per_sample"):
            return 0.0
        return self.loss_norm if self.loss_norm is not None else (q - 1) / q

    @property
    def ema_teacher(self) -> bool:
        """Whether the teacher is an EMA of the student (else the student itself under stop-gradient)."""
        return self.teacher_momentum > 0 or (self.teacher_momentum_end or 0.0) > 0

    def momentum(self, t: int) -> float:
        """The teacher's EMA momentum after step t of ``steps`` (linear schedule)."""
        if self.teacher_momentum_end is None:
            return self.teacher_momentum
        frac = min(1.0, t / max(self.steps, 1))
        return self.teacher_momentum + (self.teacher_momentum_end - self.teacher_momentum) * frac


class FinetuneConfig(Strict):
    """Fine-tuning the pretrained encoder with a linear head on the labelled data."""

    mode: Literal["lp_ft", "ft", "lp"] = Field(
        "lp_ft", description="lp_ft: linear probe, then whole network; ft: whole network from a fresh head; lp: head only"
    )
    standardize: bool = Field(True, description="standardise encoder outputs with statistics frozen at the start")
    lp_steps: int = Field(500, ge=0)
    lp_lr: float = Field(1.0, gt=0.0)
    ft_steps: int = Field(300, ge=0)
    ft_lr: float = Field(0.05, gt=0.0, description="encoder lr during full fine-tuning")
    ft_head_lr: float = Field(0.5, gt=0.0, description="head lr during full fine-tuning")
    batch_size: int | None = Field(None, ge=1, description="null = full-batch gradient descent")


class ProbeConfig(Strict):
    log_every: int = Field(50, ge=1, description="probe and log every this many steps")
    capture_threshold: float | None = Field(
        None, gt=0.0, description="Phi above this counts as captured; null = net.threshold (rho_t)"
    )


class TheoryConfig(Strict):
    name: str = Field("theory", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seeds: Seeds = Field(default_factory=lambda: [0, 1, 2])
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    compile: Literal["auto", True, False] = Field(
        "auto", description="fuse the smoothed ReLU's elementwise work (CPU: mrplab's C++ kernels, built once per "
        "machine with the system C++ compiler; CUDA: torch.compile); auto = only where a compiler works and the "
        "run is long enough to repay the measured build time (mrplab/runtime.py); same numbers either way"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16: patches stored and multiplied in bfloat16; weights, activations, accumulation "
        "and probes stay fp32. auto = bf16 only where the device has native bf16 and a probe at this run's "
        "matmul shapes measures it faster than fp32 (cached per machine; the run folder records the choice)"
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; null = this process's share of "
                                "the available cores among running mrplab processes, re-read during the run")
    data: DataConfig = Field(default_factory=DataConfig)
    net: NetConfig = Field(default_factory=NetConfig)
    sl: SLConfig = Field(default_factory=SLConfig)
    mrp: MRPConfig = Field(default_factory=MRPConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    probes: ProbeConfig = Field(default_factory=ProbeConfig)

    @property
    def capture_threshold(self) -> float:
        t = self.probes.capture_threshold
        return t if t is not None else self.net.threshold

    def hash(self) -> str:
        return config_hash(self)


# --------------------------------------------------------------------------- loading


def _format_validation(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}'"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if key == "config":
        return msg
    return f"config key '{key}': {msg} (got {first.get('input')!r})"


def validate(raw: dict[str, Any]) -> TheoryConfig:
    try:
        return TheoryConfig.model_validate(raw)
    except ValidationError as err:
        raise MrplabError(_format_validation(err), "see configs/theory-default.yaml for the keys and ranges") from None


MAX_CONFIG_BYTES = 1 << 20
"""The largest config or sweep file read (1 MiB; the shipped ones are under 5 KiB)."""
MAX_YAML_NODES = 100_000
"""The most nodes a YAML document may hold with every alias expanded: an alias bomb of a few hundred
bytes expands to billions, which would hang the reader before a single key is checked."""

_INT = r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+"
_FLOAT = r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)"


class _Core12Loader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema's plain scalars: only true/false are booleans (``no``
    and ``on`` stay strings) and ``1e3`` is a number, as in JSON; YAML 1.1 would read them the other way."""


_Core12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (
        "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _rx, _first in (
    ("tag:yaml.org,2002:bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("tag:yaml.org,2002:int", _INT, "-+0123456789"),
    ("tag:yaml.org,2002:float", _FLOAT, "-+.0123456789"),
):
    _Core12Loader.add_implicit_resolver(_tag, re.compile(rf"^(?:{_rx})$"), list(_first))


def _construct_core_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    return int(text, 0) if text[:2] in ("0o", "0x") else int(text, 10)


_Core12Loader.add_constructor("tag:yaml.org,2002:int", _construct_core_int)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [x for pair in node.value for x in pair]
    return []


def _expanded_size(root: yaml.Node, what: str) -> int:
    """Nodes in the document with every alias expanded, counted without expanding (an alias is the same
    node object referenced again; each distinct node's expanded size is computed once). A node that
    contains itself (``&a [*a]``) would expand forever: refused."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # depth-first without recursion: a deep nesting cannot exhaust the Python stack
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            sizes[key] = min(1 + sum(sizes[id(k)] for k in _children(node)), MAX_YAML_NODES + 1)
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise MrplabError(f"{what} has an alias that refers to itself", "write the values out instead")
        on_path.add(key)
        stack.append((node, True))
        for kid in _children(node):
            if id(kid) in on_path:
                raise MrplabError(f"{what} has an alias that refers to itself", "write the values out instead")
            if id(kid) not in sizes:
                stack.append((kid, False))
    return sizes[id(root)]


def _check_plain(doc: Any, what: str) -> None:
    """Only JSON's types (mapping with string keys, list, string, number, bool, null): a config never
    needs !!binary, !!set or a non-string key, and everything downstream assumes plain data."""
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            bad = next((k for k in node if not isinstance(k, str)), None)
            if bad is not None:
                raise MrplabError(f"{what} has a key {bad!r} that is not a string", "write keys as plain names")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif not isinstance(node, (str, int, float, bool)) and node is not None:
            raise MrplabError(f"{what} holds a {type(node).__name__} value", "use plain YAML values (no !! tags)")


def yaml_load(text: str, what: str) -> Any:
    """Parse YAML text with the 1.2 core schema's scalars and a bound on alias expansion; every failure
    is one MrplabError naming ``what``."""
    loader = _Core12Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        if _expanded_size(root, what) > MAX_YAML_NODES:
            raise MrplabError(
                f"{what} expands to more than {MAX_YAML_NODES:,} YAML nodes (aliases re-used many times over)",
                "write the values out instead of nesting aliases",
            )
        doc = loader.construct_document(root)
        _check_plain(doc, what)
        return doc
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise MrplabError(f"{what} is not valid YAML{where}", "fix the YAML syntax") from None
    except RecursionError:
        raise MrplabError(f"{what} nests too deeply", "flatten the YAML") from None
    except (ValueError, TypeError, OverflowError) as err:  # a tagged value of the wrong form, e.g. !!int 1.5
        raise MrplabError(f"{what} has a value YAML cannot read ({' '.join(str(err).split())[:80]})",
                          "fix the value or drop its !! tag") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str = "config file", shape: str = "a mapping of keys",
              fix: str = "see configs/theory-default.yaml", empty_ok: bool = True) -> dict[str, Any]:
    """A YAML file that must hold a mapping; every failure is one MrplabError naming ``what`` and the file."""
    p = Path(path)
    try:
        if p.is_dir():
            raise MrplabError(f"cannot read {what} {p}: it is a folder, not a file", "give the path of a .yaml file")
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise MrplabError(f"{what} {p} is over {MAX_CONFIG_BYTES >> 20} MiB", "give a config file, not data")
        data = p.read_bytes()
    except OSError as err:
        reason = "no such file" if isinstance(err, FileNotFoundError) else (err.strerror or str(err))
        raise MrplabError(f"cannot read {what} {p}: {reason}", "check the path") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MrplabError(f"{what} {p} is not UTF-8 text", "give a YAML file") from None
    raw = yaml_load(text, f"{what} {p}")
    if raw is None and empty_ok:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise MrplabError(f"{what} {p} must hold {shape}", fix)
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides; values are parsed as YAML scalars/lists."""
    out = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise MrplabError(f"override '{item}' is not of the form key=value", "e.g. --set mrp.mask_ratio=0.6")
        key, _, value = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise MrplabError(f"override '{item}' has an empty key", "e.g. --set mrp.mask_ratio=0.6")
        try:
            parsed = yaml_load(value, f"override '{item}'")
        except MrplabError:
            parsed = value  # not YAML (e.g. an unbalanced bracket): the text itself, which validation judges
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise MrplabError(f"override '{item}': '{part}' is not a section", "check the key path")
            node = nxt
        node[parts[-1]] = parsed
    return out


PRESET_GROUPS = {"theory": "", "vision": "vision", "sweep": "sweeps"}
"""Where each command's presets live inside the package (src/mrplab/configs, also reachable as configs/)."""


def presets_dir() -> Path:
    return Path(__file__).resolve().parent / "configs"


def presets(group: str) -> list[str]:
    folder = presets_dir() / PRESET_GROUPS[group]
    return sorted(p.stem for p in folder.glob("*.yaml"))


def resolve_config(path: str | Path, group: str) -> Path:
    """A config argument: an existing file, or the name of a preset shipped with mrplab (``--config cifar10``
    for ``configs/vision/cifar10.yaml``), so presets work from any directory and from a non-editable install."""
    p = Path(path)
    if p.exists() or p.parent != Path("."):
        return p
    name = p.name.removesuffix(".yaml")
    candidate = presets_dir() / PRESET_GROUPS[group] / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    raise MrplabError(f"{path} is neither a file nor a preset name",
                      f"give a YAML file or one of the presets: {', '.join(presets(group))}")


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> TheoryConfig:
    raw = read_yaml(resolve_config(path, "theory")) if path is not None else {}
    return validate(apply_overrides(raw, overrides or []))


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- the default preset file

_TOP_COMMENTS = {
    "name": "run folder prefix: runs/<name>-<YYYYmmdd-HHMMSS>/",
    "seeds": "independent runs trained at once (leading run axis); verdicts aggregate over them",
    "device": "cpu, cuda or auto",
}


def _scalar(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def commented_defaults() -> str:
    """configs/theory-default.yaml: every key with its default and description (a test keeps them equal)."""
    cfg = TheoryConfig()
    out = [
        "# The default theory run: every key of TheoryConfig (src/mrplab/config.py) with its default value.",
        "# `mrplab theory` without --config uses exactly these values. Copy this file to make a preset,",
        "# or change single keys with --set, e.g. --set mrp.mask_ratio=0.6 --set 'seeds=[0,1,2,3]'.",
        "# Unknown keys and out-of-range values are rejected with a message that names the key.",
        "# Why these values: docs/regime.md. Regenerate: python -c 'from mrplab.config import write_default_preset as w; w()'",
        "",
    ]
    for name, field in TheoryConfig.model_fields.items():
        val = getattr(cfg, name)
        if isinstance(val, BaseModel):
            doc = (type(val).__doc__ or "").strip().splitlines()
            out.append("")
            out.append(f"# --- {name}: {doc[0]}" if doc else f"# --- {name}")
            out.append(f"{name}:")
            for sub, sf in type(val).model_fields.items():
                line = f"  {sub}: {_scalar(getattr(val, sub))}"
                if sf.description:
                    line = f"{line:<34} # {sf.description}"
                out.append(line)
        else:
            line = f"{name}: {_scalar(val)}"
            c = field.description or _TOP_COMMENTS.get(name)
            if c:
                line = f"{line:<34} # {c}"
            out.append(line)
    return "\n".join(out) + "\n"


def write_default_preset(path: str | Path = "configs/theory-default.yaml") -> None:
    Path(path).write_text(commented_defaults())
