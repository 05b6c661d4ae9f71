"""The decoder-only MoE transformer: embedding; optional dense first layers; scanned units of blocks (RMSNorm,
attention, residual; RMSNorm, FFN, residual), the FFN routed experts (plus a shared expert) or dense; final norm;
head. The same module runs on one device (`Axes()`) and as a shard inside shard_map.

The residual stream is fp32 (the branches compute in the compute dtype and add back in fp32): with fp16 compute a
16-layer residual in fp16 loses precision and can overflow, while everything that crosses the network (the branches'
inputs and outputs) stays in the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from moe_jax.config import Config, ConfigError, ModelConfig
from moe_jax.model.layers import MLP, Attention, LatentAttention, RMSNorm, compute_dtype, param
from moe_jax.model.moe import MoE
from moe_jax.sharding import Axes, state_names

ONE_DEVICE = Axes()


class Block(nnx.Module):
    """One layer: x + attention(norm(x)), then x + FFN(norm(x)). The FFN is the routed experts (plus the shared
    expert when model.shared_hidden > 0) in an MoE layer, or a dense FFN of width model.dense_hidden in a dense one."""

    def __init__(self, cfg: ModelConfig, kind: str = "moe", *, rngs: nnx.Rngs):
        out_std = cfg.init_std / math.sqrt(2 * cfg.layers)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = (LatentAttention if cfg.attention == "mla" else Attention)(cfg, out_std, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if kind == "moe":
            self.moe = MoE(cfg, out_std, rngs=rngs)
            if cfg.shared_hidden:
                self.shared = MLP(cfg, cfg.shared_hidden, out_std, cfg.shared_gate, rngs=rngs)
        else:
            self.mlp = MLP(cfg, cfg.dense_hidden, out_std, False, rngs=rngs)
        self.kind = kind

    def __call__(self, x_BSD, axes: Axes, dtype, groups: tuple[int, int] = (1, 1)):
        """x_BSD: the fp32 residual (local sequence slice). groups = (batch groups, sequence groups) for dispatch.
        Returns (x, router statistics); a dense layer has none."""
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), axes, dtype).astype(jnp.float32)
        h_BSD = self.ffn_norm(x_BSD)
        if self.kind != "moe":
            return x_BSD + self.mlp(h_BSD, axes, dtype), None
        y_GTD, stats = self.moe(to_groups(h_BSD, groups), axes, dtype)
        y_BSD = from_groups(y_GTD, x_BSD.shape, groups).astype(jnp.float32)
        if hasattr(self, "shared"):
            y_BSD = y_BSD + self.shared(h_BSD, axes, dtype)
        return x_BSD + y_BSD, stats


def block_cached(block: Block, x_BSD, cache_k, cache_v, pos, axes: Axes, dtype):
    """Serving: one block over the S new tokens with its KV cache; dropless routing. Returns (x, k, v)."""
    h, cache_k, cache_v = block.attn.cached(block.attn_norm(x_BSD), cache_k, cache_v, pos, axes, dtype)
    x_BSD = x_BSD + h.astype(jnp.float32)
    h_BSD = block.ffn_norm(x_BSD)
    if block.kind != "moe":
        return x_BSD + block.mlp(h_BSD, axes, dtype), cache_k, cache_v
    b, s, d = x_BSD.shape
    y, _ = block.moe(h_BSD.reshape(1, b * s, d), axes, dtype, dropless=True)
    y_BSD = y.reshape(b, s, d).astype(jnp.float32)
    if hasattr(block, "shared"):
        y_BSD = y_BSD + block.shared(h_BSD, axes, dtype)
    return x_BSD + y_BSD, cache_k, cache_v


def to_groups(x_BSD, groups: tuple[int, int]):
    """[B, S, D] -> [Gb x Gs, B/Gb x S/Gs, D]: contiguous blocks of rows and of the sequence, a dispatch group each."""
    gb, gs = groups
    b, s, d = x_BSD.shape
    x = x_BSD.reshape(gb, b // gb, gs, s // gs, d).transpose(0, 2, 1, 3, 4)
    return x.reshape(gb * gs, (b // gb) * (s // gs), d)


def from_groups(x_GTD, shape, groups: tuple[int, int]):
    gb, gs = groups
    b, s, d = shape
    x = x_GTD.reshape(gb, gs, b // gb, s // gs, d).transpose(0, 2, 1, 3, 4)
    return x.reshape(b, s, d)


def _stacked(n: int, axis_name: str, make):
    """n layers made by make(rngs), stacked on a leading axis carrying the logical name axis_name."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: axis_name})
    def make_all(rngs: nnx.Rngs):
        return make(rngs)

    return make_all


class Transformer(nnx.Module):
    """Embedding; the first model.dense_layers dense layers (`prologue`); the stack of units the pipeline splits,
    each moe_every - 1 dense layers (`dense_blocks`, [U, moe_every - 1]) then one MoE layer (`blocks`, [U]); final
    norm; head (the embedding's transpose when tied). Why a prologue and units: docs/design-notes.md."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        if cfg.dense_layers:
            self.prologue = _stacked(cfg.dense_layers, "prologue", lambda r: Block(cfg, "dense", rngs=r))(rngs)
        self.blocks = _stacked(cfg.units, "layers", lambda r: Block(cfg, "moe", rngs=r))(rngs)
        if cfg.moe_every > 1:
            dense = _stacked(cfg.moe_every - 1, "sublayers", lambda r: Block(cfg, "dense", rngs=r))
            self.dense_blocks = _stacked(cfg.units, "layers", dense)(rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.head = param(rngs, (cfg.d_model, cfg.vocab), ("embed", "vocab"), cfg.init_std)

    def embed_tokens(self, tokens_BS, axes: Axes = ONE_DEVICE):
        """[..., S] token ids -> [..., S, D] fp32 embeddings. Vocabulary split over tp: each rank looks its own rows
        up for every token of the whole sequence (training gathers the tp ranks' sequence slices first, int32), the
        other ranks' ids give zeros, and one sum over tp completes each row: reduce-scattered back to the sequence
        slices in training, all-reduced in serving (split over pp too: then summed over the stages). Exact: one term
        of each sum is non-zero."""
        table = self.embed[...]
        if axes.vocab is None:
            return jnp.take(table, tokens_BS, axis=0)
        ids = axes.gather_seq(tokens_BS, tokens_BS.ndim - 1)
        n = table.shape[0]
        local = ids - axes.vocab_start(n)
        mine = (local >= 0) & (local < n)
        x = jnp.where(mine[..., None], jnp.take(table, jnp.clip(local, 0, n - 1), axis=0), 0.0)
        return axes.sum_vocab_stages(axes.scatter_seq(x, x.ndim - 2))

    def local_logits(self, x_BSD, dtype):
        """fp32 logits of the vocabulary this device holds (all of it unless the vocabulary is split)."""
        return self._head(self.final_norm(x_BSD).astype(dtype), dtype)

    def _head(self, x, dtype):
        """The head (or the tied embedding's transpose) on normed inputs in the compute dtype: fp32 logits."""
        if self.cfg.tie_embeddings:
            return jnp.einsum("...D,VD->...V", x, self.embed[...].astype(dtype)).astype(jnp.float32)
        return jnp.einsum("...D,DV->...V", x, self.head[...].astype(dtype)).astype(jnp.float32)

    def logits(self, x_BSD, dtype, axes: Axes = ONE_DEVICE):
        """fp32 logits [..., V] (serving: the split vocabulary's columns gathered whole, the padding cut)."""
        return axes.gather_vocab(self.local_logits(x_BSD, dtype))

    def loss_sum(self, x_BSD, targets_BS, dtype, axes: Axes = ONE_DEVICE):
        """The summed cross-entropy of this device's tokens; `targets_BS` as `Axes.loss_targets` gives them.
        Vocabulary split over tp (Megatron-Core's vocabulary-parallel cross-entropy): the sequence slices are
        gathered whole over tp (the head's input, compute dtype), each rank computes the logits of its V / tp columns
        for every token, and the log-sum-exp and the target's logit come from one max and two sums over tp of [B, S]
        values: no [tokens, V] array is ever gathered. Each rank then sums its own sequence slice, so the token axes
        sum as before."""
        if axes.vocab is None:
            return cross_entropy(self.local_logits(x_BSD, dtype), targets_BS)
        seq, n = x_BSD.ndim - 2, x_BSD.shape[-2]
        logits = self._head(axes.gather_seq(self.final_norm(x_BSD).astype(dtype), seq), dtype)
        per_token = vocab_parallel_ce(logits, targets_BS, axes)
        if axes.tp is not None and axes.seq_parallel:
            per_token = lax.dynamic_slice_in_dim(per_token, lax.axis_index(axes.tp) * n, n, axis=-1)
        return jnp.sum(per_token)

    def __call__(self, tokens_BS, axes: Axes = ONE_DEVICE, dtype=jnp.float32, groups=(1, 1), remat: str = "layer"):
        """Returns (fp32 logits [B, S, V], per-MoE-layer router statistics stacked on a leading axis)."""
        x = run_prologue(self, self.embed_tokens(tokens_BS, axes), axes, dtype, remat)
        x, stats = run_blocks(self, x, axes, dtype, groups, remat)
        return self.logits(x, dtype, axes), stats


class Stack:
    """The pipelined stack split once into graphs and states; `unit(x, i)` runs unit i (its dense layers, then its
    MoE layer), picking the unit's weights inside, so a checkpoint around it saves the activation and the index, never
    a copy of the weights."""

    def __init__(self, model: Transformer):
        self.moe = nnx.split(model.blocks)
        self.dense = nnx.split(model.dense_blocks) if hasattr(model, "dense_blocks") else None

    def unit(self, x, i, axes: Axes, dtype, groups=(1, 1)):
        def take(state):
            return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), state)

        if self.dense is not None:
            graph, state = self.dense

            def dense_layer(x, layer_state):
                return nnx.merge(graph, layer_state)(x, axes, dtype)[0], None

            x, _ = jax.lax.scan(dense_layer, x, take(state))
        graph, state = self.moe
        return nnx.merge(graph, take(state))(x, axes, dtype, groups)


def run_prologue(model: Transformer, x, axes: Axes, dtype, remat: str = "layer"):
    """The first model.dense_layers dense layers (a scan; remat 'layer' rematerialises each)."""
    if not hasattr(model, "prologue"):
        return x
    graph, state = nnx.split(model.prologue)

    def body(x, layer_state):
        return nnx.merge(graph, layer_state)(x, axes, dtype)[0], None

    if remat == "layer":
        body = jax.checkpoint(body)
    return jax.lax.scan(body, x, state)[0]


def run_blocks(model: Transformer, x, axes: Axes, dtype, groups=(1, 1), remat: str = "layer"):
    """A scan over the stack's units; remat 'layer' rematerialises each unit's activations."""
    stack = Stack(model)

    def body(x, i):
        return stack.unit(x, i, axes, dtype, groups)

    if remat == "layer":
        body = jax.checkpoint(body)
    return jax.lax.scan(body, x, jnp.arange(model.cfg.units))


def vocab_parallel_ce(logits_BSV, targets_BS, axes: Axes):
    """Per-token cross-entropy [B, S] from logits split over the vocabulary ([B, S, V / tp] fp32 on each tp rank,
    the same tokens on all): log-sum-exp from the max over tp (no gradient: any constant gives the same value) and the
    sum over tp of the shifted exponentials, minus the target's logit (held by one rank, summed over tp). The stored
    vocabulary's padding columns (ids >= axes.vocab_size) are masked out: they get no probability and no gradient."""
    n = logits_BSV.shape[-1]
    start = axes.vocab_start(n)
    ids = start + jnp.arange(n)
    if axes.vocab_size:
        logits_BSV = jnp.where(ids < axes.vocab_size, logits_BSV, -jnp.inf)
    m = axes.vocab_max(lax.stop_gradient(jnp.max(logits_BSV, axis=-1)))
    sum_exp = axes.vocab_sum(jnp.sum(jnp.exp(logits_BSV - m[..., None]), axis=-1))
    local = targets_BS - start
    mine = (local >= 0) & (local < n)
    target = jnp.take_along_axis(logits_BSV, jnp.clip(local, 0, n - 1)[..., None], axis=-1)[..., 0]
    target = axes.vocab_sum(jnp.where(mine, target, 0.0))
    return jnp.log(sum_exp) + m - target


def cross_entropy(logits_BSV, targets_BS):
    """Summed next-token cross-entropy in fp32 (the caller divides by the global token count)."""
    logp = jax.nn.log_softmax(logits_BSV.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, targets_BS[..., None], axis=-1))


def aux_losses(cfg: ModelConfig, stats) -> dict[str, jax.Array]:
    """Router terms averaged over MoE layers, weighted as the config says."""
    lb = jnp.mean(stats["lb_loss"])
    z = jnp.mean(stats["z_loss"])
    return {"lb_loss": lb, "z_loss": z, "router_loss": cfg.lb_loss_weight * lb + cfg.z_loss_weight * z}


def loss_fn(
    model: Transformer, tokens_BS, targets_BS, dtype=jnp.float32, groups=(1, 1), remat="layer", microbatches: int = 1
):
    """One device: mean cross-entropy + weighted router terms. Returns (loss, metrics).

    The router terms are defined per microbatch (rows j B/M .. (j+1) B/M) and averaged over microbatches and layers:
    the load-balancing loss is not linear in the batch, and this is what a pipelined step computes."""
    b, s = tokens_BS.shape
    split = lambda x: x.reshape(microbatches, b // microbatches, s)  # noqa: E731  microbatch j: rows j B/M ..

    def one_microbatch(ce_sum, xs):  # a scan, not a Python loop: one copy of the model in the program, not M
        tokens, targets = xs
        logits, stats = model(tokens, ONE_DEVICE, dtype, groups, remat)
        return ce_sum + cross_entropy(logits, targets), stats

    ce_sum, stats = jax.lax.scan(one_microbatch, jnp.zeros((), jnp.float32), (split(tokens_BS), split(targets_BS)))
    ce = ce_sum / targets_BS.size  # stats: [M, L, ...]
    aux = aux_losses(model.cfg, stats)
    metrics = {
        "ce": ce,
        **aux,
        "dropped": jnp.sum(stats["dropped"]),
        "routed": jnp.sum(stats["routed"]),
        "tokens_per_expert": jnp.sum(stats["tokens_per_expert"], axis=0),
    }
    return ce + aux["router_loss"], metrics


def check_tokens(tokens, vocab: int, field: str = "tokens") -> np.ndarray:
    """Where data enters: token ids must be integers in [0, vocab). A bad id would index past the embedding and give
    silent garbage (JAX clamps gathers), so it is refused here with one line."""
    arr = np.asarray(tokens)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"{field}: dtype {arr.dtype} is not an integer type; token ids must be integers")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= vocab:
            bad = hi if hi >= vocab else lo
            raise ConfigError(
                f"{field}: token id {bad} is outside the vocabulary; valid ids: 0..{vocab - 1} (model.vocab={vocab})"
            )
    return arr


def init_model(cfg: Config | ModelConfig, seed: int = 0) -> Transformer:
    mcfg = cfg.model if isinstance(cfg, Config) else cfg
    return Transformer(mcfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: Config | ModelConfig) -> Transformer:
    """The model's shapes and logical names, nothing allocated."""
    mcfg = cfg.model if isinstance(cfg, Config) else cfg
    return nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0)))


__all__ = [
    "Block",
    "Transformer",
    "abstract_model",
    "aux_losses",
    "check_tokens",
    "compute_dtype",
    "cross_entropy",
    "init_model",
    "loss_fn",
    "run_blocks",
    "run_prologue",
    "Stack",
]


def param_table(cfg: Config | ModelConfig) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[int, ...]]]:
    """Every parameter's path -> its logical names and its global shape, from the abstract model (nothing allocated)."""
    _, params, _ = nnx.split(abstract_model(cfg), nnx.Param, ...)
    names = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(state_names(params))}
    shapes = {"/".join(map(str, k)): tuple(v.shape) for k, v in nnx.to_flat_state(params)}
    return names, shapes
