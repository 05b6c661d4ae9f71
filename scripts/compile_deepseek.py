"""DeepSeek-V3 on its report's layout (meshes/deepseek-v3-2048.yaml: pp 16 with uneven stages, dp 2, ep 64) compiled
on 2048 fake CPU devices: every parameter's shards against the assignment, the train step against the planner part by part (`moe-jax plan --check`'s comparison, 5%)
with the HLO audit, and the decode step's memory (its cache the latent and the RoPE key) against the serving plan;
with the planner's figures for the layout on the H800 profile (memory by part, the weights' bytes with and without
ZeRO-1 over the batch axes, step time by part). Writes docs/results/deepseek_v3_2048.json. About 3 minutes and
1.5 GB on 2 cores; XLA:CPU at LLVM -O0 (as the tests).

    python scripts/compile_deepseek.py [--out docs/results/deepseek_v3_2048.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_NUM_CPU_DEVICES"] = "2048"
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from results import write_json  # noqa: E402  (first: it records the files the run opens)


def main() -> None:
    import jax

    from moe_jax.compile import compile_report
    from moe_jax.config import storage_model
    from moe_jax.layouts import load_pair
    from moe_jax.mesh import check_placement, make_mesh
    from moe_jax.model.transformer import param_table
    from moe_jax.plan.check import compare, compiled_figures
    from moe_jax.plan.hardware import get_hardware
    from moe_jax.plan.model import plan, serve_memory

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "deepseek_v3_2048.json"))
    args = ap.parse_args()
    cfg = load_pair("deepseek-v3-2048")
    mesh = make_mesh(cfg.layout)
    # every shard JAX places on each of the 2048 devices against the assignment (no golden JSON at this size)
    names, shapes = param_table(storage_model(cfg))
    placed = check_placement(cfg, mesh, names, shapes)
    print(f"placement: {placed} (parameter, device) pairs equal the assignment", flush=True)
    t0 = time.perf_counter()
    train = compare(cfg, compiled_figures(cfg, mesh), 0.05)
    t1 = time.perf_counter()
    report, _, _ = compile_report(cfg, mesh, "decode")
    t2 = time.perf_counter()
    planned = serve_memory(cfg, "decode")
    mem = train["memory"]
    print(f"train: planned {mem['planned'] / 2**30:.3f} GiB, compiled {mem['compiled'] / 2**30:.3f} GiB "
          f"({mem['error']:+.1%}), FLOPs {train['flops']['error']:+.2%}, audit {train['audit_ok']}, ok {train['ok']}; "
          f"{t1 - t0:.0f} s")  # fmt: skip
    compiled_decode = report["memory_per_device_bytes"]["total"]
    print(f"decode: planned {planned['total'] / 2**30:.3f} GiB (KV cache {planned['kv_cache'] / 2**30:.3f}), "
          f"compiled {compiled_decode / 2**30:.3f} GiB; {t2 - t1:.0f} s")  # fmt: skip
    out = {
        "meta": {
            "jax": jax.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "devices": "2048 fake CPU devices",
            "train_compile_s": round(t1 - t0, 1),
            "decode_compile_s": round(t2 - t1, 1),
        },  # fmt: skip
        "placement_checked": placed,
        "parameters": len(names),
        "train": train,
        "decode": {
            "compiled": report["memory_per_device_bytes"],
            "planned": planned,
            "audit_ok": report.get("audit_ok"),
        },  # fmt: skip
        "plan_h800": plan(cfg, get_hardware("h800")),
    }
    write_json(args.out, out)


if __name__ == "__main__":
    main()
