"""One train step sharded and on one device, compared: loss, router terms, every gradient group, the gradient norm."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from moe_jax.config import Config
from moe_jax.parallel.sharded import ShardedModel, one_device_params, to_host
from moe_jax.parallel.step import grad_step, reference_grad_step

# Written-down tolerances: relative to each leaf's largest element (fp32 about 1e-5; bf16 / fp16 about 1e-2).
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-2}

# First match wins: the shared expert's and the dense layers' w_in / w_out are theirs, not the routed experts'.
GRAD_GROUPS = {
    "embedding": ("embed",),
    "head": ("head", "final_norm"),
    "attention": (
        "wq",
        "wk",
        "wv",
        "wo",
        "bq",
        "bk",
        "bv",
        "q_norm",
        "k_norm",
        "wq_a",
        "wq_b",
        "wkv_a",
        "wkv_b",
        "q_a_norm",
        "kv_a_norm",
    ),
    "norms": ("attn_norm", "ffn_norm"),
    "router": ("router",),
    "shared": ("shared",),
    "dense": ("mlp",),
    "experts": ("w_in", "w_gate", "w_out"),
}


def synthetic_batch(cfg: Config, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.model.vocab, (cfg.run.batch, cfg.run.seq_len + 1))
    return tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32)


def _group_of(path: tuple) -> str:
    names = [str(p) for p in path]
    for group, keys in GRAD_GROUPS.items():
        if any(n in keys for n in names):
            return group
    return "other"


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b)) if b.size else 0.0
    err = np.max(np.abs(a - b)) if a.size else 0.0
    return float(err / scale) if scale > 0 else float(err)


def compare(sharded, reference) -> dict[str, float]:
    """Largest relative error of the loss, each router term and each gradient group, and of the global grad norm."""
    (loss, met), grads = sharded
    (loss1, met1), grads1 = reference
    errors = {"loss": _rel(loss, loss1)}
    for k in ("ce", "lb_loss", "z_loss", "router_loss", "dropped"):
        errors[k] = _rel(met[k], met1[k])
    errors["tokens_per_expert"] = _rel(met["tokens_per_expert"], met1["tokens_per_expert"])
    flat = dict(nnx.to_flat_state(grads))
    flat1 = dict(nnx.to_flat_state(grads1))
    for path, g in flat.items():
        group = "grad/" + _group_of(path)
        errors[group] = max(errors.get(group, 0.0), _rel(g[...], flat1[path][...]))
    norm = np.sqrt(sum(np.sum(np.asarray(g[...], np.float64) ** 2) for g in flat.values()))
    norm1 = np.sqrt(sum(np.sum(np.asarray(g[...], np.float64) ** 2) for g in flat1.values()))
    errors["grad_norm"] = _rel(norm, norm1)
    return errors


def verify(cfg: Config, mesh, seed: int = 0, perturb: Callable | None = None, programs: bool = False) -> dict[str, Any]:
    """Runs the step both ways on the same weights and batch. `perturb` (for tests) edits the sharded gradients.
    `programs`: the sharded step is lowered and compiled explicitly and returned as result["programs"] = (lowered,
    compiled), so a caller can audit the very program that was checked without compiling it again."""
    sm = ShardedModel.build(cfg, mesh)
    # One set of weights for both runs: made on one device (the reference needs them whole anyway), then sharded.
    host_params, host_rest = one_device_params(cfg, seed)
    params, rest = sm.put(host_params, host_rest)
    tokens, targets = synthetic_batch(cfg, seed)
    with jax.set_mesh(mesh):
        args = (params, rest, *sm.put_batch(tokens, targets))
        if programs:
            lowered = grad_step(sm).lower(*args)
            compiled = lowered.compile()
            sharded = compiled(*args)
        else:
            sharded = grad_step(sm)(*args)
    (loss, met), grads = to_host(sharded)
    met["tokens_per_expert"] = met["tokens_per_expert"][sm.layer_order(inverse=True)]
    sharded = ((loss, met), sm.to_global(grads))
    if perturb is not None:
        sharded = perturb(sharded)
    reference = to_host(reference_grad_step(cfg, sm.global_graphdef)(host_params, host_rest, tokens, targets))
    errors = compare(sharded, reference)
    tol = TOLERANCE[cfg.run.dtype]
    out = {
        "tolerance": tol,
        "dtype": cfg.run.dtype,
        "loss": float(sharded[0][0]),
        "reference_loss": float(reference[0][0]),
        "dropped": float(sharded[0][1]["dropped"]),
        "routed": float(sharded[0][1]["routed"]),
        "errors": errors,
        "failed": sorted(k for k, v in errors.items() if not v <= tol),
        "ok": all(v <= tol for v in errors.values()),
    }
    if programs:
        out["programs"] = (lowered, compiled)
    return out


def perturb_one_gradient(eps: float):
    """Self-test of the check: adds eps x max|g| to one element of the first expert gradient of the sharded result."""

    def perturb(sharded):
        (loss, met), grads = sharded
        flat = dict(nnx.to_flat_state(grads))
        path = next(p for p in flat if "w_in" in map(str, p))
        g = flat[path][...].copy()
        g.flat[0] += eps * float(abs(g).max())
        flat[path][...] = g
        return (loss, met), grads

    return perturb
