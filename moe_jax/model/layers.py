"""RMSNorm, rotary embeddings and causal multi-head attention with sequence-parallel tensor parallelism.

Parameters are fp32; matmuls run in the compute dtype; norms and softmax in fp32. Inside shard_map the attention sees
its S / tp slice of the sequence, gathers the whole sequence over tp before the projections (heads are split over tp)
and reduce-scatters the output projection's partial sums back to S / tp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.sharding import Axes

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def compute_dtype(name: str):
    return DTYPES[name]


def param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], std: float) -> nnx.Param:
    """A normal(std) fp32 parameter carrying its logical axis names."""
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32), out_sharding=names)


class RMSNorm(nnx.Module):
    def __init__(self, d: int, eps: float):
        self.scale = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=("embed",))
        self.eps = eps

    def __call__(self, x_BSD):
        """Normalises in fp32 and returns fp32."""
        x = x_BSD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * self.scale[...]


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


def causal_attention(q_BQHK, k_BSHK, v_BSHK, q_offset: int = 0, block: int = 512):
    """Softmax(q k^T / sqrt(K)) v with a causal mask, scores and softmax in fp32.

    Queries are processed in blocks of `block` rows (each rematerialised in the backward pass), so memory holds
    [B, H, block, S] scores rather than [B, H, Q, S]: sequences of 10240 fit. Query i sits at position q_offset + i.
    """
    b, q_len, h, k = q_BQHK.shape
    s_len = k_BSHK.shape[1]
    scale = 1.0 / jnp.sqrt(jnp.float32(k))
    kv_pos_S = jnp.arange(s_len)

    def one_block(q_blk, start):
        scores_BHQS = jnp.einsum("BQHK,BSHK->BHQS", q_blk, k_BSHK, preferred_element_type=jnp.float32) * scale
        q_pos = q_offset + start + jnp.arange(q_blk.shape[1])
        mask_QS = kv_pos_S[None, :] <= q_pos[:, None]
        scores_BHQS = jnp.where(mask_QS[None, None], scores_BHQS, -jnp.inf)
        probs_BHQS = jax.nn.softmax(scores_BHQS, axis=-1).astype(v_BSHK.dtype)
        return jnp.einsum("BHQS,BSHK->BQHK", probs_BHQS, v_BSHK, preferred_element_type=jnp.float32)

    if q_len <= block or q_len % block or not isinstance(q_offset, int):
        return one_block(q_BQHK, 0).astype(q_BQHK.dtype)
    blocks = q_len // block
    q_NBQHK = q_BQHK.reshape(b, blocks, block, h, k).swapaxes(0, 1)
    out_NBQHK = jax.lax.map(lambda args: jax.checkpoint(one_block)(*args), (q_NBQHK, jnp.arange(blocks) * block))
    return out_NBQHK.swapaxes(0, 1).reshape(b, q_len, h, k).astype(q_BQHK.dtype)


class Attention(nnx.Module):
    """Causal multi-head attention with RoPE and no biases; heads split over tp.

    The output projection returns fp32 and its tp partial sums are reduce-scattered in fp32: a one-device matmul sums
    over all heads in fp32 and rounds once, and so does this. Rounding each partial sum to bf16 first changed the
    residual by an ulp, which flipped near-tie top-k routing choices and moved expert gradients by 17% (bf16, tp 2).
    """

    def __init__(self, d: int, heads: int, head_dim: int, theta: float, std: float, out_std: float, *, rngs: nnx.Rngs):
        self.wq = param(rngs, (d, heads, head_dim), ("embed", "heads", "head_dim"), std)
        self.wk = param(rngs, (d, heads, head_dim), ("embed", "heads", "head_dim"), std)
        self.wv = param(rngs, (d, heads, head_dim), ("embed", "heads", "head_dim"), std)
        self.wo = param(rngs, (heads, head_dim, d), ("heads", "head_dim", "embed"), out_std)
        self.theta = theta

    def qkv(self, x_BSD, positions_S, dtype):
        x = x_BSD.astype(dtype)
        q = jnp.einsum("BSD,DHK->BSHK", x, self.wq[...].astype(dtype))
        k = jnp.einsum("BSD,DHK->BSHK", x, self.wk[...].astype(dtype))
        v = jnp.einsum("BSD,DHK->BSHK", x, self.wv[...].astype(dtype))
        return rope(q, positions_S, self.theta), rope(k, positions_S, self.theta), v

    def out(self, o_BSHK, dtype):
        """fp32 output: with heads split over tp these are partial sums, reduced in fp32 (see `Attention`)."""
        return jnp.einsum("BSHK,HKD->BSD", o_BSHK, self.wo[...].astype(dtype), preferred_element_type=jnp.float32)

    def cached(self, x_BSD, cache_k_BTHK, cache_v_BTHK, pos, axes: Axes, dtype):
        """Serving: the S new tokens at positions pos .. pos + S - 1 attend to the cache and themselves. Writes their
        keys and values into the [B, T_max, H, K] caches; returns (fp32 update, new k cache, new v cache)."""
        x = x_BSD.astype(dtype)
        positions_S = pos + jnp.arange(x.shape[1])
        q, k, v = self.qkv(x, positions_S, dtype)
        cache_k_BTHK = jax.lax.dynamic_update_slice_in_dim(cache_k_BTHK, k.astype(cache_k_BTHK.dtype), pos, axis=1)
        cache_v_BTHK = jax.lax.dynamic_update_slice_in_dim(cache_v_BTHK, v.astype(cache_v_BTHK.dtype), pos, axis=1)
        o = causal_attention(q, cache_k_BTHK.astype(dtype), cache_v_BTHK.astype(dtype), q_offset=pos)
        return axes.scatter_seq(self.out(o, dtype), axis=1), cache_k_BTHK, cache_v_BTHK

    def __call__(self, x_BSD, axes: Axes, dtype):
        """x_BSD: normed fp32 input, the local S / tp slice of the sequence. Returns the compute-dtype update, same
        shape; its tp partial sums are reduce-scattered back to S / tp."""
        x_full = axes.gather_seq(x_BSD.astype(dtype), axis=1)
        positions_S = jnp.arange(x_full.shape[1])
        q, k, v = self.qkv(x_full, positions_S, dtype)
        o = causal_attention(q, k, v)
        return axes.scatter_seq(self.out(o, dtype), axis=1)  # fp32
