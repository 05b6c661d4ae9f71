"""RMSNorm, rotary embeddings and causal multi-head attention with sequence-parallel tensor parallelism.

Parameters are fp32; matmuls run in the compute dtype; norms and softmax in fp32. Inside shard_map the attention sees
its S / tp slice of the sequence, gathers the whole sequence over tp before the projections (heads are split over tp)
and reduce-scatters the output projection's partial sums back to S / tp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.config import LATENT_NORM_EPS, ConfigError, ModelConfig
from moe_jax.sharding import Axes

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}

# Query (and key) block of blockwise attention: a sequence longer than this that it divides is scored block by block.
ATTENTION_BLOCK = 512


def compute_dtype(name: str):
    return DTYPES[name]


def param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], std: float) -> nnx.Param:
    """A normal(std) fp32 parameter carrying its logical axis names."""
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), out_sharding=names)


class RMSNorm(nnx.Module):
    def __init__(self, d: int, eps: float, names: tuple[str, ...] = ("embed",)):
        self.scale = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=names)
        self.eps = eps

    def __call__(self, x_BSD):
        """Normalises in fp32 and returns fp32."""
        x = x_BSD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * self.scale[...]


def rms_norm_heads(x_BSHK, scale, eps: float, heads_total: int, axes: Axes | None):
    """RMSNorm of q or k in fp32. scale [K]: each head on its own (Qwen3). scale [H, K]: over the whole projection
    (OLMoE), whose statistics span all heads: with heads split over tp the local sums of squares are summed over tp
    (`axes`; None where this rank holds every head)."""
    x = x_BSHK.astype(jnp.float32)
    if scale.ndim == 1:
        ms = jnp.mean(x * x, axis=-1, keepdims=True)
    else:
        ss_BS = jnp.sum(x * x, axis=(-2, -1))
        if axes is not None:
            ss_BS = axes.sum_heads(ss_BS)
        ms = (ss_BS / (heads_total * x.shape[-1]))[..., None, None]
    return x * jax.lax.rsqrt(ms + eps) * scale


def rope(x_BSHK, positions_S, theta: float):
    """Rotary position embedding on the (first half, second half) pairs of the head dimension, computed in fp32."""
    k = x_BSHK.shape[-1]
    freq_K2 = theta ** (-jnp.arange(0, k // 2, dtype=jnp.float32) / (k // 2))
    angle_SK2 = positions_S.astype(jnp.float32)[:, None] * freq_K2[None, :]
    sin, cos = jnp.sin(angle_SK2)[None, :, None, :], jnp.cos(angle_SK2)[None, :, None, :]
    x = x_BSHK.astype(jnp.float32)
    x1, x2 = x[..., : k // 2], x[..., k // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BSHK.dtype)


def deinterleave(x):
    """DeepSeek's rotary layout, pairs (x0, x1), (x2, x3), ..., to ours, (first half, second half): the same rotation
    of the same pairs, so q . k is unchanged (transformers' apply_rotary_pos_emb_interleave does the same)."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def causal_attention(
    q_BQHK, k_BSGK, v_BSGK, q_offset: int = 0, block: int = ATTENTION_BLOCK, scale=None, skip: bool = False
):
    """Softmax(q k^T / sqrt(K)) v with a causal mask, scores and softmax in fp32. G = H / g K/V heads, each read by g
    consecutive query heads (grouped-query attention; G = H is multi-head, G = 1 multi-query). Values may be narrower
    or wider than K (latent attention); `scale` replaces 1 / sqrt(K).

    Queries are processed in blocks of `block` rows (each rematerialised in the backward pass), so memory holds
    [B, H, block, S] scores rather than [B, H, Q, S]: sequences of 10240 fit. Query i sits at position q_offset + i.
    `skip` (a whole sequence, q_offset 0): query block i scores only the keys up to its own end, skipping the key
    blocks the causal mask hides entirely (n(n+1)/2 of n^2 blocks: about half the score FLOPs at long sequences); the
    blocks then differ in shape, so they are an unrolled loop instead of one `lax.map` body (docs/benchmarks.md).
    """
    b, q_len, h, k = q_BQHK.shape
    s_len, kv, vk = k_BSGK.shape[1], k_BSGK.shape[2], v_BSGK.shape[-1]
    g = h // kv
    scale = 1.0 / jnp.sqrt(jnp.float32(k)) if scale is None else jnp.float32(scale)

    kv_pos_all = jnp.arange(s_len)

    def one_block(q_blk, start, k_BSGK, v_BSGK):
        kv_pos_S = kv_pos_all if k_BSGK.shape[1] == s_len else kv_pos_all[: k_BSGK.shape[1]]
        q_pos = q_offset + start + jnp.arange(q_blk.shape[1])
        mask_QS = kv_pos_S[None, :] <= q_pos[:, None]
        if g == 1:  # multi-head: no group axis (the grouped einsums' extra transposes cost a third more on XLA:CPU)
            scores = jnp.einsum("BQHK,BSHK->BHQS", q_blk, k_BSGK, preferred_element_type=jnp.float32) * scale
            scores = jnp.where(mask_QS[None, None], scores, -jnp.inf)
            probs_BHQS = jax.nn.softmax(scores, axis=-1).astype(v_BSGK.dtype)
            return jnp.einsum("BHQS,BSHK->BQHK", probs_BHQS, v_BSGK, preferred_element_type=jnp.float32)
        q_BQGgK = q_blk.reshape(b, q_blk.shape[1], kv, g, k)
        scores = jnp.einsum("BQGgK,BSGK->BGgQS", q_BQGgK, k_BSGK, preferred_element_type=jnp.float32) * scale
        scores = jnp.where(mask_QS[None, None, None], scores, -jnp.inf)
        probs_BGgQS = jax.nn.softmax(scores, axis=-1).astype(v_BSGK.dtype)
        out = jnp.einsum("BGgQS,BSGK->BQGgK", probs_BGgQS, v_BSGK, preferred_element_type=jnp.float32)
        return out.reshape(b, q_blk.shape[1], h, vk)

    if q_len <= block or q_len % block or not isinstance(q_offset, int):
        return one_block(q_BQHK, 0, k_BSGK, v_BSGK).astype(q_BQHK.dtype)
    blocks = q_len // block
    if skip and q_offset == 0 and s_len == q_len:
        outs = [
            jax.checkpoint(one_block, static_argnums=(1,))(
                q_BQHK[:, i * block : (i + 1) * block],
                i * block,
                k_BSGK[:, : (i + 1) * block],
                v_BSGK[:, : (i + 1) * block],
            )
            for i in range(blocks)
        ]
        return jnp.concatenate(outs, axis=1).astype(q_BQHK.dtype)
    q_NBQHK = q_BQHK.reshape(b, blocks, block, h, k).swapaxes(0, 1)

    def closed_block(q_blk, start):  # k and v closed over, not arguments: what the planner's memory model was fitted on
        return one_block(q_blk, start, k_BSGK, v_BSGK)

    out_NBQHK = jax.lax.map(lambda args: jax.checkpoint(closed_block)(*args), (q_NBQHK, jnp.arange(blocks) * block))
    return out_NBQHK.swapaxes(0, 1).reshape(b, q_len, h, vk).astype(q_BQHK.dtype)


def _block_pairs(n: int) -> tuple[jax.Array, jax.Array]:
    """The (query block, key block) pairs the causal mask does not hide entirely: j <= i, row by row; n(n+1)/2."""
    i, j = np.tril_indices(n)
    return jnp.asarray(i, jnp.int32), jnp.asarray(j, jnp.int32)


def _varying_zeros(shape, *like) -> jax.Array:
    """fp32 zeros varying over every mesh axis any of `like` varies over (inside shard_map): a scan's carry must keep
    its type through the body."""
    axes = set().union(*(jax.typeof(x).manual_axis_type.varying for x in like))
    z = jnp.zeros(shape, jnp.float32)
    return jax.lax.pcast(z, tuple(sorted(axes)), to="varying") if axes else z


def _pair_scores(q_blk, k_blk, diagonal, scale):
    """One pair's fp32 scores [B, G, g, Q, S] (queries grouped by the K/V head they read), the causal mask applied.
    The mask hides keys only on the diagonal (j == i), where it is the same lower triangle for every pair: a constant
    and a scalar per pair, not a mask per pair made from the pair's positions, which JAX's partial evaluation would
    save for every pair under remat (b h S^2 / 2 bytes: the scores' own memory back)."""
    s = jnp.einsum("BQGgK,BSGK->BGgQS", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
    n = s.shape[-1]
    lower = np.tril(np.ones((n, n), bool))
    return jnp.where(diagonal, jnp.where(lower, s, -jnp.inf), s)


def _flash_forward(q, k, v, block: int, scale):
    """Online softmax over the causal pairs (a scan of static length n(n+1)/2): fp32 running max, denominator and
    weighted values per query row, each pair reading and writing its query block's rows. Returns (output in q's dtype,
    log-sum-exp [B, G, g, Q] fp32)."""
    b, q_len, kv, g, kd = q.shape
    vd = v.shape[-1]
    take = functools.partial(jax.lax.dynamic_slice_in_dim, slice_size=block)

    def pair(carry, ij):
        m, den, acc = carry
        i, j = ij
        s = _pair_scores(take(q, i * block, axis=1), take(k, j * block, axis=1), i == j, scale)
        m_old, den_old, acc_old = (
            take(m, i * block, axis=-1),
            take(den, i * block, axis=-1),
            take(acc, i * block, axis=1),
        )
        m_new = jnp.maximum(m_old, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m_old - m_new)
        pv = jnp.einsum("BGgQS,BSGV->BQGgV", p.astype(v.dtype), take(v, j * block, axis=1),
                        preferred_element_type=jnp.float32)  # fmt: skip
        acc_new = acc_old * jnp.moveaxis(alpha, -1, 1)[..., None] + pv
        upd = jax.lax.dynamic_update_slice_in_dim
        return (upd(m, m_new, i * block, axis=-1), upd(den, den_old * alpha + jnp.sum(p, axis=-1), i * block, axis=-1),
                upd(acc, acc_new, i * block, axis=1)), None  # fmt: skip

    init = (_varying_zeros((b, kv, g, q_len), q, k, v) - jnp.inf, _varying_zeros((b, kv, g, q_len), q, k, v),
            _varying_zeros((b, q_len, kv, g, vd), q, k, v))  # fmt: skip
    (m, den, acc), _ = jax.lax.scan(pair, init, _block_pairs(q_len // block))
    out = acc / jnp.moveaxis(den, -1, 1)[..., None]
    return out.astype(q.dtype), m + jnp.log(den)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, block: int, scale: float):
    return _flash_forward(q, k, v, block, scale)[0]


def _flash_fwd(q, k, v, block, scale):
    out, lse = _flash_forward(q, k, v, block, scale)
    return out, (q, k, v, out, lse)


def _flash_bwd(block, scale, res, d_out):
    """Scores recomputed pair by pair from the saved log-sum-exp: dV += P^T dO, dS = P (dO V^T - rowsum(dO O)),
    dQ += dS K, dK += dS^T Q (times the scale), accumulated in fp32 over the same n(n+1)/2 pairs."""
    q, k, v, out, lse = res
    take = functools.partial(jax.lax.dynamic_slice_in_dim, slice_size=block)
    upd = jax.lax.dynamic_update_slice_in_dim
    rowsum = jnp.einsum("BQGgV,BQGgV->BGgQ", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def pair(carry, ij):
        dq, dk, dv = carry
        i, j = ij
        q_blk, k_blk, v_blk, do_blk = (take(x, n * block, axis=1) for x, n in ((q, i), (k, j), (v, j), (d_out, i)))
        s = _pair_scores(q_blk, k_blk, i == j, scale)
        p = jnp.exp(s - take(lse, i * block, axis=-1)[..., None])
        dv_j = jnp.einsum("BGgQS,BQGgV->BSGV", p.astype(d_out.dtype), do_blk, preferred_element_type=jnp.float32)
        dp = jnp.einsum("BQGgV,BSGV->BGgQS", do_blk, v_blk, preferred_element_type=jnp.float32)
        ds = (p * (dp - take(rowsum, i * block, axis=-1)[..., None]) * scale).astype(q.dtype)
        dq_i = jnp.einsum("BGgQS,BSGK->BQGgK", ds, k_blk, preferred_element_type=jnp.float32)
        dk_j = jnp.einsum("BGgQS,BQGgK->BSGK", ds, q_blk, preferred_element_type=jnp.float32)
        return (upd(dq, take(dq, i * block, axis=1) + dq_i, i * block, axis=1),
                upd(dk, take(dk, j * block, axis=1) + dk_j, j * block, axis=1),
                upd(dv, take(dv, j * block, axis=1) + dv_j, j * block, axis=1)), None  # fmt: skip

    init = tuple(_varying_zeros(x.shape, *res, d_out) for x in (q, k, v))
    (dq, dk, dv), _ = jax.lax.scan(pair, init, _block_pairs(q.shape[1] // block))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_BQHK, k_BSGK, v_BSGV, block: int = ATTENTION_BLOCK, scale=None):
    """Causal attention of a whole sequence in memory linear in it (FlashAttention's algorithm, in XLA): queries and
    keys in blocks of `block` rows, only the n(n+1)/2 block pairs the causal mask leaves (a scan of static length, so
    the HLO's trip counts and FLOPs are exact), an online softmax in fp32, and its own VJP that saves the output and
    the log-sum-exp per query row (not the scores) and recomputes each pair's scores in the backward. Grouped-query
    and latent (values narrower than keys, `scale`) as `causal_attention`. The sequence must be `block` or a multiple
    of it (`model.attention_block`; config.py checks)."""
    b, q_len, h, kd = q_BQHK.shape
    kv = k_BSGK.shape[2]
    block = min(block, q_len)
    if q_len % block or k_BSGK.shape[1] != q_len:
        raise ValueError(f"flash attention: sequence {q_len} (keys {k_BSGK.shape[1]}) is not a multiple of {block}")
    scale = 1.0 / float(kd) ** 0.5 if scale is None else float(scale)
    out = _flash(q_BQHK.reshape(b, q_len, kv, h // kv, kd), k_BSGK, v_BSGV, block, scale)
    return out.reshape(b, q_len, h, v_BSGV.shape[-1])


def attention_impl(impl: str) -> str:
    """The implementation `model.attention_impl` names on this process's backend: auto is cudnn on GPU, blockwise
    elsewhere; cudnn where there is no GPU is refused in one line."""
    backend = jax.default_backend()
    if impl == "auto":
        return "cudnn" if backend == "gpu" else "blockwise"
    if impl == "cudnn" and backend != "gpu":
        raise ConfigError(f"model.attention_impl='cudnn': cuDNN fused attention needs a GPU; this process runs on "
                          f"{backend}; valid here: auto, xla, blockwise, flash")  # fmt: skip
    return impl


def attend(q_BQHK, k_BSGK, v_BSGV, impl: str, scale=None, block: int = ATTENTION_BLOCK):
    """Causal attention of a whole sequence (training) by the chosen implementation. jax.nn.dot_product_attention
    needs values as wide as keys: latent attention's narrower values are padded with zeros and the output cut back."""
    impl = attention_impl(impl)
    if impl == "blockwise":
        return causal_attention(q_BQHK, k_BSGK, v_BSGV, block=block, scale=scale)
    if impl == "flash":
        return flash_attention(q_BQHK, k_BSGK, v_BSGV, block=block, scale=scale)
    vk, qk = v_BSGV.shape[-1], q_BQHK.shape[-1]
    v = v_BSGV if vk == qk else jnp.pad(v_BSGV, [(0, 0)] * 3 + [(0, qk - vk)])
    out = jax.nn.dot_product_attention(q_BQHK, k_BSGK, v, scale=scale, is_causal=True, implementation=impl)
    return out[..., :vk]


class Attention(nnx.Module):
    """Causal attention with RoPE: multi-head, grouped-query (kv_heads < heads) or multi-query; optional biases on
    q, k, v and optional RMSNorm of q and k (per head, or over the whole projection). Heads split over tp; K/V heads
    too where tp divides them, else each tp rank computes the one K/V head its query heads read from the whole K/V
    weights it holds (`kv_weights`).

    The output projection returns fp32 and its tp partial sums are reduce-scattered in fp32: a one-device matmul sums
    over all heads in fp32 and rounds once, and so does this. Rounding each partial sum to bf16 first changed the
    residual by an ulp, which flipped near-tie top-k routing choices and moved expert gradients by 17% (bf16, tp 2).
    """

    def __init__(self, cfg: ModelConfig, out_std: float, *, rngs: nnx.Rngs):
        d, h, kv, k, std = cfg.d_model, cfg.heads, cfg.n_kv_heads, cfg.head_dim, cfg.init_std
        self.wq = param(rngs, (d, h, k), ("embed", "heads", "head_dim"), std)
        self.wk = param(rngs, (d, kv, k), ("embed", "kv_heads", "head_dim"), std)
        self.wv = param(rngs, (d, kv, k), ("embed", "kv_heads", "head_dim"), std)
        self.wo = param(rngs, (h, k, d), ("heads", "head_dim", "embed"), out_std)
        if cfg.qkv_bias:
            self.bq = param(rngs, (h, k), ("heads", "head_dim"), std)
            self.bk = param(rngs, (kv, k), ("kv_heads", "head_dim"), std)
            self.bv = param(rngs, (kv, k), ("kv_heads", "head_dim"), std)
        if cfg.qk_norm != "none":
            q_shape, k_shape = ((k,), (k,)) if cfg.qk_norm == "head" else ((h, k), (kv, k))
            q_names, k_names = (
                (("head_dim",), ("head_dim",)) if cfg.qk_norm == "head" else
                (("heads", "head_dim"), ("kv_heads", "head_dim"))
            )  # fmt: skip
            self.q_norm = nnx.Param(jnp.ones(q_shape, jnp.float32), out_sharding=q_names)
            self.k_norm = nnx.Param(jnp.ones(k_shape, jnp.float32), out_sharding=k_names)
        self.heads, self.kv_heads, self.theta, self.eps = h, kv, cfg.rope_theta, cfg.norm_eps
        self.qkv_bias, self.qk_norm, self.impl = cfg.qkv_bias, cfg.qk_norm, cfg.attention_impl
        self.block = cfg.attention_block

    def kv_replicated(self) -> bool:
        """This rank holds every K/V head but not every query head: tp > kv_heads, K/V weights whole on each rank."""
        return self.wk.shape[1] == self.kv_heads and self.wq.shape[1] < self.heads

    def select_kv(self, x, axis: int, axes: Axes):
        """Where K/V heads are whole on every tp rank, the one this rank's H / tp query heads read: head
        (rank x H / tp) // (H / kv_heads), kept as an axis of size 1."""
        head = (axes.tp_index() * self.wq.shape[1]) // (self.heads // self.kv_heads)
        return jax.lax.dynamic_slice_in_dim(x, head, 1, axis=axis)

    def qkv(self, x_BSD, positions_S, axes: Axes, dtype):
        x = x_BSD.astype(dtype)
        wk, wv = self.wk[...], self.wv[...]
        bk, bv = (self.bk[...], self.bv[...]) if self.qkv_bias else (None, None)
        replicated = self.kv_replicated()
        # With QK-norm over the projection every K/V head is computed (the norm's statistics span them all) and this
        # rank's head is picked after the norm; otherwise only that head is computed.
        pick_first = replicated and self.qk_norm != "projection"
        if pick_first:
            wk, wv = self.select_kv(wk, 1, axes), self.select_kv(wv, 1, axes)
            bk, bv = (None, None) if bk is None else (self.select_kv(bk, 0, axes), self.select_kv(bv, 0, axes))
        q = jnp.einsum("BSD,DHK->BSHK", x, self.wq[...].astype(dtype))
        k = jnp.einsum("BSD,DGK->BSGK", x, wk.astype(dtype))
        v = jnp.einsum("BSD,DGK->BSGK", x, wv.astype(dtype))
        if self.qkv_bias:
            q, k, v = q + self.bq[...].astype(dtype), k + bk.astype(dtype), v + bv.astype(dtype)
        if self.qk_norm != "none":
            q = rms_norm_heads(q, self.q_norm[...], self.eps, self.heads, axes).astype(dtype)
            k = rms_norm_heads(k, self.k_norm[...], self.eps, self.kv_heads, None if replicated else axes)
            k = k.astype(dtype)
        if replicated and not pick_first:
            k, v = self.select_kv(k, 2, axes), self.select_kv(v, 2, axes)
        return rope(q, positions_S, self.theta), rope(k, positions_S, self.theta), v

    def out(self, o_BSHK, dtype):
        """fp32 output: with heads split over tp these are partial sums, reduced in fp32 (see `Attention`)."""
        return jnp.einsum("BSHK,HKD->BSD", o_BSHK, self.wo[...].astype(dtype), preferred_element_type=jnp.float32)

    def cached(self, x_BSD, cache_k_BTGK, cache_v_BTGK, pos, axes: Axes, dtype):
        """Serving: the S new tokens at positions pos .. pos + S - 1 attend to the cache and themselves. Writes their
        keys and values into the [B, T_max, G, K] caches (G: this rank's K/V heads); returns (fp32 update, new k
        cache, new v cache)."""
        x = x_BSD.astype(dtype)
        positions_S = pos + jnp.arange(x.shape[1])
        q, k, v = self.qkv(x, positions_S, axes, dtype)
        cache_k_BTGK = jax.lax.dynamic_update_slice_in_dim(cache_k_BTGK, k.astype(cache_k_BTGK.dtype), pos, axis=1)
        cache_v_BTGK = jax.lax.dynamic_update_slice_in_dim(cache_v_BTGK, v.astype(cache_v_BTGK.dtype), pos, axis=1)
        o = causal_attention(q, cache_k_BTGK.astype(dtype), cache_v_BTGK.astype(dtype), q_offset=pos)
        return axes.scatter_seq(self.out(o, dtype), axis=1), cache_k_BTGK, cache_v_BTGK

    def __call__(self, x_BSD, axes: Axes, dtype):
        """x_BSD: normed fp32 input, the local S / tp slice of the sequence. Returns the compute-dtype update, same
        shape; its tp partial sums are reduce-scattered back to S / tp."""
        x_full = axes.gather_seq(x_BSD.astype(dtype), axis=1)
        positions_S = jnp.arange(x_full.shape[1])
        q, k, v = self.qkv(x_full, positions_S, axes, dtype)
        o = attend(q, k, v, self.impl, block=self.block)
        return axes.scatter_seq(self.out(o, dtype), axis=1)  # fp32


class LatentAttention(nnx.Module):
    """Multi-head latent attention (DeepSeek-V2/V3). Queries: x W_q, or through a rank-q_lora_rank projection, its
    RMSNorm and W_q_b. Keys and values: one shared latent c = RMSNorm(x W_kv_a[:, :r]) of kv_lora_rank, expanded per
    head by W_kv_b into a no-RoPE key part (qk_nope_head_dim) and a value (v_head_dim), plus one RoPE key part
    (qk_rope_head_dim, from x W_kv_a[:, r:]) shared by every head. Scores at 1 / sqrt(nope + rope). Heads split over
    tp; the latent's projections are whole on every tp rank (each computes the latent its heads read).

    Serving caches the latent and the RoPE key (kv_lora_rank + qk_rope_head_dim per token and layer), not K and V,
    and attends in the latent space: q_nope W_kb^T against the cached latent, the weighted latents times W_vb (the
    "absorbed" form; the same sums in another order)."""

    def __init__(self, cfg: ModelConfig, out_std: float, *, rngs: nnx.Rngs):
        d, h, std = cfg.d_model, cfg.heads, cfg.init_std
        nope, rope_d, vd = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        r_q, r_kv = cfg.q_lora_rank, cfg.kv_lora_rank
        if r_q:
            self.wq_a = param(rngs, (d, r_q), ("embed", "q_lora"), std)
            self.q_a_norm = RMSNorm(r_q, LATENT_NORM_EPS, ("q_lora",))
            self.wq_b = param(rngs, (r_q, h, nope + rope_d), ("q_lora", "heads", "head_dim"), std)
        else:
            self.wq = param(rngs, (d, h, nope + rope_d), ("embed", "heads", "head_dim"), std)
        self.wkv_a = param(rngs, (d, r_kv + rope_d), ("embed", "kv_lora"), std)
        self.kv_a_norm = RMSNorm(r_kv, LATENT_NORM_EPS, ("kv_lora",))
        self.wkv_b = param(rngs, (r_kv, h, nope + vd), ("kv_lora", "heads", "head_dim"), std)
        self.wo = param(rngs, (h, vd, d), ("heads", "head_dim", "embed"), out_std)
        self.nope, self.rope_dim, self.rank, self.theta = nope, rope_d, r_kv, cfg.rope_theta
        self.impl, self.block = cfg.attention_impl, cfg.attention_block
        self.scale = 1.0 / float(nope + rope_d) ** 0.5

    def queries(self, x_BSD, positions_S, dtype):
        """(q_nope [B, S, H, N], roped q_rope [B, S, H, P]) over this rank's heads."""
        if hasattr(self, "wq_a"):
            q_lat = jnp.einsum("BSD,DR->BSR", x_BSD, self.wq_a[...].astype(dtype))
            q = jnp.einsum("BSR,RHK->BSHK", self.q_a_norm(q_lat).astype(dtype), self.wq_b[...].astype(dtype))
        else:
            q = jnp.einsum("BSD,DHK->BSHK", x_BSD, self.wq[...].astype(dtype))
        return q[..., : self.nope], rope(deinterleave(q[..., self.nope :]), positions_S, self.theta)

    def latent(self, x_BSD, positions_S, dtype):
        """(normed latent c [B, S, R], roped shared key [B, S, P]): what serving caches."""
        ckv = jnp.einsum("BSD,DR->BSR", x_BSD, self.wkv_a[...].astype(dtype))
        c = self.kv_a_norm(ckv[..., : self.rank]).astype(dtype)
        k_rope = rope(deinterleave(ckv[..., self.rank :])[:, :, None, :], positions_S, self.theta)[:, :, 0, :]
        return c, k_rope

    def out(self, o_BSHV, dtype):
        """fp32 output (tp partial sums reduced in fp32, as `Attention.out`)."""
        return jnp.einsum("BSHV,HVD->BSD", o_BSHV, self.wo[...].astype(dtype), preferred_element_type=jnp.float32)

    def __call__(self, x_BSD, axes: Axes, dtype):
        """Training: as `Attention.__call__` (the sequence gathered over tp, the output reduce-scattered)."""
        x_full = axes.gather_seq(x_BSD.astype(dtype), axis=1)
        positions_S = jnp.arange(x_full.shape[1])
        q_nope, q_rope = self.queries(x_full, positions_S, dtype)
        c, k_rope = self.latent(x_full, positions_S, dtype)
        kv = jnp.einsum("BSR,RHK->BSHK", c, self.wkv_b[...].astype(dtype))
        k_nope, v = kv[..., : self.nope], kv[..., self.nope :]
        k_rope_BSHP = jnp.broadcast_to(k_rope[:, :, None, :], (*k_nope.shape[:3], self.rope_dim))
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        k = jnp.concatenate([k_nope, k_rope_BSHP], axis=-1)
        o = attend(q, k, v, self.impl, scale=self.scale, block=self.block)
        return axes.scatter_seq(self.out(o, dtype), axis=1)

    def cached(self, x_BSD, cache_c_BT1R, cache_r_BT1P, pos, axes: Axes, dtype):
        """Serving: writes the S new tokens' latents and RoPE keys into the [B, T_max, 1, R] and [B, T_max, 1, P]
        caches (whole on every tp rank) and attends in the latent space. Returns (fp32 update, caches)."""
        x = x_BSD.astype(dtype)
        positions_S = pos + jnp.arange(x.shape[1])
        q_nope, q_rope = self.queries(x, positions_S, dtype)
        c, k_rope = self.latent(x, positions_S, dtype)
        upd = jax.lax.dynamic_update_slice_in_dim
        cache_c_BT1R = upd(cache_c_BT1R, c[:, :, None].astype(cache_c_BT1R.dtype), pos, axis=1)
        cache_r_BT1P = upd(cache_r_BT1P, k_rope[:, :, None].astype(cache_r_BT1P.dtype), pos, axis=1)
        w = self.wkv_b[...].astype(dtype)
        q_lat = jnp.einsum("BSHN,RHN->BSHR", q_nope, w[..., : self.nope])
        c_all = cache_c_BT1R.astype(dtype)
        keys = jnp.concatenate([c_all, cache_r_BT1P.astype(dtype)], axis=-1)
        o_lat = causal_attention(jnp.concatenate([q_lat, q_rope], axis=-1), keys, c_all, q_offset=pos,
                                 scale=self.scale)  # fmt: skip
        o = jnp.einsum("BSHR,RHV->BSHV", o_lat, w[..., self.nope :])
        return axes.scatter_seq(self.out(o, dtype), axis=1), cache_c_BT1R, cache_r_BT1P


class MLP(nnx.Module):
    """A dense FFN of its own width: a dense layer's FFN, or the shared expert beside the routed ones (optionally
    times sigmoid(x . w_gate_out), Qwen2-MoE). Its hidden dimension is split over tp like an expert's."""

    def __init__(self, cfg: ModelConfig, hidden: int, out_std: float, gated_output: bool, *, rngs: nnx.Rngs):
        d, std = cfg.d_model, cfg.init_std
        self.w_in = param(rngs, (d, hidden), ("embed", "mlp"), std)
        self.w_gate = param(rngs, (d, hidden), ("embed", "mlp"), std) if cfg.ffn == "swiglu" else None
        self.w_out = param(rngs, (hidden, d), ("mlp", "embed"), out_std)
        self.output_gate = param(rngs, (d,), ("embed",), std) if gated_output else None

    def __call__(self, x_BSD, axes: Axes, dtype):
        """x_BSD: normed fp32, the local sequence slice. Returns fp32, same shape (tp partial sums reduce-scattered)."""
        b, s, d = x_BSD.shape
        x_full = axes.gather_seq(x_BSD.astype(dtype), axis=1)
        w_gate = None if self.w_gate is None else self.w_gate[...][None]
        y = expert_ffn(x_full.reshape(1, -1, d), self.w_in[...][None], w_gate, self.w_out[...][None], dtype)
        y_BSD = axes.scatter_seq(y.reshape(b, x_full.shape[1], d), axis=1)
        if self.output_gate is not None:
            y_BSD = y_BSD * jax.nn.sigmoid(jnp.einsum("BSD,D->BS", x_BSD, self.output_gate[...]))[..., None]
        return y_BSD


def ffn(matmul, x, w_in, w_gate, w_out, dtype):
    """GELU(x W_in) W_out, or SwiGLU with W_gate, each product `matmul(x, w)`; fp32 out."""
    h = matmul(x, w_in.astype(dtype))
    if w_gate is None:
        h = jax.nn.gelu(h)
    else:
        h = jax.nn.silu(matmul(x, w_gate.astype(dtype))) * h
    return matmul(h, w_out.astype(dtype), preferred_element_type=jnp.float32)


def expert_ffn(x_ECD, w_in_EDF, w_gate_EDF, w_out_EFD, dtype):
    """Each expert's FFN on its buffer: GELU(x W_in) W_out, or SwiGLU with W_gate. Batched over local experts.

    Returns fp32: with the hidden dimension split over tp these are partial sums, reduced in fp32 like attention's."""

    def batched(a, w, **kw):  # [E, C, I] x [E, I, O] -> [E, C, O]
        return jnp.einsum("ECI,EIO->ECO", a, w, **kw)

    return ffn(batched, x_ECD, w_in_EDF, w_gate_EDF, w_out_EFD, dtype)
