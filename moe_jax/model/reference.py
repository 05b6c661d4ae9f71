"""Naive references for the tests: a plain loop over experts, each taking its tokens by mask, and an independent
count of which routed choices overflow capacity. Slow on purpose; nothing here is used by the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.model.moe import expert_ffn


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


def naive_moe(x_TD, experts_TR, gates_TR, keep_TR, w_in_EDF, w_gate_EDF, w_out_EFD, dtype=jnp.float32):
    """sum over experts e of (gate of e where chosen and kept) x FFN_e(x), each expert on every token, masked."""
    y = jnp.zeros(x_TD.shape, jnp.float32)
    for e in range(w_in_EDF.shape[0]):
        chosen_TR = (experts_TR == e) & keep_TR
        weight_T = jnp.sum(jnp.where(chosen_TR, gates_TR, 0.0), axis=-1)
        out = expert_ffn(
            x_TD[None].astype(dtype),
            w_in_EDF[e : e + 1],
            None if w_gate_EDF is None else w_gate_EDF[e : e + 1],
            w_out_EFD[e : e + 1],
            dtype,
        )[0]
        y = y + weight_T[:, None] * out.astype(jnp.float32)
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
