"""1F1B and interleaved 1F1B inside the one shard_map: the step's gradient computed by the schedule itself.

Each tick of one `lax.scan` a stage runs at most one chunk forward and one chunk backward (parallel/schedule.py says
which, and why the step then costs GPipe's time). An empty slot is skipped by a `lax.cond` whose predicate depends
on the tick and the stage only, so every member of a stage's dp, ep and tp groups takes the same branch and the
collectives inside stay uniform. Forward slot: the chunk runs on what the previous stage sent (stage 0, first
repeat: the microbatch's embedding), its input goes into the stash, its output to the next stage by `ppermute`.
Backward slot: the chunk is recomputed from the stashed input under `jax.vjp`; its output cotangent arrives from the
next stage by the reverse `ppermute`, or, on the last stage's last repeat, from the microbatch's own loss (head and
cross-entropy, whose cotangent is scale / global tokens); the input cotangent goes to the previous stage, or into
the embedding (and dense first layers) on stage 0. The router terms are per microbatch (see model/transformer.py
`loss_fn`), so each chunk's share of the router loss has a known cotangent (its weight / (MoE layers x M)) in the
tick its backward runs. Weight gradients accumulate in fp32 in the scan's carry and are summed over the axes each
weight is replicated on once, at the end, as autodiff of the GPipe scan does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from moe_jax.model.layers import compute_dtype
from moe_jax.model.transformer import Stack, run_prologue
from moe_jax.parallel.pipeline import RouterStats, Stage, metric_specs, reduce_grads, ring, stage_unit, to_varying
from moe_jax.parallel.schedule import Schedule, schedule_of
from moe_jax.parallel.sharded import ShardedModel, batch_spec, sharded_axes
from moe_jax.sharding import MESH_AXES, TOKEN_AXES, Axes, active_axes

# The parameters each kind of slot differentiates (the rest enter as constants): the stack's units, and the edges
# (embedding, dense first layers, final norm, head).
STACK_KEYS = ("blocks", "dense_blocks")


def _split(state, keys):
    inside = nnx.State({k: v for k, v in state.items() if k in keys})
    outside = nnx.State({k: v for k, v in state.items() if k not in keys})
    return inside, outside


def _join(a, b):
    return nnx.State({**a, **b})


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def grads_fn(sm: ShardedModel) -> Callable:
    """(params, rest, tokens, targets, scale) -> ((loss, metrics), gradients of scale x loss), one shard_map, the
    gradients sharded like the parameters. The same loss and metrics as `step.loss_fn` (GPipe)."""
    sizes = sm.sizes
    schedule = schedule_of(sm.cfg)
    axes = sharded_axes(sm)
    all_tokens = active_axes((*TOKEN_AXES, "pp"), sizes)

    def body(params, rest, tokens_local, targets_local, scale):
        structure = jax.tree.structure(params)
        params = to_varying(params, sm.param_specs, sizes)
        slots = _Slots.inside(sm, schedule, axes, params, rest, tokens_local, targets_local, scale)
        stash0 = jnp.broadcast_to(slots.zero_act, (schedule.stash_slots, slots.n_seg, *slots.zero_act.shape))
        acc0 = RouterStats.zero(slots.stage) | {
            "stack": jax.tree.map(lambda a: jnp.zeros_like(a, jnp.float32), slots.stack_p),
            "edge": jax.tree.map(lambda a: jnp.zeros_like(a, jnp.float32), slots.edge_p),
            "ce": jnp.zeros((), jnp.float32) * slots.zero_act[0, 0, 0],
        }
        carry0 = (slots.zero_act, slots.zero_act, stash0, acc0)
        (_, _, _, acc), _ = lax.scan(slots.tick, carry0, jnp.arange(schedule.ticks))
        n_tokens = sm.cfg.run.batch * sm.cfg.run.seq_len
        ce = lax.psum(acc["ce"], all_tokens) / n_tokens if all_tokens else acc["ce"] / n_tokens
        # The gradients in the parameters' own tree (both flatten in sorted key order), each summed over the axes its
        # weight is replicated on (the transpose of the pcast above; ZeRO-1: reduce-scattered over the batch axes).
        grads = jax.tree.unflatten(structure, jax.tree.leaves(_join(acc["edge"], acc["stack"])))
        return RouterStats.finalize(acc, slots.stage, ce), reduce_grads(sm, grads)

    return jax.shard_map(
        body,
        mesh=sm.mesh,
        in_specs=(sm.param_specs, sm.rest_specs, batch_spec(sizes), batch_spec(sizes), P()),
        out_specs=((P(), metric_specs(sizes)), sm.grad_specs),
        check_vma=True,
    )


@dataclasses.dataclass(frozen=True)
class _Slots:
    """One stage's forward and backward slots inside the shard_map body, and the tick that runs them."""

    sm: ShardedModel
    schedule: Schedule
    stage: Stage
    axes: Axes
    dtype: Any
    stack_p: Any
    edge_p: Any
    rest: Any
    tokens: Any
    targets: Any
    scale: Any
    zero_act: Any
    seg: int  # units per stashed segment: 1 (remat 'layer'; a backward slot holds one unit's activations) or l_c
    n_seg: int

    @classmethod
    def inside(cls, sm, schedule, axes, params, rest, tokens, targets, scale) -> _Slots:
        cfg = sm.cfg
        stage = Stage.inside(cfg, sm.sizes, schedule)
        stack_p, edge_p = _split(params, STACK_KEYS)
        # A zero activation [B/(M dp ep), S/tp, D] of the activations' varying type (every active axis).
        zero_act = jnp.zeros((*tokens.shape[1:], cfg.model.d_model), jnp.float32)
        active = active_axes(MESH_AXES, sm.sizes)
        zero_act = lax.pcast(zero_act, active, to="varying") if active else zero_act
        seg = 1 if cfg.layout.remat == "layer" else stage.l_c
        return cls(sm, schedule, stage, axes, compute_dtype(cfg.run.dtype), stack_p, edge_p, rest, tokens,
                   axes.loss_targets(targets), scale, zero_act, seg, stage.l_c // seg)  # fmt: skip

    # ---------------------------------------------------------------------------------------------- the model's parts

    def model_of(self, p):
        return nnx.merge(self.sm.graphdef, p, self.rest, copy=True)

    def embed(self, edge, tokens, remat: str):
        model = self.model_of(_join(edge, self.stack_p))
        x = model.embed_tokens(tokens, self.axes)
        if self.axes.vocab_pp:  # summed over the stages: the same on each, typed as the activations are
            x = lax.pcast(x, ("pp",), to="varying")
        return run_prologue(model, x, self.axes, self.dtype, remat) if self.stage.model.dense_layers else x

    def segment(self, stack, x, i0):
        """Units i0 .. i0 + seg - 1 of the stage's stack: ((output, its router loss share), statistics)."""
        units = Stack(self.model_of(_join(self.edge_p, stack)))
        m, mb = self.stage.model, self.stage.mb

        def layer(x, i):
            return stage_unit(units, x, i, self.axes, self.dtype, self.stage.n_units)

        y, stats = lax.scan(layer, x, i0 + jnp.arange(self.seg))
        lb_w, z_w = m.lb_loss_weight / (m.moe_layers * mb), m.z_loss_weight / (m.moe_layers * mb)
        return (y, lb_w * jnp.sum(stats["lb_loss"]) + z_w * jnp.sum(stats["z_loss"])), stats

    def loss_vjp(self, acc, y, j):
        """The loss of microbatch j on the last stage's output y under jax.vjp, its cotangent the loss scale over
        the global token count: (acc with the head's gradient added, the summed loss, the cotangent of y)."""
        run = self.sm.cfg.run

        def head_ce(edge, y):
            return self.model_of(_join(edge, self.stack_p)).loss_sum(y, self.targets[j], self.dtype, self.axes)

        ce, pull_head = jax.vjp(head_ce, self.edge_p, y)
        d_edge, dy = pull_head(ce * 0.0 + self.scale / (run.batch * run.seq_len))
        return dict(acc, edge=_add(acc["edge"], d_edge)), ce, dy

    def embed_vjp(self, acc, j, dx):
        """acc with the gradient of microbatch j's embedding (and dense first layers) for output cotangent dx."""
        _, pull_embed = jax.vjp(lambda e: self.embed(e, self.tokens[j], "none"), self.edge_p)
        return dict(acc, edge=_add(acc["edge"], pull_embed(dx)[0]))

    # ------------------------------------------------- the vocabulary split over pp: the edges outside the stage slots
    # (layout.vocab_split=tp_pp) The embedding and the head need every stage, so they run outside the stage-dependent
    # slots, under conditions on the tick alone (stage 0's forward slot's microbatch; stage 0's and the last stage's
    # backward slots'), and the stage that needs the result takes it.

    def slot_of(self, t, stage_of, backward):
        pp, v, mb = self.stage.pp, self.stage.v, self.stage.mb
        k = t - stage_of if not backward else t - self.schedule.backward_offset - (pp - 1 - stage_of)
        j, r = _slot(jnp.clip(k, 0, v * mb - 1), pp, v, backward=backward)
        return (k >= 0) & (k < v * mb), j, r

    def embed_all(self, t):
        """Stage 0's embedding of this tick's first-repeat microbatch, computed by every stage (its rows)."""
        valid, j, r = self.slot_of(t, 0, False)
        return lax.cond(
            valid & (r == 0), lambda: self.embed(self.edge_p, self.tokens[j], "none"), lambda: self.zero_act
        )

    def head_all(self, t, y_now, acc):
        """The last stage's loss of this tick (its output summed to every stage, each its columns of the head):
        (acc with the head's gradient and the loss, the output's cotangent)."""
        valid, j, r = self.slot_of(t, self.stage.pp - 1, True)
        last = self.stage.index == self.stage.pp - 1

        def head(acc):
            acc, ce, dy = self.loss_vjp(acc, lax.psum(jnp.where(last, y_now, 0.0), "pp"), j)
            ce = jnp.where(last, ce, 0.0)  # the same on every stage: counted once
            return dict(acc, ce=acc["ce"] + ce), lax.pcast(dy, ("pp",), to="varying")

        return lax.cond(valid & (r == self.stage.v - 1), head, lambda acc: (acc, self.zero_act), acc)

    def embed_back(self, t, dx, acc):
        """Stage 0's embedding gradient of this tick (its input cotangent summed to every stage, each its rows)."""
        valid, j, r = self.slot_of(t, 0, True)
        # stage 0's cotangent only: the embedding's cast to varying over pp sums it to every stage
        dx0 = jnp.where(self.stage.index == 0, dx, 0.0)
        return lax.cond(valid & (r == 0), lambda acc: self.embed_vjp(acc, j, dx0), lambda acc: acc, acc)

    # ------------------------------------------------------------------------------------------------------ the slots

    def forward(self, t, recv, stash, x_embed=None):
        """The forward slot: the chunk on its input, each segment's input stashed; returns (output, stash)."""
        st = self.stage
        k = t - st.index
        valid = (k >= 0) & (k < st.v * st.mb)
        j, r = _slot(jnp.clip(k, 0, st.v * st.mb - 1), st.pp, st.v, backward=False)
        first = (st.index == 0) & (r == 0)

        def run(stash):
            if x_embed is not None:  # computed by every stage (embed_all)
                x = jnp.where(first, x_embed, recv)
            else:
                x = lax.cond(first, lambda: self.embed(self.edge_p, self.tokens[j], "none"), lambda: recv)

            def seg_fwd(x, i):
                return self.segment(self.stack_p, x, r * st.l_c + i * self.seg)[0][0], x

            y, xs = lax.scan(seg_fwd, x, jnp.arange(self.n_seg))
            return y, stash.at[k % self.schedule.stash_slots].set(xs)

        return lax.cond(valid, run, lambda stash: (self.zero_act, stash), stash)

    def backward(self, t, recv, y_now, stash, acc, dy_head=None):
        """The backward slot: each segment recomputed from its stashed input under jax.vjp, last to first."""
        st = self.stage
        pp, v, mb = st.pp, st.v, st.mb
        k = t - self.schedule.backward_offset - (pp - 1 - st.index)
        valid = (k >= 0) & (k < v * mb)
        kc = jnp.clip(k, 0, v * mb - 1)
        j, r = _slot(kc, pp, v, backward=True)
        k_fwd = (kc // (v * pp)) * (v * pp) + r * pp + kc % pp
        last = (st.index == pp - 1) & (r == v - 1)
        first = (st.index == 0) & (r == 0)

        def run(acc):
            def from_loss(acc):  # this tick's forward slot ran the same microbatch: its output is y_now
                acc, ce, dy = self.loss_vjp(acc, y_now, j)
                return dict(acc, ce=acc["ce"] + ce), dy

            if dy_head is not None:  # computed by every stage (head_all)
                dy = jnp.where(last, dy_head, recv)
            else:
                acc, dy = lax.cond(last, from_loss, lambda acc: (acc, recv), acc)
            segments = (jnp.arange(self.n_seg), stash[k_fwd % self.schedule.stash_slots])
            (dx, acc), _ = lax.scan(lambda c, xs: self.segment_back(c, xs, r), (dy, acc), segments, reverse=True)
            if self.axes.vocab_pp:  # every stage's share of the embedding's gradient: embed_back
                return acc, dx
            return lax.cond(first, lambda acc: self.embed_vjp(acc, j, dx), lambda acc: acc, acc), dx

        return lax.cond(valid, run, lambda acc: (acc, self.zero_act), acc)

    def segment_back(self, carry, xs, r):
        """One segment of a backward slot: recomputed under jax.vjp from its stashed input x, its output's cotangent
        dy and its router loss share's (the loss scale) pulled back; the stack's gradient and the segment's router
        statistics added to acc. Returns ((the input's cotangent, acc), None)."""
        dy, acc = carry
        i, x = xs
        (_, router), pull, stats = jax.vjp(
            lambda s, x: self.segment(s, x, r * self.stage.l_c + i * self.seg), self.stack_p, x, has_aux=True
        )
        d_stack, dx = pull((dy, router * 0.0 + self.scale))
        acc = RouterStats.add(dict(acc, stack=_add(acc["stack"], d_stack)), stats, r, unit0=i * self.seg)
        return (dx, acc), None

    def tick(self, carry, t):
        recv_f, recv_b, stash, acc = carry
        if self.axes.vocab_pp:
            y, stash = self.forward(t, recv_f, stash, self.embed_all(t))
            acc, dy_head = self.head_all(t, y, acc)
            acc, dx = self.backward(t, recv_b, y, stash, acc, dy_head)
            acc = self.embed_back(t, dx, acc)
        else:
            y, stash = self.forward(t, recv_f, stash)  # first: the last stage's backward reads this tick's output
            acc, dx = self.backward(t, recv_b, y, stash, acc)
        if self.stage.pp_axes:
            fwd_perm = ring(self.stage.pp, self.stage.v)
            y, dx = lax.ppermute(y, "pp", fwd_perm), lax.ppermute(dx, "pp", [(b, a) for a, b in fwd_perm])
        return (y, dx, stash, acc), None


def _slot(k, pp: int, v: int, backward: bool):
    """Slot k -> (microbatch, repeat), traced (Schedule.slot for 1F1B)."""
    g, w = k // (v * pp), k % (v * pp)
    r = w // pp
    return g * pp + w % pp, (v - 1 - r if backward else r)
