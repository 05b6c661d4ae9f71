"""The training loop: batches in, the sharded train step, metrics out (progress bar and JSON lines), checkpoints."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from moe_jax.config import Config, ConfigError, to_dict
from moe_jax.model.moe import update_expert_bias
from moe_jax.parallel.sharded import ShardedModel
from moe_jax.train.checkpoint import Checkpoints
from moe_jax.train.step import TrainState, init_train_state, make_optimizer, train_state_from_params, train_step


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
    stop_at: int | None = None,
    allow_config_change: bool = False,
    init_params: Callable[[ShardedModel], Any] | None = None,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Trains until `steps` (counting from the restored step when resuming), or until `stop_at` when given: that ends
    this call early without changing the run (the learning-rate schedule is run.steps long either way), and a
    checkpoint is written there. Resuming from a checkpoint of another model or run config is refused unless
    `allow_config_change`. `init_params(sm)` gives the starting parameters (imported weights) instead of the
    random initialisation. Returns the state and the records."""
    ckpt = _checkpoints(cfg, checkpoint_dir, checkpoint_every, keep, resume, allow_config_change, stop_at, steps)
    sm = ShardedModel.build(cfg, mesh)
    tx = make_optimizer(cfg.run)
    if init_params is not None and not resume:
        state = train_state_from_params(sm, tx, init_params(sm), cfg.run.seed)
    else:
        state = init_train_state(sm, tx, cfg.run.seed)
    if resume:
        state = ckpt.restore(sm, state)  # the latest step, read above (or the one-line error when there is none)
    step_fn = train_step(sm, tx)
    overflow_fn = train_step(sm, tx, inject_overflow=True) if inject_overflow_at is not None else None
    bias_fn = jax.jit(update_expert_bias, static_argnums=2) if cfg.model.expert_bias else None
    writer = open(metrics_path, "a" if resume else "w") if metrics_path and jax.process_index() == 0 else None
    records = []
    tokens = cfg.run.batch * cfg.run.seq_len
    params, rest, opt, ls, step = state
    last = steps if stop_at is None else stop_at
    profiling = False
    try:
        while step < last:
            if profile_dir and step == state.step + min(2, last - state.step - 1):  # steps 3-5, or what there is
                jax.profiler.start_trace(profile_dir)
                profiling = True
            batch = sm.make_batch(source, step)
            fn = overflow_fn if step == inject_overflow_at else step_fn
            t0 = time.perf_counter()
            with jax.set_mesh(mesh):
                params, opt, ls, metrics = fn(params, rest, opt, ls, *batch)
            if jax.process_count() > 1:  # per-layer loads live on the stages' processes: gather them
                metrics = dict(
                    metrics,
                    tokens_per_expert=multihost_utils.process_allgather(metrics["tokens_per_expert"], tiled=True),
                )
            metrics = jax.device_get(metrics)
            seconds = time.perf_counter() - t0
            if bias_fn is not None:
                rest = _update_bias(rest, metrics["tokens_per_expert"], cfg.model.expert_bias_rate, bias_fn)
            step += 1
            if profiling and (step == state.step + 5 or step == last):
                jax.profiler.stop_trace()
                profiling = False
            record = step_record(step, metrics, seconds, tokens)
            records.append(record)
            if writer:
                writer.write(json.dumps(record) + "\n")
                writer.flush()
            if on_step:
                on_step(record)
            if ckpt and (step % checkpoint_every == 0 or step == last):
                ckpt.save(sm, cfg, TrainState(params, rest, opt, ls, step), force=step == last)
    finally:
        if profiling:
            jax.profiler.stop_trace()
        if writer:
            writer.close()
    return TrainState(params, rest, opt, ls, step), records


def _checkpoints(
    cfg: Config,
    directory: str | None,
    every: int,
    keep: int,
    resume: bool,
    allow_config_change: bool,
    stop_at: int | None,
    steps: int,
) -> Checkpoints | None:
    """The run's checkpoints, after everything that can refuse the run: it is read before the model is built and a
    checkpoint restored, so a refusal costs a metadata read, not a restore of the whole state."""
    if stop_at is not None and not 1 <= stop_at <= steps:
        raise ConfigError(f"--stop-at={stop_at}: must be in 1..{steps} (the run's last step, run.steps)")
    ckpt = Checkpoints(directory, every, keep) if directory else None
    if resume:
        if ckpt is None:
            raise ConfigError("--resume needs --checkpoint-dir: the directory to resume from")
        latest = ckpt.latest()
        if latest is not None and not allow_config_change:
            check_same_run(ckpt.saved_config(latest), cfg, ckpt.directory)
    elif ckpt is not None and ckpt.latest() is not None:
        raise ConfigError(
            f"--checkpoint-dir={directory}: already holds checkpoints (latest step {ckpt.latest()}); pass --resume "
            "to continue from it, or choose another directory"
        )
    return ckpt


# The config sections a resumed run must share with its checkpoint: what it computes. The layout (where it runs) may
# differ, since checkpoints restore onto any layout.
CHECKED_ON_RESUME = ("model", "run")


def check_same_run(saved: dict[str, dict[str, Any]], cfg: Config, directory: str) -> None:
    """Refuses, in one line, to resume a run whose model or run section differs from the checkpoint's (run.steps
    included: it sets the learning-rate schedule's length). The layout may differ: checkpoints restore onto any."""
    here = to_dict(cfg)
    for section in CHECKED_ON_RESUME:
        for key, value in here[section].items():
            there = saved.get(section, {}).get(key, value)
            if there != value:
                hint = (" (it sets the learning-rate schedule's length; to end a run early and resume it on the same "
                        "schedule, use --stop-at)") if (section, key) == ("run", "steps") else ""  # fmt: skip
                raise ConfigError(
                    f"--resume: {section}.{key}={value!r} here, but the checkpoint in {directory} was written with "
                    f"{section}.{key}={there!r}{hint}; pass --allow-config-change to resume with the new value"
                )


def _update_bias(rest, tokens_per_expert, rate, fn):
    def upd(path, x):
        if any(getattr(k, "key", None) == "bias" for k in path):
            return fn(x, jnp.asarray(tokens_per_expert), rate)
        return x

    return jax.tree_util.tree_map_with_path(upd, rest)
