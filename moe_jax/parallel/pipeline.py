"""The pipeline engine every step runs on, inside its one shard_map: a stage's context (`Stage`), the router
statistics a step accumulates over its ticks and turns into the router loss once (`RouterStats`), the tick loop of the
GPipe-like schedules (`run_ticks`: the GPipe and circular train step, prefill and decode), and the pieces 1F1B's slots
share with it (what a tick's input is, the ring, a unit of an uneven stage, the gradient sums at the end).

The schedules themselves (which microbatch and repeat a stage works on at each tick) are parallel/schedule.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from moe_jax.config import Config, ModelConfig, storage_model, uneven_units
from moe_jax.model.transformer import Stack, aux_losses
from moe_jax.parallel.schedule import Schedule
from moe_jax.parallel.sharded import ShardedModel
from moe_jax.sharding import MESH_AXES, Axes, active_axes, logical_to_mesh, spec_axes


@dataclasses.dataclass(frozen=True)
class Stage:
    """A pipeline stage as its shard_map body sees it: the schedule's sizes (pp stages, v repeats, M microbatches,
    l_c units per chunk, the scan's ticks), this stage's index (traced; 0 without pp), its real units (uneven stages;
    None when the stages are equal) and the active pp axes (none when pp = 1)."""

    model: ModelConfig
    pp: int
    v: int
    mb: int
    l_c: int
    ticks: int
    pp_axes: tuple[str, ...]
    index: Any
    n_units: Any

    @classmethod
    def inside(cls, cfg: Config, sizes, schedule: Schedule) -> Stage:
        """Called inside the shard_map body (the stage index is the pp axis index there)."""
        lay = cfg.layout
        pp_axes = active_axes(("pp",), sizes)
        index = lax.axis_index("pp") if pp_axes else 0
        uneven = uneven_units(cfg)
        n_units = jnp.asarray(uneven, jnp.int32)[index] if uneven else None
        l_c = storage_model(cfg).units // (lay.pp * lay.repeats)
        return cls(cfg.model, lay.pp, lay.repeats, lay.microbatches, l_c, schedule.ticks, pp_axes, index, n_units)

    @property
    def last(self):
        """True on the last stage (a traced bool with pp)."""
        return (self.index == self.pp - 1) if self.pp_axes else True


class RouterStats:
    """The router statistics of a step: the load-balancing and z terms, dropped and routed rows (summed over the token
    axes inside each layer, so varying over pp only) and the tokens each expert took per unit. `zero`, `add` per chunk
    run, `finalize` once: summed over the stages, averaged per MoE layer and microbatch, the router loss by
    `model.transformer.aux_losses` (the one place it is weighted)."""

    SCALARS = ("lb_loss", "z_loss", "dropped", "routed")

    @staticmethod
    def zero(stage: Stage) -> dict[str, jax.Array]:
        stat = jnp.zeros((), jnp.float32)
        tpe = jnp.zeros((stage.v, stage.l_c, stage.model.experts), jnp.float32)
        if stage.pp_axes:
            stat, tpe = lax.pcast(stat, stage.pp_axes, to="varying"), lax.pcast(tpe, stage.pp_axes, to="varying")
        return {k: stat for k in RouterStats.SCALARS} | {"tokens_per_expert": tpe}

    @staticmethod
    def add(acc: dict, stats: dict, r, weight=None, unit0=None) -> dict:
        """acc (other keys kept) with the statistics of units of repeat r added: a whole chunk's, weighted by `weight`
        (a tick's validity), or `stats`' units from `unit0` on (1F1B's segments, whose slot is valid)."""
        w = (lambda a: a) if weight is None else (lambda a: weight * a)
        out = {k: acc[k] + w(jnp.sum(stats[k])) for k in RouterStats.SCALARS}
        tpe, new = acc["tokens_per_expert"], stats["tokens_per_expert"]
        if unit0 is None:
            out["tokens_per_expert"] = tpe.at[r].add(w(new))
        else:
            n, e = new.shape
            out["tokens_per_expert"] = lax.dynamic_update_slice(
                tpe, lax.dynamic_slice(tpe, (r, unit0, 0), (1, n, e)) + new[None], (r, unit0, 0)
            )
        return dict(acc, **out)

    @staticmethod
    def finalize(acc: dict, stage: Stage, ce) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss, metrics): the cross-entropy `ce` plus the router loss, and the step's metrics."""
        m = stage.model
        totals = jnp.stack([acc[k] for k in RouterStats.SCALARS])
        totals = lax.psum(totals, stage.pp_axes) if stage.pp_axes else totals
        per_layer = m.moe_layers * stage.mb  # per MoE layer and microbatch
        aux = aux_losses(m, {"lb_loss": totals[0] / per_layer, "z_loss": totals[1] / per_layer})
        metrics = {
            "ce": ce,
            **aux,
            "dropped": totals[2],
            "routed": totals[3],
            "tokens_per_expert": acc["tokens_per_expert"].reshape(stage.v * stage.l_c, m.experts),
        }
        return ce + aux["router_loss"], metrics


def run_ticks(stage: Stage, x_MBSD, zero_act, chunk: Callable, fold: Callable, state):
    """The tick loop of the GPipe-like schedules, one `lax.scan` over the schedule's ticks. Each tick a stage takes
    its input (`tick_input`), runs `chunk(x, j, r, valid, state) -> (y, result)`, files y as microbatch j's output on
    the last stage's last repeat, folds the result into its state (`fold(state, result, r, valid)`) and sends y to the
    next stage. Returns (the outputs [M, ...] (zeros except on the last stage), the final state)."""
    pp, v, mb = stage.pp, stage.v, stage.mb
    perm = ring(pp, v)

    def tick(carry, t):
        recv, buf, out, state = carry
        valid, j, r, buf, x_in = tick_input(t, stage.index, recv, buf, x_MBSD, pp, v, mb)
        y, result = chunk(x_in, j, r, valid, state)
        is_out = valid & (stage.index == pp - 1) & (r == v - 1)
        out = out.at[j].set(jnp.where(is_out, y, out[j]))
        state = fold(state, result, r, valid)
        send = lax.ppermute(y, "pp", perm) if stage.pp_axes else y
        return (send, buf, out, state), None

    buf0 = jnp.broadcast_to(zero_act, (mb if v > 1 else 1, *zero_act.shape))
    out0 = jnp.broadcast_to(zero_act, (mb, *zero_act.shape))
    (_, _, out, state), _ = lax.scan(tick, (zero_act, buf0, out0, state), jnp.arange(stage.ticks))
    return out, state


def to_varying(tree, specs, sizes):
    """pcast every leaf to varying over the mesh axes its spec does not use (once, outside all loops)."""

    def cast(x, spec):
        missing = missing_axes(spec, sizes)
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree, specs)


def missing_axes(spec, sizes) -> tuple[str, ...]:
    """The active mesh axes a spec does not split over (its leaf is replicated on them)."""
    used = {a for part in spec for a in spec_axes(part)}
    return tuple(a for a in active_axes(MESH_AXES, sizes) if a not in used)


def reduce_grads(sm: ShardedModel, grads):
    """Inside the shard_map: each weight's local gradient (varying over every axis) summed over the axes the weight is
    replicated on. ZeRO-1: reduce-scattered over its batch axes first (each device keeps its slice of the sum,
    `ShardedModel.zero`), then all-reduced over the rest on that slice; otherwise one all-reduce."""
    sizes = sm.sizes
    leaves, tree = jax.tree.flatten(grads)
    out = []
    for g, (spec, z, dim) in zip(leaves, sm.zero, strict=True):
        if z:
            g = lax.psum_scatter(g, z, scatter_dimension=dim, tiled=True)
        rest = tuple(a for a in missing_axes(spec, sizes) if a not in z)
        out.append(lax.psum(g, rest) if rest else g)
    return jax.tree.unflatten(tree, out)


def metric_specs(sizes) -> dict[str, P]:
    """The step's metrics: scalars replicated, the per-layer expert counts split over pp like the layers."""
    return {k: P() for k in ("ce", "lb_loss", "z_loss", "router_loss", "dropped", "routed")} | {
        "tokens_per_expert": logical_to_mesh(("layers", None), sizes)
    }


def ring(pp: int, repeats: int) -> list[tuple[int, int]]:
    """Stage s sends to s + 1; circular schedules also close the ring (last -> first)."""
    return [(s, (s + 1) % pp) for s in range(pp if repeats > 1 else pp - 1)]


def tick_input(t, stage, recv, buf, x_MBSD, pp: int, v: int, mb: int):
    """What stage `stage` works on at tick t of the schedule (see parallel/schedule.py), in SPMD form.

    Returns (valid, microbatch j, repeat r, buffer, input): stage 0 takes microbatch j's embedding on the first repeat
    and, circular, the last stage's output of the previous repeat from the wrap-around buffer (filed here as it
    arrives); every other stage takes what the previous stage sent. Bubble ticks are not valid."""
    k = t - stage
    valid = (k >= 0) & (k < v * mb)
    kc = jnp.clip(k, 0, v * mb - 1)
    j, r = kc % mb, kc // mb
    if v > 1:  # stage 0 files what the last stage sent at the end of the previous tick
        k_last = t - pp
        j_last = jnp.clip(k_last, 0, v * mb - 1) % mb
        keep = (stage == 0) & (k_last >= 0) & (k_last < v * mb)
        buf = buf.at[j_last].set(jnp.where(keep, recv, buf[j_last]))
        first = jnp.where(r == 0, x_MBSD[j], buf[j])
    else:
        first = x_MBSD[j]
    return valid, j, r, buf, jnp.where(stage == 0, first, recv)


def stage_unit(stack: Stack, x, i, axes: Axes, dtype, n_units):
    """Unit i of a stage's stack on x: (output, router statistics). Uneven stages (`n_units`, this stage's real units;
    None for equal stages): a padding unit passes its input on and counts nothing."""
    y, stats = stack.unit(x, i, axes, dtype, (1, 1))
    if n_units is None:
        return y, stats
    real = i < n_units
    return jnp.where(real, y, x), jax.tree.map(lambda a: jnp.where(real, a, jnp.zeros_like(a)), stats)
