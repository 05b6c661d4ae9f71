"""What `moe-jax generate` runs: the model's config and where its weights come from (a Hugging Face directory, a
checkpoint with its own model, the demo's trained model, or fresh ones), the prompt (text through the weights'
tokenizer, or token ids) and the batch; then the weights read into the shards."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from moe_jax.config import Config, ConfigError
from moe_jax.hf import config_from_hf, load_tokenizer, read_tokenizer_files
from moe_jax.hf.checkpoint import import_state
from moe_jax.layouts import CONFIGS, DEMO_CHECKPOINT, DEMO_LAYOUT, MESHES
from moe_jax.load import load_config
from moe_jax.parallel.sharded import ShardedModel
from moe_jax.train.checkpoint import Checkpoints, read_meta
from moe_jax.train.step import init_train_state, make_optimizer


@dataclasses.dataclass(frozen=True)
class Source:
    """The model and its weights' source: `hf` (a directory) or `checkpoint` (a directory) or neither (fresh)."""

    cfg: Config
    hf: str | None
    checkpoint: str | None
    tokenizer_text: str | None
    where: str  # what the tokenizer error names
    why_fresh: str = ""


def weights_source(hf: str | None, checkpoint: str | None, config: str | None, layout: str | None, overrides) -> Source:
    """--hf DIR: its config.json is the model. A checkpoint with no --config: its own saved model. Else --config (the
    tiny one by default) on --layout (the demo's by default), with the demo's trained weights when the demo has run."""
    directory = checkpoint
    if directory is None and not hf and os.path.isdir(DEMO_CHECKPOINT) and config is None:
        directory = DEMO_CHECKPOINT  # the demo's tiny model; it restores onto any layout
    saved = read_meta(directory) if directory else None
    if checkpoint is not None and saved is None:
        if not os.path.isdir(checkpoint):
            raise ConfigError(f"--checkpoint={checkpoint!r}: no such directory")
        if os.path.isfile(os.path.join(checkpoint, "config.json")):
            raise ConfigError(f"--checkpoint={checkpoint!r}: a Hugging Face checkpoint (it has a config.json), not a "
                              f"moe_jax one; read it with --hf {checkpoint}")  # fmt: skip
        raise ConfigError(f"--checkpoint={checkpoint!r}: no complete moe_jax checkpoint in it (the numbered step "
                          "folders `train` and `import-hf` write)")  # fmt: skip
    if hf:
        cfg, _ = config_from_hf(hf, config, layout, overrides)
        return Source(cfg, hf, None, read_tokenizer_files(hf).get("tokenizer.json"), hf)
    if saved is not None and config is None and directory != DEMO_CHECKPOINT:
        # a checkpoint's own model (an imported one, or any other): no --config needed
        cfg = load_config(None, layout, overrides, base=saved["config"])
        return Source(cfg, None, directory, saved.get("hf_files", {}).get("tokenizer.json"), directory)
    cfg = load_config(
        config or os.path.join(CONFIGS, "tiny.yaml"), layout or os.path.join(MESHES, f"{DEMO_LAYOUT}.yaml"), overrides
    )
    why = "--config given" if config else f"no demo checkpoint at {DEMO_CHECKPOINT}"
    return Source(cfg, None, directory, None, directory or "this model", f"no --checkpoint given; {why}")


def check_one_prompt(text: str | None, token_ids: str | None) -> None:
    if (text is None) == (token_ids is None):
        raise ConfigError("give the prompt as text (--prompt) or as token ids (--prompt-tokens), one of the two")


def prompt_ids(src: Source, text: str | None, token_ids: str | None) -> tuple[list[int], Any]:
    """(the prompt's token ids, the tokenizer or None): text through the weights' tokenizer.json, or ids like 3,14,15."""
    check_one_prompt(text, token_ids)
    if text is not None:
        tokenizer = load_tokenizer(src.tokenizer_text, src.where)
        ids = tokenizer.encode(text).ids
        if not ids:
            raise ConfigError(f"--prompt={text!r}: the tokenizer makes no tokens of it")
        return ids, tokenizer
    try:
        ids = [int(x) for x in token_ids.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--prompt-tokens={token_ids!r}: expected token ids like 3,14,15") from None
    if not ids:
        raise ConfigError("--prompt-tokens='': give at least one token id")
    return ids, None


def with_batch(cfg: Config, batch: int | None) -> Config:
    """The config serving `batch` sequences (default: the layout's minimum, dp x ep x microbatches)."""
    lay = cfg.layout
    least = lay.dp * lay.ep * lay.microbatches
    batch = least if batch is None else batch
    if batch < 1 or batch % least:
        raise ConfigError(
            f"--batch={batch}: must be a positive multiple of layout.dp x layout.ep x layout.microbatches = {least}"
        )
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, batch=batch))


def load_weights(src: Source, sm: ShardedModel) -> tuple[Any, Any, str]:
    """(params, rest, a line saying where they came from) in the shards of `sm`."""
    cfg = sm.cfg
    if src.hf:
        params, rest, _ = import_state(sm, src.hf, cfg.run.seed)
        return params, rest, f"weights: Hugging Face checkpoint {src.hf}"
    template = init_train_state(sm, make_optimizer(cfg.run), cfg.run.seed)
    if src.checkpoint:
        ckpt = Checkpoints(src.checkpoint)
        state = ckpt.restore(sm, template)  # the latest complete step; a damaged later one is named, left as it is
        notes = "".join(f"; {line}" for line in ckpt.fallbacks)
        return state.params, state.rest, f"weights: checkpoint {src.checkpoint} at step {state.step}{notes}"
    return template.params, template.rest, f"weights: fresh ({src.why_fresh})"
