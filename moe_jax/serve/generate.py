"""Generation: prefill the prompt, then decode one token at a time, sampling greedily or with temperature and top-k."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import ConfigError
from moe_jax.serve.step import ServeModel


def sample(logits_BV: np.ndarray, rng: np.random.Generator, temperature: float = 0.0, top_k: int = 0) -> np.ndarray:
    """Greedy when temperature is 0; else softmax(logits / temperature) over the top_k largest (all if 0)."""
    if temperature < 0:
        raise ConfigError(f"--temperature={temperature}: must be >= 0 (0 is greedy)")
    if temperature == 0:
        return np.argmax(logits_BV, axis=-1).astype(np.int32)
    z = logits_BV.astype(np.float64) / temperature
    if top_k:
        if not 0 < top_k <= z.shape[-1]:
            raise ConfigError(f"--top-k={top_k}: valid 1..{z.shape[-1]} (0 keeps every token)")
        cut = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in p], dtype=np.int32)


def check_lengths(prompt_len: int, max_new: int, max_len: int) -> None:
    if max_new < 1:
        raise ConfigError(f"--max-new={max_new}: must be a positive integer")
    if prompt_len + max_new > max_len:
        raise ConfigError(
            f"prompt length {prompt_len} + --max-new {max_new} = {prompt_len + max_new}: longer than the maximum "
            f"sequence {max_len} (model.max_seq_len)"
        )


def generate(
    srv: ServeModel,
    params,
    rest,
    prompts_BP: np.ndarray,
    max_new: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    every_position: bool = False,
) -> tuple[np.ndarray, dict]:
    """Returns (new tokens [B, max_new], timings). One prefill of the prompt, then max_new - 1 decode steps.
    every_position: the steps return the logits of every new position, and timings["logits"] holds them all,
    [B, P + max_new - 1, V] (what a check against another implementation's forward compares)."""
    b, p = prompts_BP.shape
    check_lengths(p, max_new, srv.max_len)
    rng = np.random.default_rng(seed)
    step = srv.step_fn(every_position)
    ck, cv = srv.init_cache()
    out = np.zeros((b, max_new), np.int32)
    kept = []

    def next_tokens(logits):
        x = srv.logits_to_host(logits)
        if every_position:
            kept.append(x)
            x = x[:, -1]
        return sample(x, rng, temperature, top_k)

    with jax.set_mesh(srv.sm.mesh):
        t0 = time.perf_counter()
        logits, ck, cv = step(params, rest, ck, cv, srv.put_tokens(prompts_BP), jnp.int32(0))
        out[:, 0] = next_tokens(logits)
        t1 = t2 = time.perf_counter()
        for n in range(1, max_new):
            logits, ck, cv = step(params, rest, ck, cv, srv.put_tokens(out[:, n - 1 : n]), jnp.int32(p + n - 1))
            out[:, n] = next_tokens(logits)
            if n == 1:  # the first decode step compiles the one-token step: time the rest
                t2 = time.perf_counter()
        t3 = time.perf_counter()
    timed = max_new - 2
    info = {
        "prefill_s": t1 - t0,
        "first_decode_s": t2 - t1,
        "decode_steps": max_new - 1,
        "decode_tokens_per_s": b * timed / (t3 - t2) if timed > 0 else 0.0,
    }
    if every_position:
        info["logits"] = np.concatenate(kept, axis=1)
    return out, info


def continue_sequences(srv: ServeModel, params, rest, tokens_BS: np.ndarray, prompt_len: int):
    """Greedy continuation of every row's first `prompt_len` tokens to the row's length, against the row itself:
    returns (generated [B, S - P], right [B, S - P] bool). How the demo shows the trained model doing its task."""
    tokens_BS = np.asarray(tokens_BS)
    new, _ = generate(srv, params, rest, tokens_BS[:, :prompt_len], tokens_BS.shape[1] - prompt_len)
    return new, new == tokens_BS[:, prompt_len:]
