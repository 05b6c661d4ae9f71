"""Configs: frozen dataclasses for the model, the layout and the run, loaded from YAML, overridable with key=value.

Every check lives in this module (`check_config`, `check_devices`); a failed check raises `ConfigError` with one line
that names the field, the value and what would be valid. The CLI prints that line and exits 2.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any, get_type_hints

import yaml

DTYPES = ("fp32", "bf16", "fp16")
FFN_KINDS = ("gelu", "swiglu")
DISPATCH_MODES = ("capacity", "dropless")
REMAT_POLICIES = ("none", "tick", "layer")
SCHEDULES = ("gpipe",)


class ConfigError(ValueError):
    """A bad config, layout, override or file, described in one line."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The MoE transformer. Defaults are the seed's model with the choices of design.md section 1."""

    vocab: int = 32000
    d_model: int = 1024
    layers: int = 16
    heads: int = 16
    head_dim: int = 64
    experts: int = 64
    top_k: int = 2
    expert_hidden: int = 2048
    ffn: str = "gelu"  # gelu: two matrices d -> F -> d; swiglu: three.
    dispatch: str = "capacity"  # capacity: C = ceil(k T / E * capacity_factor) per source shard; dropless: C = k T.
    capacity_factor: float = 1.25
    lb_loss_weight: float = 1e-2  # Switch load-balancing loss.
    z_loss_weight: float = 1e-3  # Router z-loss.
    expert_bias: bool = False  # DeepSeek-style aux-loss-free bias on the routing scores.
    expert_bias_rate: float = 1e-3
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    max_seq_len: int = 10240


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """A parallel layout over the mesh axes (pp, dp, ep, tp), row-major, tp fastest."""

    pp: int = 1
    dp: int = 1
    ep: int = 1
    tp: int = 1
    repeats: int = 1  # Circular pipeline repeats v: pp * v chunks, chunk c on stage c mod pp.
    microbatches: int = 1
    devices_per_host: int = 8
    remat: str = "layer"
    schedule: str = "gpipe"
    name: str = ""
    description: str = ""

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.pp, self.dp, self.ep, self.tp)

    @property
    def devices(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What one step sees: the global batch, the sequence, the compute dtype, and the optimizer's settings."""

    batch: int = 128
    seq_len: int = 2048
    dtype: str = "fp16"
    seed: int = 0
    steps: int = 50
    lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    layout: LayoutConfig = LayoutConfig()
    run: RunConfig = RunConfig()


SECTIONS: dict[str, type] = {"model": ModelConfig, "layout": LayoutConfig, "run": RunConfig}

# Fields that must be >= 1 (sizes and counts), and fields that must be > 0 (rates, scales).
_POSITIVE_INTS = {
    "model": ("vocab", "d_model", "layers", "heads", "head_dim", "experts", "expert_hidden", "max_seq_len"),
    "layout": ("pp", "dp", "ep", "tp", "repeats", "microbatches", "devices_per_host"),
    "run": ("batch", "seq_len", "steps"),
}
_POSITIVE_FLOATS = {"model": ("rope_theta", "norm_eps", "init_std"), "run": ("lr",)}
_NON_NEGATIVE = {
    "model": ("lb_loss_weight", "z_loss_weight", "expert_bias_rate"),
    "run": ("warmup_steps", "weight_decay", "grad_clip", "seed"),
}
_CHOICES = {
    ("model", "ffn"): FFN_KINDS,
    ("model", "dispatch"): DISPATCH_MODES,
    ("layout", "remat"): REMAT_POLICIES,
    ("layout", "schedule"): SCHEDULES,
    ("run", "dtype"): DTYPES,
}


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _fail(field: str, value: Any, why: str) -> None:
    raise ConfigError(f"{field}={value!r}: {why}")


def check_config(cfg: Config) -> Config:
    """Checks every field and every cross-field rule; returns cfg or raises ConfigError naming the first bad field."""
    for section, names in _POSITIVE_INTS.items():
        for name in names:
            v = getattr(getattr(cfg, section), name)
            if v < 1:
                _fail(f"{section}.{name}", v, "must be a positive integer (>= 1)")
    for section, names in _POSITIVE_FLOATS.items():
        for name in names:
            v = getattr(getattr(cfg, section), name)
            if not v > 0:
                _fail(f"{section}.{name}", v, "must be > 0")
    for section, names in _NON_NEGATIVE.items():
        for name in names:
            v = getattr(getattr(cfg, section), name)
            if v < 0:
                _fail(f"{section}.{name}", v, "must be >= 0")
    for (section, name), choices in _CHOICES.items():
        v = getattr(getattr(cfg, section), name)
        if v not in choices:
            _fail(f"{section}.{name}", v, f"valid: {', '.join(choices)}")

    m, lay, run = cfg.model, cfg.layout, cfg.run
    if not 1 <= m.top_k <= m.experts:
        _fail("model.top_k", m.top_k, f"must be in 1..model.experts={m.experts}")
    if m.dispatch == "capacity" and not m.capacity_factor > 0:
        _fail(
            "model.capacity_factor", m.capacity_factor, "must be > 0 in capacity mode (or use model.dispatch=dropless)"
        )
    if m.experts % lay.ep:
        _fail("layout.ep", lay.ep, f"must divide model.experts={m.experts}; valid: {_divisors(m.experts)}")
    if m.layers % (lay.pp * lay.repeats):
        _fail(
            "layout.pp",
            lay.pp,
            f"layout.pp x layout.repeats = {lay.pp} x {lay.repeats} must divide model.layers={m.layers}; "
            f"valid pp x repeats: {_divisors(m.layers)}",
        )
    if m.heads % lay.tp:
        _fail("layout.tp", lay.tp, f"must divide model.heads={m.heads}; valid: {_divisors(m.heads)}")
    if m.expert_hidden % lay.tp:
        _fail(
            "layout.tp",
            lay.tp,
            f"must divide model.expert_hidden={m.expert_hidden}; valid: {_divisors(m.expert_hidden)}",
        )
    if run.seq_len % lay.tp:
        _fail("run.seq_len", run.seq_len, f"must be divisible by layout.tp={lay.tp} (sequence parallelism)")
    if run.seq_len > m.max_seq_len:
        _fail("run.seq_len", run.seq_len, f"must be <= model.max_seq_len={m.max_seq_len}")
    shards = lay.dp * lay.ep * lay.microbatches
    if run.batch % shards:
        _fail(
            "run.batch",
            run.batch,
            f"must be divisible by layout.dp x layout.ep x layout.microbatches = "
            f"{lay.dp} x {lay.ep} x {lay.microbatches} = {shards}",
        )
    if lay.repeats > 1 and lay.microbatches % lay.pp:
        _fail(
            "layout.microbatches",
            lay.microbatches,
            f"a circular schedule (layout.repeats={lay.repeats}) needs a multiple of layout.pp={lay.pp}",
        )
    return cfg


def check_devices(layout: LayoutConfig, devices: int) -> None:
    """The mesh must use every device it is given: pp x dp x ep x tp == devices."""
    if layout.devices != devices:
        raise ConfigError(
            f"devices={devices}: layout pp x dp x ep x tp = {' x '.join(map(str, layout.shape))} = {layout.devices} "
            f"devices; run on {layout.devices} devices or pick a layout whose axes multiply to {devices}"
        )


# ----------------------------------------------------------------------------------------------------- loading


def _coerce(field: str, value: Any, typ: Any) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        _fail(field, value, "expected true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(field, value, "expected an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        _fail(field, value, "expected a number")
    if typ is str:
        if isinstance(value, str):
            return value
        _fail(field, value, "expected a string")
    return value


def _replace(obj: Any, section: str, updates: Mapping[str, Any]) -> Any:
    cls = type(obj)
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key, value in updates.items():
        if key not in names:
            _fail(f"{section}.{key}", value, f"unknown key; valid {section} keys: {', '.join(names)}")
    coerced = {k: _coerce(f"{section}.{k}", v, hints[k]) for k, v in updates.items()}
    return dataclasses.replace(obj, **coerced)


def _read_yaml(path: str | os.PathLike, what: str) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{what}={path!r}: no such file")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{what}={path!r}: not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}={path!r}: the file must hold a YAML mapping of keys, found a {type(data).__name__}")
    return data


def _apply_sections(cfg: Config, data: Mapping[str, Any], origin: str) -> Config:
    for section, values in data.items():
        if section not in SECTIONS:
            _fail(f"{origin}: {section}", values, f"unknown section; valid: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            _fail(f"{origin}: {section}", values, "must be a mapping of keys")
        cfg = dataclasses.replace(cfg, **{section: _replace(getattr(cfg, section), section, values)})
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    """'model.top_k=1' -> ('model', 'top_k', 1). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. model.top_k=1 or layout.ep=4")
    key, raw = text.split("=", 1)
    if key.count(".") != 1:
        raise ConfigError(f"override {text!r}: expected section.key=value with section in {', '.join(SECTIONS)}")
    section, name = key.split(".")
    if section not in SECTIONS:
        raise ConfigError(f"override {key}={raw!r}: unknown section {section!r}; valid: {', '.join(SECTIONS)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return section, name, value


def load_config(
    config: str | os.PathLike | None = None,
    layout: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    check: bool = True,
) -> Config:
    """Defaults <- config YAML (sections model/run/layout) <- layout YAML (flat layout keys) <- key=value overrides."""
    cfg = Config() if config is not None or layout is not None else EMBEDDED_DEFAULT
    if config is not None:
        cfg = _apply_sections(cfg, _read_yaml(config, "--config"), os.fspath(config))
    if layout is not None:
        # A layout file is a whole layout: what it leaves out takes LayoutConfig's defaults, not the config's layout.
        cfg = dataclasses.replace(cfg, layout=load_layout(layout))
    cfg = apply_overrides(cfg, overrides)
    return check_config(cfg) if check else cfg


def load_layout(path: str | os.PathLike) -> LayoutConfig:
    data = _read_yaml(path, "--layout")
    if "layout" in data and isinstance(data["layout"], dict) and len(data) == 1:
        data = data["layout"]
    return _replace(LayoutConfig(), "layout", data)


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Applies key=value overrides in order (unchecked: call check_config after)."""
    for text in overrides:
        section, name, value = parse_override(text)
        cfg = dataclasses.replace(cfg, **{section: _replace(getattr(cfg, section), section, {name: value})})
    return cfg


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


# What `moe-jax` runs when given no --config and no --layout: the seed's model on the seed's 128 devices as they can
# really be laid out (pp 4, ep 16, tp 2), 8 microbatches.
SEED_128 = LayoutConfig(pp=4, ep=16, tp=2, microbatches=8, devices_per_host=8, name="seed-128")
EMBEDDED_DEFAULT = Config(layout=SEED_128)
