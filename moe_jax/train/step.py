"""The train step: the sharded gradient step, then optax AdamW on fp32 master parameters, with dynamic loss scaling
for fp16 (a step whose gradients overflow is skipped, the scale halves, the skip is counted). A step with non-finite
gradients leaves the state as it was in every dtype, and says which weights' gradients were not finite (what the loop
stops on, run.nonfinite)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax.config import RunConfig
from moe_jax.parallel.sharded import ShardedModel, abstract_inputs
from moe_jax.parallel.step import value_and_grad_fn

GROWTH_INTERVAL = 1000  # good steps before the fp16 loss scale doubles
INITIAL_SCALE = 2.0**15


class LossScale(NamedTuple):
    scale: jax.Array  # fp32 scalar; 1 and never changed unless the compute dtype is fp16
    good_steps: jax.Array  # int32: steps since the last overflow
    skipped: jax.Array  # int32: steps skipped for overflow so far


@functools.lru_cache(maxsize=32)
def make_optimizer(run: RunConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay to 10% of the peak, after clipping by the global gradient norm
    (computed over the global, sharded gradients: every shard counts once)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=run.lr,
        warmup_steps=run.warmup_steps,
        decay_steps=max(run.steps, run.warmup_steps + 1),
        end_value=run.lr * 0.1,
    )
    # Clipping by the global norm happens in `train_step`, from the norm `grad_stats` computes with named psums
    # (optax's own clip would let the partitioner add collectives the code does not name). optax.adamw's chain, with
    # its Adam step storing each moment in the run's dtype: with both fp32 it is optax.adamw, bit for bit (tests).
    return optax.chain(
        scale_by_adam_stored(0.9, 0.95, 1e-8, MOMENTS[run.exp_avg_dtype], MOMENTS[run.exp_avg_sq_dtype]),
        optax.add_decayed_weights(run.weight_decay),
        optax.scale_by_learning_rate(schedule),
    )


MOMENTS = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def scale_by_adam_stored(b1: float, b2: float, eps: float, mu_dtype, nu_dtype) -> optax.GradientTransformation:
    """Adam's scaling with the first and second moments stored in `mu_dtype` and `nu_dtype` and updated in fp32:
    each moment is read up to fp32, updated and bias-corrected there (optax's own arithmetic), and rounded once when
    stored, as Megatron-Core's precision-aware optimizer does. (optax.scale_by_adam's mu_dtype would multiply the
    stored bf16 moment by b1 in bf16, and has no dtype for the second moment.) The state is optax's ScaleByAdamState,
    so checkpoints and the optimizer-state specs are those of optax.adamw."""

    def init(params):
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params, dtype=mu_dtype),
                                      nu=optax.tree.zeros_like(params, dtype=nu_dtype))  # fmt: skip

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, optax.tree.cast(state.mu, jnp.float32), b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, optax.tree.cast(state.nu, jnp.float32), b2, 2)
        count = optax.safe_increment(state.count)
        mu_hat, nu_hat = optax.tree.bias_correction(mu, b1, count), optax.tree.bias_correction(nu, b2, count)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
        return updates, optax.ScaleByAdamState(count, optax.tree.cast(mu, mu_dtype), optax.tree.cast(nu, nu_dtype))

    return optax.GradientTransformation(init, update)


def _used_axes(spec) -> tuple[str, ...]:
    return tuple(a for part in spec if part is not None for a in ((part,) if isinstance(part, str) else part))


def grad_names(sm: ShardedModel) -> list[str]:
    """The gradients' names, in `grad_stats`'s order: each weight's path, spelled as the parameter table and the
    assignment spell it ("blocks/moe/w_in")."""
    names = []
    for path, _ in jax.tree_util.tree_leaves_with_path(sm.grad_specs, is_leaf=lambda x: isinstance(x, P)):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        names.append("/".join(k for k in keys if k != "value"))
    return names


def grad_stats(sm: ShardedModel) -> Callable:
    """grads -> (global norm, whether every element is finite, whether each weight's gradient is finite) over the
    whole model, every shard counted once: each leaf's local sum of squares is summed over the axes it is split over
    (not the ones it is replicated over), one psum (of a vector: one entry per weight) per set of axes. An inf or nan
    anywhere makes the sum non-finite, so the sum is the overflow check too (as DeepSpeed's is), and the weight whose
    sum is not finite is named when a run stops on it (train/loop.py): a per-element `isfinite` count made XLA
    materialise an int32 copy of the gradients (4 bytes per parameter at the step's peak on short sequences)."""
    spec_leaves = jax.tree.leaves(sm.grad_specs, is_leaf=lambda x: isinstance(x, P))
    keys = [tuple(sorted(_used_axes(spec))) for spec in spec_leaves]
    groups = list(dict.fromkeys(keys))

    def body(grads):
        sums = {axes: [jnp.zeros((), jnp.float32)] * len(keys) for axes in groups}
        for i, (g, key) in enumerate(zip(jax.tree.leaves(grads), keys, strict=True)):
            sums[key][i] = jnp.sum(jnp.square(g))
        per_weight = jnp.zeros((len(keys),), jnp.float32)
        for axes, parts in sums.items():
            v = jnp.stack(parts)
            per_weight = per_weight + (lax.psum(v, axes) if axes else v)
        return per_weight

    def stats(grads):
        f = jax.shard_map(body, mesh=sm.mesh, in_specs=(sm.grad_specs,), out_specs=P(), check_vma=True)
        per_weight = f(grads)
        total = jnp.sum(per_weight)
        return jnp.sqrt(total), jnp.isfinite(total), jnp.isfinite(per_weight)

    return stats


def init_loss_scale(dtype: str) -> LossScale:
    return LossScale(jnp.float32(INITIAL_SCALE if dtype == "fp16" else 1.0), jnp.int32(0), jnp.int32(0))


def opt_specs(sm: ShardedModel, tx: optax.GradientTransformation):
    """The optimizer state's specs: moments like their gradients (their parameters', or ZeRO-1's split over the batch
    axes), counters replicated."""
    abstract = jax.eval_shape(tx.init, sm.abstract_params)
    # tree_map_params calls tx.init on placeholders, which makes the step counter eagerly: traced here instead, so
    # nothing runs on the mesh's devices (a compile-only TPU topology, or XLA:CPU past 2048 devices, runs nothing).
    specs = []

    def trace():
        specs.append(optax.tree_map_params(
            tx, lambda _, s: s, abstract, sm.grad_specs, transform_non_params=lambda _: P(),
            is_leaf=lambda x: isinstance(x, P),
        ))  # fmt: skip
        return ()

    jax.eval_shape(trace)
    return specs[0]


def opt_shardings(sm: ShardedModel, tx: optax.GradientTransformation):
    """The optimizer state's shardings (`opt_specs` on the mesh)."""
    return jax.tree.map(lambda s: NamedSharding(sm.mesh, s), opt_specs(sm, tx), is_leaf=lambda x: isinstance(x, P))


def zero_update(sm: ShardedModel, tx: optax.GradientTransformation) -> Callable:
    """ZeRO-1's update, one shard_map: (reduce-scattered gradients, split moments, whole parameters) -> (whole
    parameters, moments). Each device updates its slice of every weight (the slice its gradient and moments hold) and
    the updated slices are all-gathered over the batch axes; a weight split over them already is updated in place."""
    zero = sm.zero

    def body(grads, opt_state, params):
        leaves, tree = jax.tree.flatten(params)
        sliced = []
        for p, (_, z, dim) in zip(leaves, zero, strict=True):
            if z:
                n = p.shape[dim] // math.prod(sm.sizes[a] for a in z)
                p = lax.dynamic_slice_in_dim(p, lax.axis_index(z) * n, n, axis=dim)
            sliced.append(p)
        sliced = jax.tree.unflatten(tree, sliced)
        updates, opt_state = tx.update(grads, opt_state, sliced)
        new = jax.tree.leaves(optax.apply_updates(sliced, updates))
        whole = [
            lax.all_gather(p, z, axis=dim, tiled=True, to="invarying") if z else p
            for p, (_, z, dim) in zip(new, zero, strict=True)
        ]
        return jax.tree.unflatten(tree, whole), opt_state

    specs = opt_specs(sm, tx)
    return jax.shard_map(body, mesh=sm.mesh, in_specs=(sm.grad_specs, specs, sm.param_specs),
                         out_specs=(sm.param_specs, specs), check_vma=True)  # fmt: skip


@functools.lru_cache(maxsize=32)
def train_step(sm: ShardedModel, tx: optax.GradientTransformation, inject_overflow: bool = False) -> Callable:
    """(params, rest, opt_state, loss_scale, tokens, targets) -> (params, opt_state, loss_scale, metrics), jitted,
    parameters and optimizer state donated. `inject_overflow` (tests) puts an inf into the gradients. Cached: the
    same layout and optimizer reuse one compiled step within a process."""
    fp16 = sm.cfg.run.dtype == "fp16"
    clip = sm.cfg.run.grad_clip
    loss_and_grads = value_and_grad_fn(sm)
    zero = sm.cfg.layout.zero
    norm_and_overflow = grad_stats(sm)

    def step(params, rest, opt_state, ls: LossScale, tokens, targets):
        (loss, metrics), grads = loss_and_grads(params, rest, tokens, targets, ls.scale)
        grads = jax.tree.map(lambda g: g / ls.scale, grads)
        if inject_overflow:
            grads = jax.tree.map(lambda g: g * jnp.inf, grads)  # elementwise: every shard overflows
        grad_norm, finite, finite_grads = norm_and_overflow(grads)
        if clip > 0:
            factor = jnp.minimum(1.0, clip / jnp.maximum(grad_norm, 1e-30))
            grads = jax.tree.map(lambda g: g * factor, grads)

        # Skip the whole update where the gradients overflowed. A cond, not an elementwise where(finite, new, old):
        # with the where, XLA copied every donated moment and the head at the start of the step to keep the old
        # values (8 bytes per parameter more, alive through the whole backward pass); see docs/planner.md.
        def update(grads, opt_state, params):
            if zero:
                return zero_update(sm, tx)(grads, opt_state, params)
            updates, new_opt = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt

        params, opt_state = lax.cond(finite, update, lambda g, o, p: (p, o), grads, opt_state, params)
        if fp16:
            grow = finite & (ls.good_steps + 1 >= GROWTH_INTERVAL)
            scale = jnp.where(finite, jnp.where(grow, ls.scale * 2, ls.scale), jnp.maximum(ls.scale / 2, 1.0))
            good = jnp.where(finite & ~grow, ls.good_steps + 1, 0)
            ls = LossScale(scale, good.astype(jnp.int32), ls.skipped + (~finite).astype(jnp.int32))
        else:
            ls = LossScale(ls.scale, ls.good_steps, ls.skipped + (~finite).astype(jnp.int32))
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=~finite, loss_scale=ls.scale,
                       finite_grads=finite_grads)  # fmt: skip
        return params, opt_state, ls, metrics

    return jax.jit(step, donate_argnums=(0, 2))


class TrainState(NamedTuple):
    params: Any
    rest: Any
    opt_state: Any
    loss_scale: LossScale
    step: int


def init_train_state(sm: ShardedModel, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    params, rest = sm.init(seed)
    opt_state = _opt_init(sm, tx)(params)
    loss_scale = jax.device_put(init_loss_scale(sm.cfg.run.dtype), NamedSharding(sm.mesh, P()))
    return TrainState(params, rest, opt_state, loss_scale, 0)


def train_state_from_params(sm: ShardedModel, tx: optax.GradientTransformation, params, seed: int = 0) -> TrainState:
    """A step-0 state around given parameters (imported weights), or (params, rest) where the import carries the
    routing bias too: fresh optimizer moments and loss scale."""
    params, rest = params if isinstance(params, tuple) else (params, sm.init_rest(seed))
    opt_state = _opt_init(sm, tx)(params)
    loss_scale = jax.device_put(init_loss_scale(sm.cfg.run.dtype), NamedSharding(sm.mesh, P()))
    return TrainState(params, rest, opt_state, loss_scale, 0)


@functools.lru_cache(maxsize=32)
def _opt_init(sm: ShardedModel, tx: optax.GradientTransformation) -> Callable:
    return jax.jit(tx.init, out_shardings=opt_shardings(sm, tx))


def abstract_train_inputs(sm: ShardedModel, tx: optax.GradientTransformation):
    """Abstract (params, rest, opt_state, loss_scale, tokens, targets) with shardings: nothing allocated."""
    params, rest, tokens, targets = abstract_inputs(sm)
    shardings = opt_shardings(sm, tx)
    opt = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), jax.eval_shape(tx.init, params), shardings
    )
    rep = NamedSharding(sm.mesh, P())
    ls = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), jax.eval_shape(lambda: init_loss_scale("fp32"))
    )
    return params, rest, opt, ls, tokens, targets
