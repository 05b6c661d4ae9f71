"""The MoE feed-forward as a row of small steps: route, plan the dispatch, gather into expert buffers, exchange over
ep, run the experts, exchange back, combine.

Dispatch is by sort and gather (never a one-hot einsum, which costs T x E x C x D multiply-adds). Tokens are grouped
(G groups, each its own capacity): inside shard_map a device is one group, its own tokens; on one device a test can
cut the batch into the same groups to reproduce the sharded capacity rule exactly.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.model.layers import expert_ffn, ffn, param
from moe_jax.sharding import Axes


class ExpertBias(nnx.Variable):
    """DeepSeek-style aux-loss-free routing bias: shifts which experts are chosen, never the gate values. Updated
    outside the gradient by `update_expert_bias`."""


class Routing(NamedTuple):
    experts_GTR: jax.Array  # int32 expert ids, best first
    gates_GTR: jax.Array  # fp32 gates (renormalised over the k chosen when norm_topk, times routed_scale)
    probs_GTE: jax.Array  # fp32 scores of every expert: softmax over experts, or a sigmoid each
    logits_GTE: jax.Array  # fp32 router logits


def route(x_GTD, w_DE, bias_E, cfg: ModelConfig) -> Routing:
    """fp32 scores (softmax over E experts, or a sigmoid per expert); top-k on scores + bias when the aux-free bias is
    on; grouped top-k keeps each token to the best group_top_k of expert_groups groups (a group's score: the sum of
    its two best scores, DeepSeek-V3's rule); gates are the chosen scores, renormalised over the k when norm_topk,
    times routed_scale."""
    logits = jnp.einsum("GTD,DE->GTE", x_GTD.astype(jnp.float32), w_DE.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1) if cfg.router_score == "softmax" else jax.nn.sigmoid(logits)
    scores = probs if bias_E is None else probs + jax.lax.stop_gradient(bias_E)
    if cfg.expert_groups > 1:
        n = cfg.expert_groups
        g, t, e = scores.shape
        per_group = scores.reshape(g, t, n, e // n)
        group_score = jnp.sum(jax.lax.top_k(per_group, min(2, e // n))[0], axis=-1)  # [G, T, n]
        _, best = jax.lax.top_k(group_score, cfg.group_top_k)
        allowed = jnp.sum(jax.nn.one_hot(best, n, dtype=jnp.bool_), axis=-2, dtype=jnp.bool_)  # [G, T, n]
        scores = jnp.where(jnp.repeat(allowed, e // n, axis=-1), scores, -jnp.inf)
    _, experts = jax.lax.top_k(scores, cfg.top_k)
    gates = jnp.take_along_axis(probs, experts, axis=-1)
    if cfg.norm_topk:
        gates = gates / (jnp.sum(gates, axis=-1, keepdims=True) + 1e-20)
    return Routing(experts.astype(jnp.int32), gates * cfg.routed_scale, probs, logits)


def capacity(cfg: ModelConfig, tokens: int) -> int:
    """Expert buffer rows per group. Capacity mode: ceil(k T / E x factor), at most T. Dropless: T, which is exact
    because a token's k choices are distinct experts, so no expert can receive more than T (k x fewer rows than the
    k T of design.md, same result). Ragged: T as well, the worst case its padded exchange over ep sends."""
    if cfg.dispatch in ("dropless", "ragged"):
        return tokens
    return max(1, min(tokens, math.ceil(cfg.top_k * tokens / cfg.experts * cfg.capacity_factor)))


class DispatchPlan(NamedTuple):
    slot_TR: jax.Array  # buffer row e * C + position for each (token, choice); E * C where dropped
    keep_TR: jax.Array  # bool: the choice fits in its expert's capacity
    token_of_slot: jax.Array  # [E * C] the token filling each buffer row, T (a zero row) where empty


def plan_dispatch(experts_TR, num_experts: int, cap: int) -> DispatchPlan:
    """Positions in each expert's buffer: top-1 choices before top-2, then token order (one stable sort)."""
    t, r = experts_TR.shape
    e_flat = experts_TR.T.reshape(-1)  # choice-major: every top-1 choice, then every top-2 choice
    order = jnp.argsort(e_flat, stable=True)
    counts_E = jnp.bincount(e_flat, length=num_experts)
    starts_E = jnp.cumsum(counts_E) - counts_E
    rank_sorted = jnp.arange(r * t) - starts_E[e_flat[order]]
    pos_flat = jnp.zeros(r * t, jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
    pos_TR = pos_flat.reshape(r, t).T
    keep_TR = pos_TR < cap
    slot_TR = jnp.where(keep_TR, experts_TR * cap + pos_TR, num_experts * cap)
    token_TR = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, r))
    token_of_slot = (
        jnp.full(num_experts * cap, t, jnp.int32).at[slot_TR.reshape(-1)].set(token_TR.reshape(-1), mode="drop")
    )
    return DispatchPlan(slot_TR, keep_TR, token_of_slot)


def gather_to_buffers(x_TD, plan: DispatchPlan, num_experts: int):
    """[T, D] -> [E, C, D]: each buffer row a copy of its token (zeros where empty)."""
    x_pad = jnp.concatenate([x_TD, jnp.zeros((1, x_TD.shape[1]), x_TD.dtype)])
    return x_pad[plan.token_of_slot].reshape(num_experts, -1, x_TD.shape[1])


def combine_from_buffers(y_ECD, plan: DispatchPlan, gates_TR):
    """[E, C, D] -> [T, D]: the gate-weighted sum of each token's kept expert outputs (dropped choices add zero)."""
    e, c, d = y_ECD.shape
    y_pad = jnp.concatenate([y_ECD.reshape(e * c, d), jnp.zeros((1, d), y_ECD.dtype)])
    y_TRD = y_pad[plan.slot_TR]
    w_TR = jnp.where(plan.keep_TR, gates_TR, 0.0).astype(y_TRD.dtype)
    return jnp.einsum("TR,TRD->TD", w_TR, y_TRD)


def ragged_ffn(x_RD, sizes_E, w_in_EDF, w_gate_EDF, w_out_EFD, dtype):
    """The experts' FFN over rows sorted by expert (`sizes_E` rows each, in order; rows past their sum give zeros) as
    grouped matmuls (`lax.ragged_dot`): each expert computes only its own rows. fp32 out, as `expert_ffn`."""

    def grouped(a, w, **kw):  # [R, I] x [E, I, O] -> [R, O], row r by its group's matrix
        return jax.lax.ragged_dot(a, w, sizes_E, **kw)

    return ffn(grouped, x_RD, w_in_EDF, w_gate_EDF, w_out_EFD, dtype)


def filled_rows_ffn(x_ECD, rows_ES, weights, dtype):
    """Ragged dispatch on the expert side: buffers [E_loc, S x C, D] of S sources' blocks of C rows each, of which the
    first rows_ES[e, s] are filled. The filled rows are sorted to the front, expert by expert, computed as grouped
    matmuls, and put back (the empty rows give zeros)."""
    e_loc, rows, d = x_ECD.shape
    c = rows // rows_ES.shape[1]
    filled_ER = (jnp.arange(c)[None, None, :] < rows_ES[:, :, None]).reshape(e_loc, rows)
    key = jnp.where(filled_ER, jnp.arange(e_loc)[:, None], e_loc).reshape(-1)
    order = jnp.argsort(key, stable=True)  # the filled rows, expert by expert; the empty ones last (no group)
    y = ragged_ffn(x_ECD.reshape(-1, d)[order], jnp.sum(filled_ER, axis=1).astype(jnp.int32), *weights, dtype)
    return jnp.zeros_like(y).at[order].set(y).reshape(e_loc, rows, d)


_FALLBACK_SAID: set[str] = set()


def say_padded_exchange(backend: str) -> None:
    """Once per process: the ragged dispatch's exchange over ep is the padded all-to-all."""
    if backend in _FALLBACK_SAID:
        return
    _FALLBACK_SAID.add(backend)
    why = ("XLA:CPU cannot compile ragged_all_to_all" if backend == "cpu" else
           "layout.ragged_exchange=padded")  # fmt: skip
    print(f"moe_jax: ragged dispatch exchanges over ep with the padded all-to-all (the worst case, T rows per expert "
          f"and source; the experts still compute only their rows): {why}", file=sys.stderr, flush=True)  # fmt: skip


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, recv_offsets, recv_sizes, *, axis_name,
                               max_rows: int):  # fmt: skip
    """`jax.lax.ragged_all_to_all`'s semantics from a padded all-to-all, for backends that cannot compile it
    (layout.ragged_exchange=emulated): chunk j, rows input_offsets[j] .. + send_sizes[j] of `operand`, goes to peer j;
    what source s sends lands in `output` at recv_offsets[s] for recv_sizes[s] rows. (ragged_all_to_all takes the
    senders' output offsets and exchanges them; the callers here know the receiving side's, so no exchange.) Each
    chunk travels padded to `max_rows` (no chunk is longer)."""
    n, w = send_sizes.shape[0], max_rows
    i = jnp.arange(w)
    rows = operand[jnp.clip(input_offsets[:, None] + i[None, :], 0, operand.shape[0] - 1)]  # [n, w, ...]
    mask = (i[None, :] < send_sizes[:, None]).reshape(n, w, *([1] * (operand.ndim - 1)))
    got = jax.lax.all_to_all(jnp.where(mask, rows, 0), axis_name, 0, 0, tiled=True)  # row s: from source s
    dst = jnp.where(i[None, :] < recv_sizes[:, None], recv_offsets[:, None] + i[None, :], output.shape[0])
    return output.at[dst.reshape(-1)].set(got.reshape(n * w, *operand.shape[1:]), mode="drop")


def ragged_exchange_ffn(x_GTD, r: Routing, weights, dtype, axes: Axes, num_experts: int):
    """Ragged dispatch across expert shards with a ragged all-to-all: each device sorts its (token, choice) pairs by
    expert and sends each expert shard exactly the rows it routed there (k T rows in all, not E x T); the shard
    sorts what it received by local expert, runs the grouped matmuls (unfolded: after gathering its tp group's rows,
    then reduce-scattering the partial sums, as the padded path), and sends each source its rows back, which it
    un-sorts and combines with the gates. The receive buffer holds n blocks of min(k, E_loc) T rows (n expert shards;
    a token picks an expert at most once, so no source sends a shard more: every source's worst case, source s's
    block at s times that); the row counts are exchanged first."""
    g, t, d = x_GTD.shape
    k = r.experts_GTR.shape[-1]
    e_loc = weights[0].shape[0]
    n, p = num_experts // e_loc, g * t * k  # expert shards; pairs per device
    b = min(k, e_loc) * g * t  # the most rows one source sends one shard: a source block here
    e_flat = r.experts_GTR.reshape(-1)  # token-major: pair q is token q // k, choice q % k
    order = jnp.argsort(e_flat, stable=True)
    rows = x_GTD.reshape(g * t, d).astype(dtype)[order // k]  # [p, D], by expert: shard by shard
    counts = jnp.bincount(e_flat, length=num_experts).astype(jnp.int32).reshape(n, e_loc)
    send = jnp.sum(counts, axis=1)
    in_off = jnp.cumsum(send) - send
    got_counts = jax.lax.all_to_all(counts, axes.experts, 0, 0, tiled=True)  # row s: what source s sends here
    recv = jnp.sum(got_counts, axis=1)
    blocks_here = jnp.arange(n, dtype=jnp.int32) * b  # source s's block
    if axes.exchange == "ragged":
        me = jax.lax.axis_index(axes.experts)
        peer_off = jax.lax.all_to_all(in_off, axes.experts, 0, 0, tiled=True)  # where our block sits at source s

        def out(x, buf):
            return jax.lax.ragged_all_to_all(x, buf, in_off, send, jnp.full((n,), me * b, jnp.int32), recv,
                                             axis_name=axes.experts)  # fmt: skip

        def back(y, buf):
            return jax.lax.ragged_all_to_all(y, buf, blocks_here, recv, peer_off, send, axis_name=axes.experts)
    else:
        exchange = functools.partial(ragged_all_to_all_emulated, axis_name=axes.experts, max_rows=b)

        def out(x, buf):
            return exchange(x, buf, in_off, send, blocks_here, recv)

        def back(y, buf):
            return exchange(y, buf, blocks_here, recv, in_off, send)

    def empty(n_rows, like):
        """A zero buffer typed like `like` (varying over its axes). A plain jnp.zeros is invariant, and JAX would make
        it varying with a pcast whose transpose, in the backward pass, is a psum of the buffer's (unused) cotangent."""
        return jnp.zeros((n_rows, d), dtype) + jnp.zeros_like(like[:1])

    got = out(rows, empty(n * b, rows))
    got = axes.gather_for_experts(got, axis=0)  # unfolded: the tp group's rows, [tp n b, D]
    blocks = axes.gather_for_experts(got_counts, axis=0)  # [tp n, E_loc]
    cum = jnp.cumsum(blocks, axis=1)
    expert_of = jax.vmap(lambda c: jnp.searchsorted(c, jnp.arange(b), side="right"))(cum)  # E_loc past the filled
    by_expert = jnp.argsort(expert_of.reshape(-1), stable=True)
    y = ragged_ffn(got[by_expert], jnp.sum(blocks, axis=0).astype(jnp.int32), *weights, dtype)
    y = axes.scatter_from_experts(jnp.zeros_like(y).at[by_expert].set(y), axis=0).astype(dtype)  # [n b, D]
    y_PD = back(y, empty(p, y))
    y_PRD = jnp.zeros_like(y_PD).at[order].set(y_PD).reshape(g * t, k, d)
    y_TD = jnp.einsum("TR,TRD->TD", r.gates_GTR.reshape(g * t, k).astype(dtype), y_PRD)
    return y_TD.reshape(g, t, d)


def router_stats(r: Routing, keep_GTR, num_experts: int, axes: Axes, softmax: bool = True) -> dict[str, jax.Array]:
    """Whole-batch router statistics: every sum is taken over all shards before any ratio, in one all-reduce of
    [counts (E), probability sums (E), z sum, drops]. Sigmoid scores enter the load-balancing loss normalised to sum
    1 per token (DeepSeek-V3's sequence-wise balance loss does the same)."""
    e = num_experts
    probs = r.probs_GTE if softmax else r.probs_GTE / jnp.sum(r.probs_GTE, axis=-1, keepdims=True)
    local = jnp.concatenate(
        [
            jnp.sum(jax.nn.one_hot(r.experts_GTR, e, dtype=jnp.float32), axis=(0, 1, 2)),
            jnp.sum(probs, axis=(0, 1)),
            jnp.sum(jnp.square(jax.nn.logsumexp(r.logits_GTE, axis=-1)))[None],
            jnp.sum(~keep_GTR).astype(jnp.float32)[None],
        ]
    )
    total = axes.sum_tokens(local)
    counts_E, probs_E, z, dropped = total[:e], total[e : 2 * e], total[2 * e], total[2 * e + 1]
    tokens = jnp.float32(r.probs_GTE.shape[0] * r.probs_GTE.shape[1] * axes.token_shards)
    k = r.experts_GTR.shape[-1]
    frac_E = counts_E / (k * tokens)  # share of routed choices per expert (sums to 1)
    return {
        "lb_loss": num_experts * jnp.sum(frac_E * probs_E / tokens),  # Switch: E sum_e f_e P_e, 1 when uniform
        "z_loss": z / tokens,
        "tokens_per_expert": counts_E,
        "dropped": dropped,
        "routed": k * tokens,
    }


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, out_std: float, *, rngs: nnx.Rngs):
        d, e, f = cfg.d_model, cfg.experts, cfg.expert_hidden
        self.cfg = cfg
        self.router = param(rngs, (d, e), ("embed", "router_experts"), cfg.init_std)
        self.w_in = param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), cfg.init_std)
        self.w_gate = (
            param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), cfg.init_std) if cfg.ffn == "swiglu" else None
        )
        self.w_out = param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), out_std)
        self.bias = (
            ExpertBias(jnp.zeros((e,), jnp.float32), out_sharding=("router_experts",)) if cfg.expert_bias else None
        )

    def __call__(self, x_GTD, axes: Axes, dtype, dropless: bool = False):
        """x_GTD: normed fp32 tokens in G dispatch groups. Returns (y_GTD in the compute dtype, router statistics).
        `dropless` forces C = T whatever the config (serving: no token may be dropped)."""
        cfg = self.cfg
        g, t, d = x_GTD.shape
        e = cfg.experts
        cap = t if dropless else capacity(cfg, t)
        r = route(x_GTD, self.router[...], None if self.bias is None else self.bias[...], cfg)
        weights = self.w_in[...], None if self.w_gate is None else self.w_gate[...], self.w_out[...]
        ragged = cfg.dispatch == "ragged" and not dropless  # serving's dropless=True keeps the buffers
        if ragged and axes.experts is None and axes.tp is None:
            y_GTD = ragged_local(x_GTD, r, weights, dtype)
            keep = jnp.ones(r.experts_GTR.shape, jnp.bool_)
            return y_GTD, router_stats(r, keep, e, axes, cfg.router_score == "softmax")
        if ragged and axes.experts is not None and axes.exchange != "padded":
            y_GTD = axes.settle_folded(ragged_exchange_ffn(x_GTD, r, weights, dtype, axes, e))
            keep = jnp.ones(r.experts_GTR.shape, jnp.bool_)
            return y_GTD, router_stats(r, keep, e, axes, cfg.router_score == "softmax")
        if ragged and axes.experts is not None:
            say_padded_exchange(jax.default_backend())
        plan = jax.vmap(plan_dispatch, in_axes=(0, None, None))(r.experts_GTR, e, cap)
        x_GECD = jax.vmap(gather_to_buffers, in_axes=(0, 0, None))(x_GTD.astype(dtype), plan, e)

        # Source groups -> experts: [G, E, C, D] -> [E_local, ep x G x C, D], then the sequence over tp (folded: the
        # all-to-all spans (ep, tp) and brings every source's rows, [E_local, ep x tp x G x C, D], nothing gathered).
        x_ECD = axes.to_experts(x_GECD.swapaxes(0, 1).reshape(e, g * cap, d))
        x_ECD = axes.gather_for_experts(x_ECD, axis=1)
        if ragged:  # each source's row counts, exchanged the same way: [E, G] -> [E_local, tp x ep x G]
            counts_GE = jnp.sum(jax.nn.one_hot(r.experts_GTR, e, dtype=jnp.int32), axis=(1, 2))
            rows_ES = axes.gather_for_experts(axes.to_experts(counts_GE.T), axis=1)
            y_ECD = filled_rows_ffn(x_ECD, rows_ES, weights, dtype)
        else:
            y_ECD = expert_ffn(x_ECD, *weights, dtype)
        y_ECD = axes.from_experts(axes.scatter_from_experts(y_ECD, axis=1).astype(dtype))
        y_GECD = y_ECD.reshape(e, g, cap, d).swapaxes(0, 1)

        y_GTD = axes.settle_folded(jax.vmap(combine_from_buffers)(y_GECD, plan, r.gates_GTR))
        return y_GTD, router_stats(r, plan.keep_TR, e, axes, cfg.router_score == "softmax")


def ragged_local(x_GTD, r: Routing, weights, dtype):
    """One device (no ep, no tp): every (token, choice) pair sorted by expert, the experts as grouped matmuls over
    exactly their rows, un-sorted and combined with the gates. Dispatch groups do not matter (nothing is dropped):
    all G x T tokens go together."""
    g, t, d = x_GTD.shape
    k, e = r.experts_GTR.shape[-1], weights[0].shape[0]
    e_flat = r.experts_GTR.reshape(-1)  # token-major: pair p is token p // k, choice p % k
    order = jnp.argsort(e_flat, stable=True)
    sizes = jnp.bincount(e_flat, length=e).astype(jnp.int32)
    y = ragged_ffn(x_GTD.reshape(g * t, d).astype(dtype)[order // k], sizes, *weights, dtype)
    y_PRD = jnp.zeros_like(y).at[order].set(y).reshape(g * t, k, d).astype(dtype)
    y_TD = jnp.einsum("TR,TRD->TD", r.gates_GTR.reshape(g * t, k).astype(dtype), y_PRD)
    return y_TD.reshape(g, t, d)


def update_expert_bias(bias_E, tokens_per_expert_E, rate: float):
    """Aux-loss-free balancing: raise the bias of under-loaded experts, lower it for over-loaded ones."""
    return bias_E + rate * jnp.sign(jnp.mean(tokens_per_expert_E) - tokens_per_expert_E)
