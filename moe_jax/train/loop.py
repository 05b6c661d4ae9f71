"""The training loop: batches in, the sharded train step, metrics out (progress bar and JSON lines), checkpoints."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from moe_jax.config import Config, ConfigError
from moe_jax.model.moe import update_expert_bias
from moe_jax.parallel.step import ShardedModel
from moe_jax.train.checkpoint import Checkpoints
from moe_jax.train.step import TrainState, init_train_state, make_optimizer, train_step


def step_record(step: int, metrics: dict[str, Any], seconds: float, tokens: int) -> dict[str, Any]:
    tpe = np.asarray(metrics["tokens_per_expert"])  # [L, E]
    per_layer_max_over_mean = tpe.max(axis=1) / np.maximum(tpe.mean(axis=1), 1e-9)
    return {
        "step": step,
        "loss": float(metrics["loss"]),
        "ce": float(metrics["ce"]),
        "router_loss": float(metrics["router_loss"]),
        "lb_loss": float(metrics["lb_loss"]),
        "z_loss": float(metrics["z_loss"]),
        "grad_norm": float(metrics["grad_norm"]),
        "dropped_share": float(metrics["dropped"]) / max(float(metrics["routed"]), 1.0),
        "max_over_mean_load": float(per_layer_max_over_mean.max()),
        "skipped": bool(metrics["skipped"]),
        "loss_scale": float(metrics["loss_scale"]),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }


def train(
    cfg: Config,
    mesh,
    source,
    steps: int,
    metrics_path: str | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 50,
    keep: int = 3,
    resume: bool = False,
    profile_dir: str | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    inject_overflow_at: int | None = None,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Trains until `steps` (counting from the restored step when resuming). Returns the state and the records."""
    sm = ShardedModel.build(cfg, mesh)
    tx = make_optimizer(cfg.run)
    state = init_train_state(sm, tx, cfg.run.seed)
    ckpt = Checkpoints(checkpoint_dir, checkpoint_every, keep) if checkpoint_dir else None
    if resume:
        if ckpt is None:
            raise ConfigError("--resume needs --checkpoint-dir: the directory to resume from")
        state = ckpt.restore(sm, state)
    elif ckpt is not None and ckpt.latest() is not None:
        raise ConfigError(
            f"--checkpoint-dir={checkpoint_dir}: already holds checkpoints (latest step {ckpt.latest()}); pass --resume "
            "to continue from it, or choose another directory"
        )
    step_fn = train_step(sm, tx)
    overflow_fn = train_step(sm, tx, inject_overflow=True) if inject_overflow_at is not None else None
    bias_fn = jax.jit(update_expert_bias, static_argnums=2) if cfg.model.expert_bias else None
    writer = open(metrics_path, "a" if resume else "w") if metrics_path and jax.process_index() == 0 else None
    records = []
    tokens = cfg.run.batch * cfg.run.seq_len
    params, rest, opt, ls, step = state
    try:
        while step < steps:
            if profile_dir and step == state.step + 2:
                jax.profiler.start_trace(profile_dir)
            batch = sm.make_batch(source, step)
            fn = overflow_fn if step == inject_overflow_at else step_fn
            t0 = time.perf_counter()
            with jax.set_mesh(mesh):
                params, opt, ls, metrics = fn(params, rest, opt, ls, *batch)
            if jax.process_count() > 1:  # per-layer loads live on the stages' processes: gather them
                from jax.experimental import multihost_utils

                metrics = dict(metrics, tokens_per_expert=multihost_utils.process_allgather(
                    metrics["tokens_per_expert"], tiled=True))  # fmt: skip
            metrics = jax.device_get(metrics)
            seconds = time.perf_counter() - t0
            if bias_fn is not None:
                rest = _update_bias(rest, metrics["tokens_per_expert"], cfg.model.expert_bias_rate, bias_fn)
            step += 1
            if profile_dir and step == state.step + 5:
                jax.profiler.stop_trace()
            record = step_record(step, metrics, seconds, tokens)
            records.append(record)
            if writer:
                writer.write(json.dumps(record) + "\n")
                writer.flush()
            if on_step:
                on_step(record)
            if ckpt and (step % checkpoint_every == 0 or step == steps):
                ckpt.save(sm, cfg, TrainState(params, rest, opt, ls, step), force=step == steps)
    finally:
        if writer:
            writer.close()
    return TrainState(params, rest, opt, ls, step), records


def _update_bias(rest, tokens_per_expert, rate, fn):
    import jax.numpy as jnp

    def upd(path, x):
        if any(getattr(k, "key", None) == "bias" for k in path):
            return fn(x, jnp.asarray(tokens_per_expert), rate)
        return x

    return jax.tree_util.tree_map_with_path(upd, rest)
