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

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from moe_jax.config import storage_model, uneven_units
from moe_jax.model.layers import compute_dtype
from moe_jax.model.transformer import Stack, run_prologue
from moe_jax.parallel.schedule import schedule_of
from moe_jax.sharding import MESH_AXES, TOKEN_AXES, active_axes

# The parameters each kind of slot differentiates (the rest enter as constants): the stack's units, and the edges
# (embedding, dense first layers, final norm, head).
STACK_KEYS = ("blocks", "dense_blocks")


def _split(state, keys):
    inside = nnx.State({k: v for k, v in state.items() if k in keys})
    outside = nnx.State({k: v for k, v in state.items() if k not in keys})
    return inside, outside


def _join(a, b):
    return nnx.State({**a, **b})


def grads_fn(sm) -> Callable:
    """(params, rest, tokens, targets, scale) -> ((loss, metrics), gradients of scale x loss), one shard_map, the
    gradients sharded like the parameters. The same loss and metrics as `step.loss_fn` (GPipe)."""
    from moe_jax.parallel.step import _to_varying, batch_spec, reduce_grads, ring, sharded_axes, stage_unit

    cfg = sm.cfg
    m, lay = cfg.model, cfg.layout
    dtype = compute_dtype(cfg.run.dtype)
    n_tokens = cfg.run.batch * cfg.run.seq_len
    sizes = sm.sizes
    axes = sharded_axes(sm)
    sched = schedule_of(cfg)
    pp, v, mb = lay.pp, lay.repeats, lay.microbatches
    n_slots = sched.stash_slots
    uneven = uneven_units(cfg)
    all_tokens = active_axes((*TOKEN_AXES, "pp"), sizes)
    pp_axes = active_axes(("pp",), sizes)
    fwd_perm = ring(pp, v)
    bwd_perm = [(b, a) for a, b in fwd_perm]
    l_c = storage_model(cfg).units // (pp * v)
    # What a stage stashes per microbatch and chunk: every unit's input (remat 'layer'; the backward slot then holds
    # one unit's activations at a time) or the chunk's input ('tick'; the backward slot holds the chunk's).
    seg = 1 if lay.remat == "layer" else l_c
    n_seg = l_c // seg
    lb_w = m.lb_loss_weight / (m.moe_layers * mb)
    z_w = m.z_loss_weight / (m.moe_layers * mb)

    def body(params, rest, tokens_local, targets_local, scale):
        structure = jax.tree.structure(params)
        params = _to_varying(params, sm.param_specs, sizes)
        stack_p, edge_p = _split(params, STACK_KEYS)
        stage = lax.axis_index("pp") if pp_axes else 0
        n_units = jnp.asarray(uneven, jnp.int32)[stage] if uneven else None
        targets_local = axes.loss_targets(targets_local)

        def model_of(p):
            return nnx.merge(sm.graphdef, p, rest, copy=True)

        def embed(edge, tokens, remat: str):
            model = model_of(_join(edge, stack_p))
            x = model.embed_tokens(tokens, axes)
            if axes.vocab_pp:  # summed over the stages: the same on each, typed as the activations are
                x = lax.pcast(x, ("pp",), to="varying")
            return run_prologue(model, x, axes, dtype, remat) if m.dense_layers else x

        def segment(stack, x, i0):
            """Units i0 .. i0 + seg - 1 of the stage's stack: ((output, its router loss share), statistics)."""
            units = Stack(model_of(_join(edge_p, stack)))

            def layer(x, i):
                return stage_unit(units, x, i, axes, dtype, n_units)

            y, stats = lax.scan(layer, x, i0 + jnp.arange(seg))
            return (y, lb_w * jnp.sum(stats["lb_loss"]) + z_w * jnp.sum(stats["z_loss"])), stats

        def head_ce(edge, y, targets):
            return model_of(_join(edge, stack_p)).loss_sum(y, targets, dtype, axes)

        def add(a, b):
            return jax.tree.map(jnp.add, a, b)

        def loss_vjp(acc, y, j):
            """The loss of microbatch j on the last stage's output y under jax.vjp, its cotangent the loss scale over
            the global token count: (acc with the head's gradient added, the summed loss, the cotangent of y)."""
            ce, pull_head = jax.vjp(lambda e, y: head_ce(e, y, targets_local[j]), edge_p, y)
            d_edge, dy = pull_head(ce * 0.0 + scale / n_tokens)
            return dict(acc, edge=add(acc["edge"], d_edge)), ce, dy

        def embed_vjp(acc, j, dx):
            """acc with the gradient of microbatch j's embedding (and dense first layers) for output cotangent dx."""
            _, pull_embed = jax.vjp(lambda e: embed(e, tokens_local[j], "none"), edge_p)
            return dict(acc, edge=add(acc["edge"], pull_embed(dx)[0]))

        # A zero activation [B/(M dp ep), S/tp, D] of the activations' varying type (every active axis).
        zero_act = jnp.zeros((*tokens_local.shape[1:], m.d_model), jnp.float32)
        zero_act = (
            lax.pcast(zero_act, active_axes(MESH_AXES, sizes), to="varying")
            if active_axes(MESH_AXES, sizes)
            else zero_act
        )

        # The vocabulary split over pp too (layout.vocab_split=tp_pp): the embedding and the head need every stage, so
        # they run outside the stage-dependent slots, under conditions on the tick alone (stage 0's forward slot's
        # microbatch; stage 0's and the last stage's backward slots'), and the stage that needs the result takes it.
        def slot_of(t, stage_of, backward):
            k = t - stage_of if not backward else t - sched.backward_offset - (pp - 1 - stage_of)
            j, r = _slot(jnp.clip(k, 0, v * mb - 1), pp, v, backward=backward)
            return (k >= 0) & (k < v * mb), j, r

        def embed_all(t):
            """Stage 0's embedding of this tick's first-repeat microbatch, computed by every stage (its rows)."""
            valid, j, r = slot_of(t, 0, False)
            return lax.cond(valid & (r == 0), lambda: embed(edge_p, tokens_local[j], "none"), lambda: zero_act)

        def head_all(t, y_now, acc):
            """The last stage's loss of this tick (its output summed to every stage, each its columns of the head):
            (acc with the head's gradient and the loss, the output's cotangent)."""
            valid, j, r = slot_of(t, pp - 1, True)

            def head(acc):
                acc, ce, dy = loss_vjp(acc, lax.psum(jnp.where(stage == pp - 1, y_now, 0.0), "pp"), j)
                ce = jnp.where(stage == pp - 1, ce, 0.0)  # the same on every stage: counted once
                return dict(acc, ce=acc["ce"] + ce), lax.pcast(dy, ("pp",), to="varying")

            return lax.cond(valid & (r == v - 1), head, lambda acc: (acc, zero_act), acc)

        def embed_back(t, dx, acc):
            """Stage 0's embedding gradient of this tick (its input cotangent summed to every stage, each its rows)."""
            valid, j, r = slot_of(t, 0, True)

            # stage 0's cotangent only: the embedding's cast to varying over pp sums it to every stage
            dx0 = jnp.where(stage == 0, dx, 0.0)
            return lax.cond(valid & (r == 0), lambda acc: embed_vjp(acc, j, dx0), lambda acc: acc, acc)

        def forward(t, recv, stash, x_embed=None):
            """The forward slot: the chunk on its input, each segment's input stashed; returns (output, stash)."""
            k = t - stage
            valid = (k >= 0) & (k < v * mb)
            j, r = _slot(jnp.clip(k, 0, v * mb - 1), pp, v, backward=False)
            first = (stage == 0) & (r == 0)

            def run(stash):
                if x_embed is not None:  # computed by every stage (embed_all)
                    x = jnp.where(first, x_embed, recv)
                else:
                    x = lax.cond(first, lambda: embed(edge_p, tokens_local[j], "none"), lambda: recv)
                y, xs = lax.scan(lambda x, i: (segment(stack_p, x, r * l_c + i * seg)[0][0], x), x, jnp.arange(n_seg))
                return y, stash.at[k % n_slots].set(xs)

            return lax.cond(valid, run, lambda stash: (zero_act, stash), stash)

        def backward(t, recv, y_now, stash, acc, dy_head=None):
            """The backward slot: each segment recomputed from its stashed input under jax.vjp, last to first."""
            k = t - sched.backward_offset - (pp - 1 - stage)
            valid = (k >= 0) & (k < v * mb)
            kc = jnp.clip(k, 0, v * mb - 1)
            j, r = _slot(kc, pp, v, backward=True)
            k_fwd = (kc // (v * pp)) * (v * pp) + r * pp + kc % pp
            last = (stage == pp - 1) & (r == v - 1)
            first = (stage == 0) & (r == 0)

            def run(acc):
                def from_loss(acc):  # this tick's forward slot ran the same microbatch: its output is y_now
                    acc, ce, dy = loss_vjp(acc, y_now, j)
                    return dict(acc, ce=acc["ce"] + ce), dy

                if dy_head is not None:  # computed by every stage (head_all)
                    dy = jnp.where(last, dy_head, recv)
                else:
                    acc, dy = lax.cond(last, from_loss, lambda acc: (acc, recv), acc)

                def back(carry, xs):
                    dy, acc = carry
                    i, x = xs
                    (_, router), pull, stats = jax.vjp(
                        lambda s, x: segment(s, x, r * l_c + i * seg), stack_p, x, has_aux=True
                    )
                    d_stack, dx = pull((dy, router * 0.0 + scale))
                    acc = dict(
                        acc,
                        stack=add(acc["stack"], d_stack),
                        lb_loss=acc["lb_loss"] + jnp.sum(stats["lb_loss"]),
                        z_loss=acc["z_loss"] + jnp.sum(stats["z_loss"]),
                        dropped=acc["dropped"] + jnp.sum(stats["dropped"]),
                        routed=acc["routed"] + jnp.sum(stats["routed"]),
                        tokens_per_expert=lax.dynamic_update_slice(
                            acc["tokens_per_expert"],
                            lax.dynamic_slice(acc["tokens_per_expert"], (r, i * seg, 0), (1, seg, m.experts))
                            + stats["tokens_per_expert"][None],
                            (r, i * seg, 0),
                        ),
                    )
                    return (dx, acc), None

                (dx, acc), _ = lax.scan(back, (dy, acc), (jnp.arange(n_seg), stash[k_fwd % n_slots]), reverse=True)

                if axes.vocab_pp:  # every stage's share of the embedding's gradient: embed_back
                    return acc, dx
                return lax.cond(first, lambda acc: embed_vjp(acc, j, dx), lambda acc: acc, acc), dx

            return lax.cond(valid, run, lambda acc: (acc, zero_act), acc)

        def tick(carry, t):
            recv_f, recv_b, stash, acc = carry
            if axes.vocab_pp:
                y, stash = forward(t, recv_f, stash, embed_all(t))
                acc, dy_head = head_all(t, y, acc)
                acc, dx = backward(t, recv_b, y, stash, acc, dy_head)
                acc = embed_back(t, dx, acc)
            else:
                y, stash = forward(t, recv_f, stash)  # first: the last stage's backward reads this tick's output
                acc, dx = backward(t, recv_b, y, stash, acc)
            if pp_axes:
                y, dx = lax.ppermute(y, "pp", fwd_perm), lax.ppermute(dx, "pp", bwd_perm)
            return (y, dx, stash, acc), None

        # The router statistics are summed over the token axes inside each layer: varying over pp only, as in GPipe.
        zero_stat = jnp.zeros((), jnp.float32)
        zero_tpe = jnp.zeros((v, l_c, m.experts), jnp.float32)
        if pp_axes:
            zero_stat, zero_tpe = (
                lax.pcast(zero_stat, pp_axes, to="varying"),
                lax.pcast(zero_tpe, pp_axes, to="varying"),
            )
        acc0 = {
            "stack": jax.tree.map(lambda a: jnp.zeros_like(a, jnp.float32), stack_p),
            "edge": jax.tree.map(lambda a: jnp.zeros_like(a, jnp.float32), edge_p),
            "ce": jnp.zeros((), jnp.float32) * zero_act[0, 0, 0],
            "tokens_per_expert": zero_tpe,
        } | {k: zero_stat for k in ("lb_loss", "z_loss", "dropped", "routed")}
        stash0 = jnp.broadcast_to(zero_act, (n_slots, n_seg, *zero_act.shape))
        (_, _, _, acc), _ = lax.scan(tick, (zero_act, zero_act, stash0, acc0), jnp.arange(sched.ticks))

        ce = lax.psum(acc["ce"], all_tokens) / n_tokens if all_tokens else acc["ce"] / n_tokens
        totals = jnp.stack([acc["lb_loss"], acc["z_loss"], acc["dropped"], acc["routed"]])
        totals = lax.psum(totals, pp_axes) if pp_axes else totals
        lb, z = totals[0] / (m.moe_layers * mb), totals[1] / (m.moe_layers * mb)
        router_loss = m.lb_loss_weight * lb + m.z_loss_weight * z
        tpe = acc["tokens_per_expert"]
        metrics = {
            "ce": ce,
            "lb_loss": lb,
            "z_loss": z,
            "router_loss": router_loss,
            "dropped": totals[2],
            "routed": totals[3],
            "tokens_per_expert": tpe.reshape(v * l_c, m.experts),
        }
        # The gradients in the parameters' own tree (both flatten in sorted key order), each summed over the axes its
        # weight is replicated on (the transpose of the pcast above; ZeRO-1: reduce-scattered over the batch axes).
        grads = jax.tree.unflatten(structure, jax.tree.leaves(_join(acc["edge"], acc["stack"])))
        return (ce + router_loss, metrics), reduce_grads(sm, grads)

    from moe_jax.parallel.step import metric_specs

    return jax.shard_map(
        body,
        mesh=sm.mesh,
        in_specs=(sm.param_specs, sm.rest_specs, batch_spec(sizes), batch_spec(sizes), P()),
        out_specs=((P(), metric_specs(sizes)), sm.grad_specs),
        check_vma=True,
    )


def _slot(k, pp: int, v: int, backward: bool):
    """Slot k -> (microbatch, repeat), traced (Schedule.slot for 1F1B)."""
    g, w = k // (v * pp), k % (v * pp)
    r = w // pp
    return g * pp + w % pp, (v - 1 - r if backward else r)
