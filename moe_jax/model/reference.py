"""Naive references for the tests: a plain loop over experts, each taking its tokens by mask, and an independent
count of which routed choices overflow capacity. Slow on purpose; nothing here is used by the model."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def overflow_mask(experts_TR: np.ndarray, num_experts: int, cap: int) -> np.ndarray:
    """True where a (token, choice) is kept: visit top-1 choices of every token first, then top-2, ..., in token
    order, and keep a choice while its expert has fewer than `cap` tokens."""
    experts_TR = np.asarray(experts_TR)
    t, r = experts_TR.shape
    keep = np.zeros((t, r), dtype=bool)
    filled = np.zeros(num_experts, dtype=int)
    for slot in range(r):
        for tok in range(t):
            e = experts_TR[tok, slot]
            if filled[e] < cap:
                keep[tok, slot] = True
                filled[e] += 1
    return keep


def gelu_tanh(x):
    """GELU in its tanh form, written out (jax.nn.gelu's default, which the model uses):
    x / 2 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def naive_ffn(x_TD, w_in_DF, w_gate_DF, w_out_FD, dtype=jnp.float32):
    """One expert's FFN on every token, written out with plain matmuls (not the model's code): GELU(x W_in) W_out, or
    SwiGLU: (silu(x W_gate) * x W_in) W_out, silu(z) = z / (1 + exp(-z)). fp32 out."""
    x = x_TD.astype(dtype)
    h = jnp.matmul(x, w_in_DF.astype(dtype))
    if w_gate_DF is None:
        h = gelu_tanh(h)
    else:
        z = jnp.matmul(x, w_gate_DF.astype(dtype))
        h = z / (1.0 + jnp.exp(-z)) * h
    return jnp.matmul(h, w_out_FD.astype(dtype), preferred_element_type=jnp.float32)


def naive_moe(x_TD, experts_TR, gates_TR, keep_TR, w_in_EDF, w_gate_EDF, w_out_EFD, dtype=jnp.float32):
    """sum over experts e of (gate of e where chosen and kept) x FFN_e(x), each expert on every token, masked."""
    y = jnp.zeros(x_TD.shape, jnp.float32)
    for e in range(w_in_EDF.shape[0]):
        chosen_TR = (experts_TR == e) & keep_TR
        weight_T = jnp.sum(jnp.where(chosen_TR, gates_TR, 0.0), axis=-1)
        w_gate = None if w_gate_EDF is None else w_gate_EDF[e]
        out = naive_ffn(x_TD, w_in_EDF[e], w_gate, w_out_EFD[e], dtype)
        y = y + weight_T[:, None] * out
    return y


def naive_router_losses(logits_TE, experts_TR, num_experts: int):
    """Switch load-balancing loss E sum_e f_e P_e and the z-loss mean(logsumexp^2), written out plainly."""
    probs = jax.nn.softmax(logits_TE, axis=-1)
    t, k = experts_TR.shape
    f = np.zeros(num_experts)
    for e in np.asarray(experts_TR).reshape(-1):
        f[e] += 1.0 / (t * k)
    p = np.asarray(jnp.mean(probs, axis=0))
    z = float(jnp.mean(jax.nn.logsumexp(logits_TE, axis=-1) ** 2))
    return float(num_experts * np.sum(f * p)), z
