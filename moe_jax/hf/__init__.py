"""Hugging Face checkpoints in and out: Mixtral, Qwen3-MoE, OLMoE and Qwen1.5/Qwen2-MoE (`families.py`: one table
per family), read into and written from the shards of any layout (`checkpoint.py`), and their tokenizers."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from moe_jax.config import Config, ConfigError
from moe_jax.hf.checkpoint import TOKENIZER_FILES, read_hf_config
from moe_jax.hf.families import model_fields
from moe_jax.load import load_config

RUN_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def config_from_hf(directory: str, config: str | None = None, layout: str | None = None,
                   overrides: Iterable[str] = ()) -> tuple[Config, dict[str, Any]]:  # fmt: skip
    """(Config, config.json): the model from config.json; the compute dtype from its dtype and the sequence length
    capped at its context unless --config gives a run; then --config, --layout and the overrides as everywhere."""
    hf = read_hf_config(directory)
    fields = model_fields(hf, os.path.join(directory, "config.json"))
    run = []
    if config is None:
        dtype = RUN_DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype")), "bf16")
        run = [f"run.dtype={dtype}", f"run.seq_len={min(2048, fields['max_seq_len'])}"]
    return load_config(config, layout, [*run, *overrides], base={"model": fields}), hf


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
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(text)
    except Exception as e:
        raise ConfigError(f"{where}/tokenizer.json: not a tokenizer the tokenizers package reads ({e})") from None
