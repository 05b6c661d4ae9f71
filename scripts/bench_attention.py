"""Causal attention's gradient at seed-128's per-device shapes (one sequence, 8 heads of 64) by implementation:
blockwise (query blocks of 512, each rematerialised), blockwise with block skipping, and flash (only the causal block
pairs, an online softmax and its own VJP): the compiled temporaries of the forward + backward program (XLA:CPU's
memory analysis) at every length, and its time where this CPU runs it in seconds.

    python scripts/bench_attention.py [--reps 3] [--json docs/results/bench_attention.json]

Memory at 2048, 4096, 8192 and 16384 positions (compile only), beside the planner's attention working set of the
seed-128 train step at that length (`plan.model`: blockwise's score block and causal mask, flash's accumulators, inputs
and one block pair). Time (fp32, medians of `--reps` runs after one that compiles) at 2048 and 8192; ratios are of
medians from this same run. Block skipping is timed, not compiled past 8192 (its unrolled blocks: docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

MEMORY_SEQS = (2048, 4096, 8192, 16384)
TIME_SEQS = (2048, 8192)


def implementations():
    from moe_jax.model.layers import causal_attention, flash_attention

    return {
        "blockwise": causal_attention,
        "blockwise_skip": lambda q, k, v: causal_attention(q, k, v, skip=True),
        "flash": flash_attention,
    }


def gradient(f):
    import jax
    import jax.numpy as jnp

    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))


def planned_attention_bytes(seq: int, impl: str) -> int:
    from moe_jax.load import load_config
    from moe_jax.parallel.schedule import schedule_of
    from moe_jax.plan.model import _layer_working_set, layer_residuals

    cfg = load_config(os.path.join(ROOT, "configs/seed.yaml"), os.path.join(ROOT, "meshes/seed-128.yaml"),
                      [f"run.seq_len={seq}", "model.max_seq_len=16384", f"model.attention_impl={impl}"])  # fmt: skip
    res = sum(layer_residuals(cfg).values())
    return _layer_working_set(cfg, schedule_of(cfg), res, "accelerator")["attn_bwd"]


def main() -> None:
    import jax
    import jax.numpy as jnp
    from bench_moe import machine, timed
    from results import write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    impls = implementations()
    memory: dict[str, dict[str, float]] = {}
    for s in MEMORY_SEQS:
        x = jax.ShapeDtypeStruct((1, s, 8, 64), jnp.float16)
        row = {}
        for name, f in impls.items():
            if name == "blockwise_skip" and s > 8192:
                continue
            temp = gradient(f).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
            row[f"{name}_compiled_mib"] = temp / 2**20
        for name in ("blockwise", "flash"):
            row[f"{name}_planned_mib"] = planned_attention_bytes(s, name) / 2**20
        print(f"memory {s}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
        memory[str(s)] = row
    times: dict[str, dict[str, float]] = {}
    for s in TIME_SEQS:
        q, k, v = (jax.random.normal(jax.random.key(i), (1, s, 8, 64), jnp.float32) for i in range(3))
        row = {f"{name}_ms": 1e3 * timed(gradient(f), (q, k, v), args.reps)[0] for name, f in impls.items()}
        row["flash_over_blockwise"] = row["flash_ms"] / row["blockwise_ms"]
        print(f"time {s}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
        times[str(s)] = row
    if args.json:
        write_json(args.json, {"machine": machine(), "jax": jax.__version__, "reps": args.reps,
                               "shape": "batch 1, 8 heads of 64 (seed-128 per device), fp16 compiled, fp32 timed",
                               "memory": memory, "time": times})  # fmt: skip


if __name__ == "__main__":
    main()
