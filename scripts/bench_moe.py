"""Forward + backward of one MoE layer at the seed's width, against (a) a dense FFN doing the same active FLOPs (the
limit) and (b) the one-hot einsum dispatch of GShard / DeepSpeed-MoE (the baseline), in one run.

    python scripts/bench_moe.py [--tokens 8192] [--reps 5] [--dtypes fp32,bf16] [--json PATH]
    python scripts/bench_moe.py --dispatch --json docs/results/bench_moe_dispatch.json

`--dispatch`: capacity, dropless and ragged dispatch of the same layer (fp32, 1024 and 8192 tokens) beside the dense
FFN, and causal attention (batch 1, 16 heads of 64, fp32) blockwise with and without block skipping at 2048 and 10240.

Medians of `--reps` timed runs after one compile-and-warm-up run; ratios are of medians from this same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.config import ModelConfig
from moe_jax.model.layers import DTYPES, expert_ffn
from moe_jax.model.moe import MoE, capacity, route
from moe_jax.sharding import Axes


def onehot_moe(x_TD, router_DE, w_in, w_out, cfg: ModelConfig, dtype):
    """GShard-style dispatch: a [T, E, C] one-hot dispatch tensor and combine weights, applied by einsum. Same routing
    and capacity rule (top-1 before top-2, then token order) as the model, so it computes the same function."""
    t = x_TD.shape[0]
    e, k = cfg.experts, cfg.top_k
    cap = capacity(cfg, t)
    r = route(x_TD[None], router_DE, None, cfg)
    experts_TR, gates_TR = r.experts_GTR[0], r.gates_GTR[0]
    mask_RTE = jax.nn.one_hot(experts_TR.T, e, dtype=jnp.int32)  # choice-major priority
    pos_RTE = (jnp.cumsum(mask_RTE.reshape(k * t, e), axis=0).reshape(k, t, e) - 1) * mask_RTE
    keep_RTE = mask_RTE * (pos_RTE < cap)
    dispatch_TEC = jnp.einsum("RTE,RTEC->TEC", keep_RTE, jax.nn.one_hot(pos_RTE, cap, dtype=jnp.int32)).astype(dtype)
    combine_TEC = jnp.einsum("RT,RTE,RTEC->TEC", gates_TR.T, keep_RTE, jax.nn.one_hot(pos_RTE, cap)).astype(dtype)
    x_ECD = jnp.einsum("TEC,TD->ECD", dispatch_TEC, x_TD.astype(dtype))
    y_ECD = expert_ffn(x_ECD, w_in, None, w_out, dtype)
    return jnp.einsum("TEC,ECD->TD", combine_TEC, y_ECD)


def dense_ffn(x_TD, w_in_DF, w_out_FD, dtype):
    """One FFN of hidden k x F: the same multiply-adds per token as k experts of hidden F, with no routing."""
    h = jax.nn.gelu(jnp.einsum("TD,DF->TF", x_TD.astype(dtype), w_in_DF.astype(dtype)))
    return jnp.einsum("TF,FD->TD", h, w_out_FD.astype(dtype))


def timed(fn, args, reps: int) -> tuple[float, list[float]]:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def machine() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    dev = jax.devices()[0]
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def bench(dtype_name: str, tokens: int, reps: int, cf: float) -> dict:
    cfg = ModelConfig(dispatch="capacity", capacity_factor=cf)
    dtype = DTYPES[dtype_name]
    d, f, k = cfg.d_model, cfg.expert_hidden, cfg.top_k
    moe = MoE(cfg, out_std=0.02, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(moe)
    key = jax.random.key(1)
    x = jax.random.normal(key, (tokens, d), jnp.float32)
    cot = jax.random.normal(jax.random.key(2), (tokens, d), jnp.float32)
    w_dense_in = 0.02 * jax.random.normal(jax.random.key(3), (d, k * f))
    w_dense_out = 0.02 * jax.random.normal(jax.random.key(4), (k * f, d))

    def moe_loss(state, x):
        y, _ = nnx.merge(graphdef, state)(x[None], Axes(), dtype)
        return jnp.sum(y[0].astype(jnp.float32) * cot)

    def onehot_loss(state, x):
        y = onehot_moe(x, state["router"][...], state["w_in"][...], state["w_out"][...], cfg, dtype)
        return jnp.sum(y.astype(jnp.float32) * cot)

    def dense_loss(w, x):
        return jnp.sum(dense_ffn(x, w[0], w[1], dtype).astype(jnp.float32) * cot)

    grad = lambda fn: jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))  # noqa: E731
    moe_fn, onehot_fn, dense_fn = grad(moe_loss), grad(onehot_loss), grad(dense_loss)

    # The one-hot formulation computes the same function: check before timing.
    (l_moe, _), (l_hot, _) = moe_fn(state, x), onehot_fn(state, x)
    agree = abs(float(l_moe) - float(l_hot)) <= 2e-2 * abs(float(l_moe)) + 1e-3

    t_dense, _ = timed(dense_fn, ((w_dense_in, w_dense_out), x), reps)
    t_moe, _ = timed(moe_fn, (state, x), reps)
    t_hot, _ = timed(onehot_fn, (state, x), reps)
    cap = capacity(cfg, tokens)
    expert_flops = 3 * 2 * 2 * cfg.experts * cap * d * f  # fwd + bwd (x3), two matmuls, 2 flops per MAC
    return {
        "tokens": tokens,
        "capacity_factor": cf,
        "capacity": cap,
        "moe_ms": 1e3 * t_moe,
        "dense_ms": 1e3 * t_dense,
        "onehot_ms": 1e3 * t_hot,
        "moe_over_dense": t_moe / t_dense,
        "onehot_over_moe": t_hot / t_moe,
        "moe_expert_gflops_per_s": expert_flops / t_moe / 1e9,
        "onehot_dispatch_combine_flops": 3 * 2 * 2 * tokens * cfg.experts * cap * d,
        "same_loss": agree,
    }


def dispatch_compare(reps: int) -> dict:
    """The MoE layer's three dispatch modes and the dense FFN, forward + backward, fp32. Dropless and ragged run once,
    compile included (XLA:CPU computes dropless's 64 x T buffer rows, and lowers ragged_dot dense over the 64 groups:
    tens of seconds to minutes a run, or out of memory)."""
    from moe_jax.model.layers import causal_attention

    out: dict = {"moe": {}, "attention": {}}
    d, f, k = 1024, 2048, 2
    for tokens in (1024, 8192):
        x = jax.random.normal(jax.random.key(1), (tokens, d), jnp.float32)
        cot = jax.random.normal(jax.random.key(2), (tokens, d), jnp.float32)
        w = (
            0.02 * jax.random.normal(jax.random.key(3), (d, k * f)),
            0.02 * jax.random.normal(jax.random.key(4), (k * f, d)),
        )
        row = {"dense_ms": 1e3 * timed(jax.jit(jax.value_and_grad(
            lambda w, x, cot=cot: jnp.sum(dense_ffn(x, w[0], w[1], jnp.float32) * cot), argnums=(0, 1))), (w, x), reps)[0]}  # fmt: skip
        for dispatch in ("capacity", "dropless", "ragged"):
            cfg = ModelConfig(dispatch=dispatch)
            graphdef, state = nnx.split(MoE(cfg, out_std=0.02, rngs=nnx.Rngs(0)))

            def loss(state, x, graphdef=graphdef, cot=cot):
                y, _ = nnx.merge(graphdef, state)(x[None], Axes(), jnp.float32)
                return jnp.sum(y[0].astype(jnp.float32) * cot)

            fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
            if dispatch != "capacity":  # tens of seconds to minutes a run on this CPU: one run, compile included
                t0 = time.perf_counter()
                try:
                    jax.block_until_ready(fn(state, x))
                    row[f"{dispatch}_ms"] = 1e3 * (time.perf_counter() - t0)
                except jax.errors.JaxRuntimeError as e:  # XLA:CPU's dense ragged_dot at 8192 tokens: out of memory
                    row[f"{dispatch}_ms"], row[f"{dispatch}_error"] = None, str(e).splitlines()[0][:200]
                row[f"{dispatch}_reps"] = "1, compile included"
            else:
                row[f"{dispatch}_ms"], row[f"{dispatch}_reps"] = 1e3 * timed(fn, (state, x), reps)[0], reps
            print(f"moe {tokens} tokens {dispatch}: {row[f'{dispatch}_ms']} ms (dense {row['dense_ms']:.0f})",
                  flush=True)  # fmt: skip
        out["moe"][str(tokens)] = row
    for s in (2048, 10240):
        q, kk, v = (jax.random.normal(jax.random.key(i), (1, s, 16, 64), jnp.float32) for i in range(3))
        row = {}
        for name, skip in (("blockwise", False), ("blockwise_skip", True)):
            fn = jax.jit(jax.grad(lambda q, k, v, skip=skip: jnp.sum(causal_attention(q, k, v, skip=skip)),
                                  argnums=(0, 1, 2)))  # fmt: skip
            row[f"{name}_ms"] = 1e3 * timed(fn, (q, kk, v), reps)[0]
        row["skip_over_blockwise"] = row["blockwise_skip_ms"] / row["blockwise_ms"]
        print(f"attention {s}: {row}", flush=True)
        out["attention"][str(s)] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--json")
    p.add_argument("--dispatch", action="store_true", help="compare the dispatch modes and attention block skipping")
    args = p.parse_args()
    if args.dispatch:
        out = {"machine": machine(), "reps": args.reps, **dispatch_compare(args.reps)}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return
    out = {"machine": machine(), "what": "one MoE layer fwd+bwd: d 1024, F 2048, E 64, top-2"}
    for name in args.dtypes.split(","):
        r = bench(name, args.tokens, args.reps, args.capacity_factor)
        out[name] = r
        print(
            f"{name}: moe {r['moe_ms']:.0f} ms, dense {r['dense_ms']:.0f} ms, one-hot {r['onehot_ms']:.0f} ms | "
            f"moe/dense {r['moe_over_dense']:.2f}, one-hot/moe {r['onehot_over_moe']:.2f} "
            f"(capacity {r['capacity']}, same loss: {r['same_loss']})",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    assert math.isfinite(out[args.dtypes.split(",")[0]]["moe_ms"])


if __name__ == "__main__":
    main()
