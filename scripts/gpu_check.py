"""The accelerator check: ONE prepared script, run once on a single GPU from the source tree with the packages the
machine has (nothing downloaded, nothing installed):

    PYTHONPATH=. python scripts/gpu_check.py --out docs/results/gpu_check_<chip>.json      (under 8 minutes)
    python scripts/gpu_check.py --cpu-smoke --out /tmp/smoke.json    (every part at tiny sizes on CPU, same keys)

It writes one JSON (KEYS below), each part guarded so a failure is recorded and the rest still runs:
- `dense_matmul`: a dense bf16 FFN forward + backward of the same FLOPs as the MoE layer's useful expert work.
- `moe_layer`: the MoE layer forward + backward in bf16 at the seed's sizes (d 1024, F 2048, 64 experts, top-2) at
  8192 and 32768 tokens for capacity, dropless-padded and ragged dispatch: TFLOP/s of useful expert FLOPs
  (6 x 2 x 2 x k T d F: forward and backward, two matrices) and the ratio to the dense matmul's TFLOP/s.
- `attention`: causal attention forward + backward (batch 1, 16 heads of 64, bf16) at sequence 2048 and 10240 for each
  implementation the backend runs (blockwise, blockwise with block skipping, xla, cudnn).
- `train_step`: one train step (loss, gradients, AdamW) of a one-device layout of the seed's model with 4 layers
  against the planner's step time for the chip's profile (`--hardware`, default h200) and its peak device memory
  against the planner's.
- `ragged_flops`: the matmul FLOPs of that train step's program in ragged and in capacity dispatch (counted from the
  HLO, loops included).
Targets (the accelerator issue): ragged >= 50% of the dense TFLOP/s at 32768 tokens; the planner's step time within
25% of the measured one; ragged FLOPs within 10% of capacity's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]

from results import write_json  # noqa: E402  (first: it records the files the run opens)

KEYS = ("machine", "sizes", "dense_matmul", "moe_layer", "attention", "train_step", "ragged_flops", "errors", "seconds")
SIZES = {  # full: the seed's; smoke: every part at a size the CPU runs in seconds
    "full": {"d": 1024, "f": 2048, "experts": 64, "tokens": [8192, 32768], "seq": [2048, 10240], "heads": 16,
             "head_dim": 64, "train_batch": 16, "train_seq": 2048, "reps": 5},
    "smoke": {"d": 64, "f": 96, "experts": 8, "tokens": [256, 512], "seq": [64, 128], "heads": 4, "head_dim": 16,
              "train_batch": 4, "train_seq": 64, "reps": 2},
}  # fmt: skip


def timed(fn, args, reps):
    """The median of `reps` runs after a warm-up (bench_moe's timer; imported late: JAX must not start before
    --cpu-smoke has chosen the platform)."""
    from bench_moe import timed as bench_timed

    return bench_timed(fn, args, reps)[0]


def machine():
    import jax

    dev = jax.devices()[0]
    return {"platform": dev.platform, "device": getattr(dev, "device_kind", ""), "devices": jax.device_count(),
            "jax": jax.__version__, "python": platform.python_version(), "host": platform.machine()}  # fmt: skip


def moe_parts(sz):
    """dense_matmul and moe_layer: one forward + backward each, bf16."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moe_jax.config import ModelConfig
    from moe_jax.model.moe import MoE
    from moe_jax.sharding import Axes

    d, f, k = sz["d"], sz["f"], 2
    dense, moe = {}, {}
    for t in sz["tokens"]:
        x = jax.random.normal(jax.random.key(1), (t, d), jnp.bfloat16)
        cot = jax.random.normal(jax.random.key(2), (t, d), jnp.float32)
        useful = 6 * 2 * k * t * d * f  # fwd + bwd, two matrices, 2 FLOPs per multiply-add
        w = (
            0.02 * jax.random.normal(jax.random.key(3), (d, k * f)),
            0.02 * jax.random.normal(jax.random.key(4), (k * f, d)),
        )

        def dense_loss(w, x, cot=cot):
            h = jax.nn.gelu(x @ w[0].astype(jnp.bfloat16))
            return jnp.sum((h @ w[1].astype(jnp.bfloat16)).astype(jnp.float32) * cot)

        s = timed(jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1))), (w, x), sz["reps"])
        dense[str(t)] = {"ms": 1e3 * s, "tflops": useful / s / 1e12}
        for dispatch in ("capacity", "dropless", "ragged"):
            cfg = ModelConfig(d_model=d, expert_hidden=f, experts=sz["experts"], top_k=k, dispatch=dispatch)
            graphdef, state = nnx.split(MoE(cfg, out_std=0.02, rngs=nnx.Rngs(0)))

            def loss(state, x, graphdef=graphdef, cot=cot):
                y, _ = nnx.merge(graphdef, state)(x[None], Axes(), jnp.bfloat16)
                return jnp.sum(y[0].astype(jnp.float32) * cot)

            s = timed(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (state, x), sz["reps"])
            tf = useful / s / 1e12
            moe[f"{dispatch}/{t}"] = {
                "ms": 1e3 * s,
                "useful_tflops": tf,
                "over_dense_tflops": tf / dense[str(t)]["tflops"],
            }
    return dense, moe


def attention_part(sz, backend):
    import jax
    import jax.numpy as jnp

    from moe_jax.model.layers import attend, causal_attention

    impls = {"blockwise": lambda q, k, v: causal_attention(q, k, v),
             "blockwise_skip": lambda q, k, v: causal_attention(q, k, v, skip=True),
             "xla": lambda q, k, v: attend(q, k, v, "xla")}  # fmt: skip
    if backend == "gpu":
        impls["cudnn"] = lambda q, k, v: attend(q, k, v, "cudnn")
    out = {}
    for s in sz["seq"]:
        shape = (1, s, sz["heads"], sz["head_dim"])
        q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3))
        for name, f in impls.items():

            def loss(q, k, v, f=f):
                return jnp.sum(f(q, k, v).astype(jnp.float32))

            try:
                out[f"{name}/{s}"] = {
                    "ms": 1e3 * timed(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (q, k, v), sz["reps"])
                }
            except Exception as e:  # an implementation this backend cannot run at this size: recorded, not fatal
                out[f"{name}/{s}"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return out


def seed_config(sz, smoke, dispatch="capacity"):
    from moe_jax.load import load_config

    model = ["model.layers=4"] + ([f"model.d_model={sz['d']}", f"model.expert_hidden={sz['f']}",
                                  f"model.experts={sz['experts']}", "model.heads=4", "model.head_dim=16",
                                  "model.vocab=512"] if smoke else [])  # fmt: skip
    layout = ["layout.pp=1", "layout.dp=1", "layout.ep=1", "layout.tp=1", "layout.microbatches=1"]
    run = [f"run.batch={sz['train_batch']}", f"run.seq_len={sz['train_seq']}", "run.dtype=bf16"]
    return load_config("configs/seed.yaml", None, [*model, *layout, *run, f"model.dispatch={dispatch}"])


def train_part(sz, smoke, hardware):
    import jax
    import numpy as np

    from moe_jax.mesh import make_mesh
    from moe_jax.parallel.sharded import ShardedModel
    from moe_jax.plan.hardware import get_hardware
    from moe_jax.plan.model import plan
    from moe_jax.train.step import init_train_state, make_optimizer, train_step

    cfg = seed_config(sz, smoke)
    mesh = make_mesh(cfg.layout, jax.devices()[:1])
    sm = ShardedModel.build(cfg, mesh)
    tx = make_optimizer(cfg.run)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab, (cfg.run.batch, cfg.run.seq_len + 1)).astype(np.int32)
    with jax.set_mesh(mesh):
        state = init_train_state(sm, tx, 0)
        batch = sm.put_batch(tokens[:, :-1], tokens[:, 1:])
        step = train_step(sm, tx)
        params, opt, ls = state.params, state.opt_state, state.loss_scale
        times = []
        for i in range(sz["reps"] + 1):
            t0 = time.perf_counter()
            params, opt, ls, metrics = step(params, state.rest, opt, ls, *batch)
            jax.block_until_ready(metrics["loss"])
            if i:  # the first step compiles
                times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    p = plan(cfg, get_hardware(hardware))
    measured = statistics.median(times)
    return {"layers": cfg.model.layers, "batch": cfg.run.batch, "seq": cfg.run.seq_len, "hardware": hardware,
            "measured_s": measured, "planned_s": p["step_time_s"]["total"],
            "planned_over_measured": p["step_time_s"]["total"] / measured,
            "peak_bytes": stats.get("peak_bytes_in_use"), "planned_bytes": p["memory_per_device_bytes"]["total"],
            "loss": float(metrics["loss"])}  # fmt: skip


def ragged_flops_part(sz, smoke):
    import jax

    from moe_jax.compile import compile_report
    from moe_jax.mesh import make_mesh

    out = {}
    for dispatch in ("capacity", "ragged"):
        cfg = seed_config(sz, smoke, dispatch)
        report, _, _ = compile_report(cfg, make_mesh(cfg.layout, jax.devices()[:1]), "train")
        out[dispatch] = report["flops"]
    out["ragged_over_capacity"] = out["ragged"] / out["capacity"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-smoke", action="store_true", help="every part at tiny sizes on CPU (checks the script)")
    ap.add_argument("--hardware", default="h200", help="the planner profile of the chip (default h200)")
    args = ap.parse_args()
    if args.cpu_smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    sz = SIZES["smoke" if args.cpu_smoke else "full"]
    out = {"machine": machine(), "sizes": sz, "errors": {}}
    backend = jax.default_backend()
    parts = {
        "dense_matmul": None, "moe_layer": None,
        "attention": lambda: attention_part(sz, backend),
        "train_step": lambda: train_part(sz, args.cpu_smoke, args.hardware),
        "ragged_flops": lambda: ragged_flops_part(sz, args.cpu_smoke),
    }  # fmt: skip
    t0 = time.perf_counter()
    try:
        out["dense_matmul"], out["moe_layer"] = moe_parts(sz)
    except Exception:
        out["dense_matmul"] = out["moe_layer"] = None
        out["errors"]["moe_layer"] = traceback.format_exc(limit=3)
    for name, fn in parts.items():
        if fn is None:
            continue
        try:
            out[name] = fn()
        except Exception:
            out[name] = None
            out["errors"][name] = traceback.format_exc(limit=3)
        print(f"{name}: done at {time.perf_counter() - t0:.0f} s", flush=True)
    out["seconds"] = time.perf_counter() - t0
    write_json(args.out, out)
    print(json.dumps({k: out[k] for k in ("moe_layer", "train_step", "ragged_flops")}, indent=1, default=float))
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
