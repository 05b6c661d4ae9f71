"""Prefill and decode on the mesh: one shard_map step that runs S new tokens per sequence through the pipeline,
reading and writing a KV cache sharded like the model (units over pp, batch over (dp, ep), K/V heads over tp).

Serving does not split the sequence over tp (a decode step has one token): tp partial sums are all-reduced
(`Axes.serving`). Routing is dropless. Microbatches rotate through the stages exactly as in training (the same
schedule, forward only); bubble ticks leave the cache untouched. The step returns the logits of each sequence's last
new position and the updated cache.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax.config import Config, ConfigError, masked_vocab, storage_model
from moe_jax.model.layers import compute_dtype
from moe_jax.model.transformer import Stack, block_cached, check_tokens
from moe_jax.parallel.pipeline import Stage, run_ticks
from moe_jax.parallel.schedule import Schedule
from moe_jax.parallel.sharded import ShardedModel
from moe_jax.sharding import Axes, logical_to_mesh


def cache_specs(cfg: Config, sizes) -> dict[str, P]:
    """KV cache per stack: units [U, M, B / M, T_max, G, K], the units' dense layers [U, n - 1, ...], the dense
    first layers [k, ...] (every stage, like their weights). G: K/V heads, split over tp; where tp > kv_heads each tp
    rank caches the one head it reads, so G = tp."""
    shapes = cache_shapes(cfg, 1)
    # latent attention: the latent and the RoPE key, one "head" each, whole on every tp rank
    tail = ("microbatch", "batch", None, "kv_heads", "head_dim") if cfg.model.attention == "mha" else (
        "microbatch", "batch", None, None, None)  # fmt: skip
    lead = {"blocks": ("layers",), "dense_blocks": ("layers", "sublayers"), "prologue": ("prologue",)}
    return {k: logical_to_mesh((*lead[k], *tail), sizes, shape) for k, shape in shapes.items()}


def cache_shapes(cfg: Config, max_len: int, which: str = "k") -> dict[str, tuple[int, ...]]:
    """The k (or v) caches' global shapes by stack. Latent attention: the k cache holds the latent [.., 1, R], the v
    cache the RoPE key [.., 1, P]."""
    m, lay = cfg.model, cfg.layout
    mb = lay.microbatches
    units = storage_model(cfg).units
    if m.attention == "mla":
        kv, width = 1, (m.kv_lora_rank if which == "k" else m.qk_rope_head_dim)
    else:
        kv, width = (m.n_kv_heads if m.n_kv_heads % lay.tp == 0 else lay.tp), m.head_dim
    tail = (mb, cfg.run.batch // mb, max_len, kv, width)
    shapes = {"blocks": (units, *tail)}
    if m.moe_every > 1:
        shapes["dense_blocks"] = (units, m.moe_every - 1, *tail)
    if m.dense_layers:
        shapes["prologue"] = (m.dense_layers, *tail)
    return shapes


def tokens_spec(sizes) -> P:
    """New tokens [M, B / M, S]: rows over (dp, ep), every tp rank the whole sequence."""
    return logical_to_mesh(("microbatch", "batch", None), sizes)


@dataclasses.dataclass(frozen=True)
class ServeModel:
    sm: ShardedModel
    max_len: int

    @classmethod
    def build(cls, cfg: Config, mesh, max_len: int | None = None) -> ServeModel:
        max_len = cfg.model.max_seq_len if max_len is None else max_len
        if max_len > cfg.model.max_seq_len:
            raise ConfigError(f"max_len={max_len}: must be <= model.max_seq_len={cfg.model.max_seq_len}")
        return cls(ShardedModel.build(cfg, mesh), max_len)

    @property
    def cache_shape(self) -> dict[str, tuple[int, ...]]:
        return cache_shapes(self.sm.cfg, self.max_len)

    def init_cache(self):
        """(k caches, v caches): zeros, each a dict of arrays by stack (see `cache_specs`)."""
        cfg = self.sm.cfg
        specs = cache_specs(cfg, self.sm.sizes)
        dtype = compute_dtype(cfg.run.dtype)
        sh = {k: NamedSharding(self.sm.mesh, spec) for k, spec in specs.items()}

        def zeros(which):
            shapes = cache_shapes(cfg, self.max_len, which)
            return jax.jit(lambda: {k: jnp.zeros(shape, dtype) for k, shape in shapes.items()}, out_shardings=sh)()

        return zeros("k"), zeros("v")

    def put_tokens(self, tokens_BS) -> jax.Array:
        cfg = self.sm.cfg
        tokens = check_tokens(tokens_BS, cfg.model.vocab, "prompt tokens")
        lay = cfg.layout
        if tokens.shape[0] != cfg.run.batch:
            raise ConfigError(
                f"batch={tokens.shape[0]}: the step serves run.batch={cfg.run.batch} sequences; it must be a "
                f"multiple of layout.dp x layout.ep x layout.microbatches = {lay.dp * lay.ep * lay.microbatches}"
            )
        mb = lay.microbatches
        sh = NamedSharding(self.sm.mesh, tokens_spec(self.sm.sizes))
        return jax.device_put(jnp.asarray(tokens.reshape(mb, tokens.shape[0] // mb, -1), jnp.int32), sh)

    def step_fn(self, every_position: bool = False) -> Callable:
        """(params, rest, cache_k, cache_v, tokens [M, B/M, S], pos) -> (logits [M, B/M, V], cache_k, cache_v): the
        logits of the last new position, or of every new one ([M, B/M, S, V]: scoring a text, checking a model).
        One jitted function per (layout, cache length) in a process, so repeated generation reuses its programs."""
        return _serve_step(self, every_position)

    def logits_to_host(self, logits) -> np.ndarray:
        """[M, B/M, V] -> [B, V], or [M, B/M, S, V] -> [B, S, V]."""
        x = np.asarray(jax.device_get(logits))
        return x.reshape(-1, *x.shape[2:])


@functools.lru_cache(maxsize=16)
def _serve_step(srv: ServeModel, every_position: bool = False) -> Callable:
    """The jitted prefill/decode step of `ServeModel.step_fn`: the GPipe tick loop (parallel/pipeline.py), forward
    only, each unit reading and writing its cache entries; then the logits of the last stage's outputs."""
    sm = srv.sm
    cfg = sm.cfg
    lay = cfg.layout
    dtype = compute_dtype(cfg.run.dtype)
    sizes = sm.sizes
    axes = Axes.serving(sizes, sm.rules, masked_vocab(cfg))
    schedule = Schedule(lay.pp, lay.microbatches, lay.repeats, storage_model(cfg).units)

    def body(params, rest, ck, cv, tokens_local, pos):
        # No pcast of the replicated weights here: nothing is differentiated, so they stay invariant and so do
        # the logits (over tp every partial sum is all-reduced).
        model = nnx.merge(sm.graphdef, params, rest, copy=True)
        stage = Stage.inside(cfg, sizes, schedule)
        x_MBSD = model.embed_tokens(tokens_local, axes)
        cache = _Cache(pos, axes, dtype)
        ck, cv = dict(ck), dict(cv)
        if cfg.model.dense_layers:  # every stage, every microbatch, before the pipeline (as in training)
            x_MBSD, ck["prologue"], cv["prologue"] = cache.prologue(
                model, cfg.model.dense_layers, x_MBSD, ck["prologue"], cv["prologue"]
            )
        stack = Stack(model)

        def chunk(x, j, r, valid, caches):
            units = r * stage.l_c + jnp.arange(stage.l_c)
            (y, ck, cv, _, _), _ = lax.scan(cache.unit_fn(stack, stage), (x, *caches, j, valid), units)
            return y, (ck, cv)

        zero_act = x_MBSD[0] * 0.0
        if stage.pp_axes:  # activations differ by stage once they pass through a stage's layers
            zero_act = lax.pcast(zero_act, stage.pp_axes, to="varying")
        out, (ck, cv) = run_ticks(stage, x_MBSD, zero_act, chunk, lambda _, new, r, valid: new, (ck, cv))
        out = out if every_position else out[:, :, -1, :]
        if axes.vocab_pp:  # every stage computes its share of the logits on the last stage's outputs
            logits = model.logits(lax.psum(out, "pp"), dtype, axes)  # [M, B/M, (S,) V]
        else:
            logits = model.logits(out, dtype, axes)
            if stage.pp_axes:
                logits = lax.psum(jnp.where(stage.last, logits, 0.0), stage.pp_axes)
        return logits, ck, cv

    cspec = cache_specs(cfg, sizes)
    logits_spec = logical_to_mesh(("microbatch", "batch", None, None)[: 4 if every_position else 3], sizes)
    f = jax.shard_map(
        body,
        mesh=sm.mesh,
        in_specs=(sm.param_specs, sm.rest_specs, cspec, cspec, tokens_spec(sizes), P()),
        out_specs=(logits_spec, cspec, cspec),
        check_vma=True,
    )
    return jax.jit(f, donate_argnums=(2, 3))


@dataclasses.dataclass(frozen=True)
class _Cache:
    """Blocks run with their KV cache entries at position `pos` (inside the serving shard_map)."""

    pos: Any
    axes: Axes
    dtype: Any

    def cached(self, graph, state, layer, mb_j, x, ck_, cv_, valid):
        """The block at index `layer` of a stack (weights `state`) on microbatch mb_j, with its cache entries."""
        blk = nnx.merge(graph, jax.tree.map(lambda a: a[layer], state))
        index = (*layer, mb_j)
        k_old, v_old = ck_[index], cv_[index]
        y, k_new, v_new = block_cached(blk, x, k_old, v_old, self.pos, self.axes, self.dtype)
        return (
            y,
            ck_.at[index].set(jnp.where(valid, k_new, k_old)),
            cv_.at[index].set(jnp.where(valid, v_new, v_old)),
        )

    def prologue(self, model, n: int, x_MBSD, ck, cv):
        """The n dense first layers on every microbatch: (x_MBSD, their k cache, their v cache)."""
        graph, state = nnx.split(model.prologue)

        def one(carry, j):
            x_MBSD, ck_, cv_ = carry
            x = x_MBSD[j]
            for i in range(n):
                x, ck_, cv_ = self.cached(graph, state, (i,), j, x, ck_, cv_, True)
            return (x_MBSD.at[j].set(x), ck_, cv_), None

        (x_MBSD, ck, cv), _ = lax.scan(one, (x_MBSD, ck, cv), jnp.arange(x_MBSD.shape[0]))
        return x_MBSD, ck, cv

    def unit_fn(self, stack: Stack, stage: Stage):
        """The scan body over a chunk's units: unit i on (x, caches, microbatch j, the tick's validity)."""
        moe_every = stage.model.moe_every

        def unit(carry, i):
            x_in, ck, cv, j, valid_tick = carry
            x = x_in
            # uneven stages (v = 1: i is the stage's own index): a padding unit writes no cache, passes its input on
            real = True if stage.n_units is None else i < stage.n_units
            valid = valid_tick & real
            ck, cv = dict(ck), dict(cv)
            if stack.dense is not None:
                graph, state = stack.dense
                for sub in range(moe_every - 1):
                    x, ck["dense_blocks"], cv["dense_blocks"] = self.cached(
                        graph, state, (i, sub), j, x, ck["dense_blocks"], cv["dense_blocks"], valid
                    )
            graph, state = stack.moe
            x, ck["blocks"], cv["blocks"] = self.cached(graph, state, (i,), j, x, ck["blocks"], cv["blocks"], valid)
            if stage.n_units is not None:
                x = jnp.where(real, x, x_in)
            return (x, ck, cv, j, valid_tick), None

        return unit
