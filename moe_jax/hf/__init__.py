"""Hugging Face checkpoints in and out: Mixtral, Qwen3-MoE, OLMoE and Qwen1.5/Qwen2-MoE (`families.py`: one table
per family), read into and written from the shards of any layout (`checkpoint.py`), and their tokenizers."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable
from typing import Any

import jax
from jax.experimental import multihost_utils
from tokenizers import Tokenizer

from moe_jax.config import Config, ConfigError, read_yaml
from moe_jax.hf.checkpoint import TOKENIZER_FILES, import_state, read_hf_config, replace_dir, rest_shapes
from moe_jax.hf.families import family_of, hf_key, model_fields
from moe_jax.load import load_config
from moe_jax.model.params import total_params
from moe_jax.parallel.sharded import ShardedModel
from moe_jax.train.checkpoint import Checkpoints

RUN_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def is_hf_config(path: str) -> bool:
    """Whether `path` is a Hugging Face config.json (a JSON file naming a model_type), not a moe_jax YAML config."""
    if not path.endswith(".json") or not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" in data


def config_from_hf(directory: str, config: str | None = None, layout: str | None = None,
                   overrides: Iterable[str] = (), check: bool = True) -> tuple[Config, dict[str, Any]]:  # fmt: skip
    """(Config, config.json): the model from config.json; the compute dtype from its dtype and the sequence length
    capped at its context unless --config gives a run; then --config, --layout and the overrides as everywhere.
    --config's model section may set what config.json does not (the dispatch, the router's loss weights); a value
    that contradicts config.json is refused in one line, and a bad value in config.json is named by its key there."""
    hf = read_hf_config(directory)
    where = directory if os.path.isfile(directory) else os.path.join(directory, "config.json")
    fields = model_fields(hf, where)
    section = read_yaml(config, "--config").get("model") if config is not None else None
    if isinstance(section, dict):  # config.json fixes the architecture: a model section may set what it does not
        for key, value in section.items():  # (dispatch, the router's loss weights, ...), never change what it does
            if key in fields and fields[key] != value:
                raise ConfigError(f"--config={config!r}: model.{key}={value!r}, but the model is {where}, which gives "
                                  f"{fields[key]!r}; leave that field out of the model section (config.json fixes "
                                  "it), or change it with model.KEY=VALUE")  # fmt: skip
    try:  # the file's own values first, so that a bad one is named by its key in the file
        load_config(None, None, [f"run.seq_len={max(1, min(2048, fields['max_seq_len']))}"], base={"model": fields})
    except ConfigError as e:
        head, _, why = str(e).partition(": ")
        key = hf_key(hf, head.split("=", 1)[0].removeprefix("model.")) if head.startswith("model.") else None
        if key is None:
            raise
        raise ConfigError(f"{where}: {key}={hf[key]!r}: {why} (moe_jax's {head.split('=', 1)[0]})") from None
    run = []
    if config is None:
        dtype = RUN_DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype")), "bf16")
        run = [f"run.dtype={dtype}", f"run.seq_len={min(2048, fields['max_seq_len'])}"]
    return load_config(config, layout, [*run, *overrides], check=check, base={"model": fields}), hf


def read_tokenizer_files(directory: str) -> dict[str, str]:
    """The tokenizer's files of a checkpoint directory (kept with an imported checkpoint, written back on export)."""
    out = {}
    for name in TOKENIZER_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path) as f:
                out[name] = f.read()
    return out


def load_tokenizer(text: str | None, where: str):
    """A `tokenizers.Tokenizer` from tokenizer.json's text; a clear error when there is none."""
    if text is None:
        raise ConfigError(f"--prompt: {where} has no tokenizer.json; give token ids with --prompt-tokens")
    try:
        return Tokenizer.from_str(text)
    except Exception as e:
        raise ConfigError(f"{where}/tokenizer.json: not a tokenizer the tokenizers package reads ({e})") from None


def import_checkpoint(cfg: Config, hf: dict[str, Any], directory: str, out: str, mesh) -> dict[str, Any]:
    """A Hugging Face directory read into the shards of `mesh` (each device its own slices) and written as a
    weights-only moe_jax checkpoint at `out`: first to out.partial, then moved into place, so `out` is whole or absent.
    The element count of the safetensors must equal the model's parameters (the tables and the config agree on every
    tensor; this is their sum). Returns {tensors, parameters}."""
    sm = ShardedModel.build(cfg, mesh)
    params, rest, tensors = import_state(sm, directory, cfg.run.seed)
    family = family_of(hf, directory)
    counted = total_params(cfg.model) + (sum(math.prod(s) for s in rest_shapes(cfg).values()) if family.rest else 0)
    below = cfg.model.layers if family.extra_layers_ok else None
    if counted != tensors.total_elements(below):
        raise ConfigError(
            f"{directory}: {tensors.total_elements(below):,} elements in the safetensors, the model has "
            f"{counted:,} parameters"
        )
    out = os.path.abspath(out.rstrip("/"))
    tmp = f"{out}.partial"
    if jax.process_index() == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    Checkpoints(tmp, every=1, keep=1).save_weights(
        sm, cfg, params, rest, {"hf_config": hf, "hf_files": read_tokenizer_files(directory)}
    )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("import-hf written")
    if jax.process_index() == 0:
        replace_dir(tmp, out)
    return {"tensors": len(tensors.shapes), "parameters": counted}
