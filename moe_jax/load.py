"""A config loaded and checked: defaults <- YAML <- overrides (config.py), then every check, the one that needs the
model's parameters included (layout.zero=1: each weight needs a dimension the batch axes it is replicated on divide)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

from moe_jax.config import (
    EMBEDDED_DEFAULT,
    Config,
    apply_overrides,
    apply_sections,
    check_config,
    load_layout,
    read_yaml,
)
from moe_jax.model.params import param_shards


def check_with_model(cfg: Config) -> Config:
    """`config.check_config`, then ZeRO-1's split of every weight (`sharding.zero_spec` raises the ConfigError)."""
    check_config(cfg)
    if cfg.layout.zero:
        param_shards(cfg)
    return cfg


def load_config(
    config: str | os.PathLike | None = None,
    layout: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    check: bool = True,
    base: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Defaults <- config YAML (sections model/run/layout) <- layout YAML (flat layout keys) <- key=value overrides.
    `base`: sections that replace the defaults first (a Hugging Face config.json's model, a checkpoint's saved
    config); a layout it does not give is one device."""
    cfg = Config() if config is not None or layout is not None or base is not None else EMBEDDED_DEFAULT
    if base is not None:
        cfg = apply_sections(cfg, base, "saved config")
    if config is not None:
        cfg = apply_sections(cfg, read_yaml(config, "--config"), os.fspath(config))
    if layout is not None:
        # A layout file is a whole layout: what it leaves out takes LayoutConfig's defaults, not the config's layout.
        cfg = dataclasses.replace(cfg, layout=load_layout(layout))
    cfg = apply_overrides(cfg, overrides)
    return check_with_model(cfg) if check else cfg
