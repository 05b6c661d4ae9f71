"""The sharded train step: `jax.jit` of `jax.value_and_grad` of one `jax.shard_map` over the whole mesh, check_vma on.

Inside the shard_map every device runs the same Flax module code as one device does, on its shard, and every
collective is named: all-gather / reduce-scatter over tp (sequence parallelism, in `Axes`), all-to-all over ep (expert
dispatch and combine), psum of router statistics and of the loss over the token axes. Gradient sums of replicated
weights are not written: they are the transposes of one `pcast` to varying per weight at the top of the body, so
autodiff places exactly one sum per weight per step, outside every loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from moe_jax.config import Config
from moe_jax.model.layers import compute_dtype
from moe_jax.model.transformer import Stack, run_prologue
from moe_jax.model.transformer import loss_fn as one_device_loss
from moe_jax.parallel.one_f_one_b import grads_fn
from moe_jax.parallel.pipeline import RouterStats, Stage, metric_specs, reduce_grads, run_ticks, stage_unit, to_varying
from moe_jax.parallel.schedule import schedule_of
from moe_jax.parallel.sharded import ShardedModel, abstract_inputs, batch_spec, sharded_axes
from moe_jax.sharding import TOKEN_AXES, active_axes


def loss_fn(sm: ShardedModel) -> Callable:
    """(params, rest, tokens, targets) -> (loss, metrics): one shard_map over the mesh running the pipeline schedule.

    tokens / targets are [M, B / M, S] (microbatch-major, `put_batch` lays them out), sharded over (dp, ep) and tp.
    With pp = 1 the schedule is a plain loop over microbatches.
    """
    body = _loss_body(sm)
    sizes = sm.sizes

    def cast_then_body(params, rest, tokens_local, targets_local):
        return body(to_varying(params, sm.param_specs, sizes), rest, tokens_local, targets_local)

    return jax.shard_map(
        cast_then_body,
        mesh=sm.mesh,
        in_specs=(sm.param_specs, sm.rest_specs, batch_spec(sizes), batch_spec(sizes)),
        out_specs=(P(), metric_specs(sizes)),
        check_vma=True,
    )


def _zero_grads_fn(sm: ShardedModel) -> Callable:
    """ZeRO-1 (layout.zero=1), GPipe: (params, rest, tokens, targets, scale) -> ((loss, metrics), gradients of scale x
    loss), the gradients reduce-scattered over the batch axes (`reduce_grads`). The gradient is taken inside the
    shard_map, of the body's loss in the varying parameters, so each sum over devices is named here."""
    body = _loss_body(sm)
    sizes = sm.sizes

    def f(params, rest, tokens_local, targets_local, scale):
        def scaled(p):
            loss, metrics = body(p, rest, tokens_local, targets_local)
            return loss * scale, (loss, metrics)

        (_, out), grads = jax.value_and_grad(scaled, has_aux=True)(to_varying(params, sm.param_specs, sizes))
        return out, reduce_grads(sm, grads)

    return jax.shard_map(
        f,
        mesh=sm.mesh,
        in_specs=(sm.param_specs, sm.rest_specs, batch_spec(sizes), batch_spec(sizes), P()),
        out_specs=((P(), metric_specs(sizes)), sm.grad_specs),
        check_vma=True,
    )


def _loss_body(sm: ShardedModel) -> Callable:
    """The shard_map body of `loss_fn`, on parameters already varying over every mesh axis: the GPipe (or circular)
    tick loop over the stage's chunks, then the head and loss on the last stage's outputs."""
    cfg = sm.cfg
    m, lay = cfg.model, cfg.layout
    dtype = compute_dtype(cfg.run.dtype)
    sizes = sm.sizes
    axes = sharded_axes(sm)
    schedule = schedule_of(cfg)
    remat_layer = "layer" if lay.remat == "layer" else "none"
    all_tokens = active_axes((*TOKEN_AXES, "pp"), sizes)

    def body(params, rest, tokens_local, targets_local):
        b_loc, s_loc = cfg.run.batch // (lay.microbatches * lay.dp * lay.ep), cfg.run.seq_len // lay.tp
        assert tokens_local.shape == (lay.microbatches, b_loc, s_loc), tokens_local.shape
        model = nnx.merge(sm.graphdef, params, rest, copy=True)
        stack = Stack(model)  # this stage's [v x Lc] units, its chunks in order
        stage = Stage.inside(cfg, sizes, schedule)
        # Every stage embeds and runs the dense first layers (cheap, replicated over pp); only stage 0 uses them.
        x_MBSD = model.embed_tokens(tokens_local, axes)
        if axes.vocab_pp:  # the embedding was summed over the stages: the same on each. Typed varying here, once,
            # so its gradient is summed over the stages once, not at every tick that reads it
            x_MBSD = lax.pcast(x_MBSD, ("pp",), to="varying")
        if m.dense_layers:
            x_MBSD = lax.map(lambda x: run_prologue(model, x, axes, dtype, remat_layer), x_MBSD)

        # Unit i of the stage's stack is picked inside the (checkpointed) unit, so what a checkpoint saves for the
        # backward pass is the activation and the index, never a per-tick copy of the stage's weights.
        def layer(x, i):
            return stage_unit(stack, x, i, axes, dtype, stage.n_units)

        if remat_layer == "layer":
            layer = jax.checkpoint(layer)

        def apply_chunk(x, r):
            return lax.scan(layer, x, r * stage.l_c + jnp.arange(stage.l_c))

        if lay.remat == "tick":
            apply_chunk = jax.checkpoint(apply_chunk)

        def fold(acc, stats, r, valid):
            return RouterStats.add(acc, stats, r, weight=valid.astype(jnp.float32))

        zero_act = x_MBSD[0] * 0.0  # carries the activations' varying type (every active axis)
        out, acc = run_ticks(
            stage, x_MBSD, zero_act, lambda x, j, r, valid, acc: apply_chunk(x, r), fold, RouterStats.zero(stage)
        )
        targets = axes.loss_targets(targets_local)
        ce = _head_loss(model, out, targets, stage, axes, dtype, zero_act, all_tokens, cfg.run.batch * cfg.run.seq_len)
        return RouterStats.finalize(acc, stage, ce)

    return body


def _head_loss(model, out, targets, stage: Stage, axes, dtype, zero_act, all_tokens, n_tokens: int):
    """The mean cross-entropy of the last stage's outputs `out` [M, ...] over the batch's `n_tokens` (the local sums
    summed over `all_tokens`, the token axes and pp).

    Every stage computes (the others' share is masked out), one microbatch at a time and rematerialised: only one
    microbatch's [B, S, V] logits are ever alive. With the vocabulary split over pp too, every stage computes its
    share of the head on the last stage's outputs, summed over the stages to every stage first (the other stages hold
    zeros)."""
    if axes.vocab_pp:  # (typed varying again at once: the gradient's sum over the stages, once)
        out = lax.pcast(lax.psum(out, "pp"), ("pp",), to="varying")

    @jax.checkpoint
    def microbatch_ce(ce, xs):
        x, y = xs
        return ce + model.loss_sum(x, y, dtype, axes), None

    ce_local, _ = lax.scan(microbatch_ce, jnp.zeros((), jnp.float32) * zero_act[0, 0, 0], (out, targets))
    ce = jnp.where(stage.last, ce_local, 0.0)
    return (lax.psum(ce, all_tokens) if all_tokens else ce) / n_tokens


def lower_step(sm: ShardedModel):
    """The train step lowered for the mesh from abstract inputs (compile with `.compile()`)."""
    with jax.set_mesh(sm.mesh):
        return grad_step(sm).lower(*abstract_inputs(sm))


def value_and_grad_fn(sm: ShardedModel) -> Callable:
    """(params, rest, tokens, targets, scale) -> ((loss, metrics), gradients of scale x loss), not jitted. GPipe:
    autodiff of `loss_fn`'s scan. 1F1B: the schedule computes its own gradients (parallel/one_f_one_b.py), and the
    loss scale seeds its cotangents (fp16 needs the scale inside the backward pass, not applied after it)."""
    if sm.cfg.layout.schedule == "1f1b":
        return grads_fn(sm)
    if sm.cfg.layout.zero:
        return _zero_grads_fn(sm)
    sharded_loss = loss_fn(sm)

    def scaled_loss(params, rest, tokens, targets, scale):
        loss, metrics = sharded_loss(params, rest, tokens, targets)
        return loss * scale, (loss, metrics)

    def f(params, rest, tokens, targets, scale):
        (_, (loss, metrics)), grads = jax.value_and_grad(scaled_loss, has_aux=True)(
            params, rest, tokens, targets, scale
        )
        return (loss, metrics), grads

    return f


@functools.lru_cache(maxsize=32)
def grad_step(sm: ShardedModel) -> Callable:
    """(params, rest, tokens, targets) -> ((loss, metrics), grads), jitted, grads sharded like the parameters: GPipe's
    jit(value_and_grad(shard_mapped loss)), or the 1F1B schedule's own gradients."""
    if sm.cfg.layout.schedule == "1f1b" or sm.cfg.layout.zero:
        f = value_and_grad_fn(sm)
        return jax.jit(lambda params, rest, tokens, targets: f(params, rest, tokens, targets, jnp.float32(1.0)))
    return jax.jit(jax.value_and_grad(loss_fn(sm), has_aux=True))


# ------------------------------------------------------------------------------------------- the one-device reference


def reference_grad_step(cfg: Config, graphdef) -> Callable:
    """The same loss on one device, no shard_map: the plain model in dropless mode (grouping cannot change a dropless
    result), and in capacity mode the batch cut into the same dispatch groups as the sharded run (rows over dp x ep,
    sequence over tp), so every group has the same capacity rule. Layouts that agree on these share one program."""
    lay = cfg.layout
    groups = (lay.dp * lay.ep, lay.tp) if cfg.model.dispatch == "capacity" else (1, 1)
    # Rematerialised per layer whatever the layout's policy: the same values, and the memory of one host.
    return _reference_grad_step(cfg.model, cfg.run.dtype, groups, "layer", lay.microbatches, graphdef)


@functools.lru_cache(maxsize=32)
def _reference_grad_step(model_cfg, dtype_name: str, groups, remat: str, microbatches: int, graphdef) -> Callable:
    dtype = compute_dtype(dtype_name)

    def f(params, rest, tokens, targets):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return one_device_loss(model, tokens, targets, dtype, groups, remat, microbatches)

    # Called with host (numpy) arrays, so everything runs on the default device alone.
    return jax.jit(jax.value_and_grad(f, has_aux=True))
