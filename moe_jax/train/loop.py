"""The training loop: batches in, the sharded train step, metrics out (progress bar and JSON lines), checkpoints.

A run ends early, raising `Stopped`, in two ways. Preempted: SIGTERM or SIGINT asks it to stop; at the next step
boundary every process agrees on the step (an all-gather of the flag when there are several), the checkpoint of that
step is written and the run ends (exit 0; `--resume` continues exactly). Non-finite: a step whose loss or gradients
are not finite leaves the state as it was (train/step.py); with run.nonfinite=stop (and not fp16, whose loss scaling
skips overflowing steps by design) the run ends there, naming the step, what was not finite and the last checkpoint,
which is left as it was (exit 1); skipped steps past run.max_skips in a row end it too."""

from __future__ import annotations

import json
import os
import signal
import threading
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
from moe_jax.train.step import (
    TrainState,
    grad_names,
    init_train_state,
    make_optimizer,
    train_state_from_params,
    train_step,
)


class Stopped(Exception):
    """The run ended before its last step, as the message says: preempted (`status` 0, its checkpoint written) or on
    a non-finite step (`status` 1). `state` and `records` are what `train` returns."""

    def __init__(self, message: str, status: int, state: TrainState, records: list[dict[str, Any]]):
        super().__init__(message)
        self.status, self.state, self.records = status, state, records


class StopSignals:
    """While active (in the main thread), SIGTERM and SIGINT ask the run to stop at the next step boundary instead
    of killing it; a second SIGINT stops at once (KeyboardInterrupt). `received`: the first signal's name."""

    def __init__(self):
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def agree(flag: bool) -> bool:
    """Whether any process raised `flag`: every process gets the same answer at the same step."""
    if jax.process_count() == 1:
        return flag
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def step_record(step: int, metrics: dict[str, Any], seconds: float, tokens: int,
                names: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """One step's JSON line. A skipped step lists the weights whose gradients were not finite (`names`: the
    gradients' names, train/step.py grad_names)."""
    tpe = np.asarray(metrics["tokens_per_expert"])  # [L, E]
    per_layer_max_over_mean = tpe.max(axis=1) / np.maximum(tpe.mean(axis=1), 1e-9)
    extra = {}
    if bool(metrics["skipped"]) and names is not None:
        extra["nonfinite_grads"] = [n for n, ok in zip(names, np.asarray(metrics["finite_grads"]), strict=True)
                                    if not ok]  # fmt: skip
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
        **extra,
    }


def nonfinite_message(record: dict[str, Any], reason: str, last: int | None, directory: str | None) -> str:
    """One line: the step, what was not finite (the loss first, then the first weight's gradient), why the run
    stopped, and the checkpoint to continue from."""
    what = []
    if not np.isfinite(record["loss"]):
        what.append(f"the loss is {record['loss']}")
    grads = record.get("nonfinite_grads", [])
    if grads:
        more = f" and {len(grads) - 1} more" if len(grads) > 1 else ""
        what.append(f"the gradients of {grads[0]}{more} are not finite")
    if directory is None:
        where = "no checkpoint was written (no --checkpoint-dir)"
    elif last is None:
        where = f"no checkpoint in {directory} yet"
    else:
        where = f"the last good checkpoint is step {last} in {directory}, left as it was"
    return f"step {record['step']}: {'; '.join(what) or 'not finite'}: stopped ({reason}); {where}"


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
    on_note: Callable[[str], None] | None = None,
    async_save: bool = True,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Trains until `steps` (counting from the restored step when resuming), or until `stop_at` when given: that ends
    this call early without changing the run (the learning-rate schedule is run.steps long either way), and a
    checkpoint is written there. Resuming from a checkpoint of another model, run config or data is refused unless
    `allow_config_change`; checkpoints are written in the background unless not `async_save`. `init_params(sm)`
    gives the starting parameters (imported weights) instead of the random initialisation. `on_note(line)` hears of
    damaged checkpoints passed over on resume. Returns the state and the records; raises `Stopped` when the run ends
    early (a signal, a non-finite step)."""
    created = checkpoint_dir is not None and not os.path.exists(checkpoint_dir)
    if created and resume:
        raise ConfigError(f"--resume: no checkpoint in {os.path.abspath(checkpoint_dir)} (no such directory); train "
                          "without --resume to start one")  # fmt: skip
    ckpt = None
    try:
        ckpt = _checkpoints(cfg, checkpoint_dir, checkpoint_every, keep, resume, allow_config_change, stop_at, steps,
                            source, async_save)  # fmt: skip
        with StopSignals() as signals:
            return _run(cfg, mesh, source, steps, ckpt, checkpoint_every, metrics_path, resume, profile_dir, on_step,
                        inject_overflow_at, stop_at, init_params, signals, on_note)  # fmt: skip
    finally:
        if ckpt is not None:
            ckpt.close()  # waits for a save in flight and writes its manifest
        if created and os.path.isdir(checkpoint_dir) and not os.listdir(checkpoint_dir):
            try:  # a run that failed before its first checkpoint leaves no empty directory behind
                os.rmdir(checkpoint_dir)
            except OSError:  # another process of the run removed it first, or wrote into it
                pass


def _run(cfg, mesh, source, steps, ckpt, checkpoint_every, metrics_path, resume, profile_dir, on_step,
         inject_overflow_at, stop_at, init_params, signals, on_note):  # fmt: skip
    sm = ShardedModel.build(cfg, mesh)
    tx = make_optimizer(cfg.run)
    if init_params is not None and not resume:
        state = train_state_from_params(sm, tx, init_params(sm), cfg.run.seed)
    else:
        state = init_train_state(sm, tx, cfg.run.seed)
    if resume:
        state = ckpt.restore(sm, state, set_aside=True)  # the latest complete step (or the one-line error)
        for line in ckpt.fallbacks:
            if on_note:
                on_note(line)
    step_fn = train_step(sm, tx)
    overflow_fn = train_step(sm, tx, inject_overflow=True) if inject_overflow_at is not None else None
    bias_fn = jax.jit(update_expert_bias, static_argnums=2) if cfg.model.expert_bias else None
    writer = open(metrics_path, "a" if resume else "w") if metrics_path and jax.process_index() == 0 else None
    names = grad_names(sm)
    records = []
    tokens = cfg.run.batch * cfg.run.seq_len
    params, rest, opt, ls, step = state
    last = steps if stop_at is None else stop_at
    saved = state.step if resume else None  # the latest checkpoint of this run
    in_a_row = 0  # skipped steps in a row
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
            record = step_record(step, metrics, seconds, tokens, names)
            records.append(record)
            if writer:
                writer.write(json.dumps(record) + "\n")
                writer.flush()
            if on_step:
                on_step(record)
            in_a_row = in_a_row + 1 if record["skipped"] else 0
            reason = _stop_reason(cfg, record, in_a_row)
            if reason:
                message = nonfinite_message(record, reason, saved, ckpt.directory if ckpt else None)
                raise Stopped(message, 1, TrainState(params, rest, opt, ls, step - 1), records)
            if ckpt and (step % checkpoint_every == 0 or step == last):
                if ckpt.save(sm, cfg, TrainState(params, rest, opt, ls, step), step == last, _data(source, step)):
                    saved = step
            if agree(signals.received is not None) and step < last:
                why = signals.received or "a signal to another process"
                if ckpt is None:
                    raise Stopped(f"stopped by {why} after step {step}: nothing saved (no --checkpoint-dir)", 1,
                                  TrainState(params, rest, opt, ls, step), records)  # fmt: skip
                if saved != step:
                    ckpt.save(sm, cfg, TrainState(params, rest, opt, ls, step), True, _data(source, step))
                ckpt.finish()
                raise Stopped(f"stopped by {why} after step {step}: checkpoint step {step} saved in "
                              f"{ckpt.directory}; continue with --resume", 0,
                              TrainState(params, rest, opt, ls, step), records)  # fmt: skip
    finally:
        if profiling:
            jax.profiler.stop_trace()
        if writer:
            writer.close()
    return TrainState(params, rest, opt, ls, step), records


def _stop_reason(cfg: Config, record: dict[str, Any], in_a_row: int) -> str | None:
    """Why the run stops after this step, or None: a non-finite step under run.nonfinite=stop (fp16 skips by design),
    or run.max_skips skipped steps in a row."""
    if not record["skipped"]:
        return None
    if cfg.run.nonfinite == "stop" and cfg.run.dtype != "fp16":
        return f"run.nonfinite=stop in {cfg.run.dtype}; run.nonfinite=skip skips such steps"
    if in_a_row >= cfg.run.max_skips:
        return f"{in_a_row} steps in a row skipped, run.max_skips={cfg.run.max_skips}"
    return None


def _data(source, step: int) -> dict[str, Any]:
    """What a checkpoint records of its data: the source and the step its next batch is drawn for."""
    return {"source": source.identity(), "next_step": step}


def _checkpoints(
    cfg: Config,
    directory: str | None,
    every: int,
    keep: int,
    resume: bool,
    allow_config_change: bool,
    stop_at: int | None,
    steps: int,
    source,
    async_save: bool,
) -> Checkpoints | None:
    """The run's checkpoints, after everything that can refuse the run: it is read before the model is built and a
    checkpoint restored, so a refusal costs a metadata read, not a restore of the whole state."""
    if stop_at is not None and not 1 <= stop_at <= steps:
        raise ConfigError(f"--stop-at={stop_at}: must be in 1..{steps} (the run's last step, run.steps)")
    ckpt = Checkpoints(directory, every, keep, async_save) if directory else None
    if resume:
        if ckpt is None:
            raise ConfigError("--resume needs --checkpoint-dir: the directory to resume from")
        latest = ckpt.latest()
        if latest is not None and not allow_config_change:
            meta = ckpt.saved_meta(latest)
            check_same_run(meta["config"], cfg, ckpt.directory)
            check_same_data(meta.get("data"), source, ckpt.directory)
    elif ckpt is not None and ckpt.latest() is not None:
        raise ConfigError(
            f"--checkpoint-dir={directory}: already holds checkpoints (latest step {ckpt.latest()}); pass --resume "
            "to continue from it, or choose another directory"
        )
    return ckpt


# The config sections a resumed run must share with its checkpoint: what it computes. The layout (where it runs) may
# differ, since checkpoints restore onto any layout; so may what the run does on a non-finite step.
CHECKED_ON_RESUME = ("model", "run")
FREE_ON_RESUME = (("run", "nonfinite"), ("run", "max_skips"))


def check_same_data(saved: dict[str, Any] | None, source, directory: str) -> None:
    """Refuses, in one line, to resume on other data than the checkpoint's (a batch is a function of the source and
    the step, so the same source resumes with the very next batch)."""
    if saved is None:
        return
    here, there = source.identity(), saved["source"]
    if here != there:
        raise ConfigError(
            f"--resume: the data here is {_describe(here)}, but the checkpoint in {directory} was "
            f"trained on {_describe(there)}; pass --allow-config-change to resume on the new data"
        )


def _describe(identity: dict[str, Any]) -> str:
    if identity.get("kind") == "file":
        return f"{identity['path']} ({identity['tokens']:,} tokens)"
    return f"the synthetic task (seed {identity.get('seed')})"


def check_same_run(saved: dict[str, dict[str, Any]], cfg: Config, directory: str) -> None:
    """Refuses, in one line, to resume a run whose model or run section differs from the checkpoint's (run.steps
    included: it sets the learning-rate schedule's length). The layout may differ: checkpoints restore onto any."""
    here = to_dict(cfg)
    for section in CHECKED_ON_RESUME:
        for key, value in here[section].items():
            if (section, key) in FREE_ON_RESUME:
                continue
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
