"""Full-size train steps compiled for TPU v5p pods on this CPU-only machine, with libtpu's TPU compiler
(`moe-jax compile --target`): the seed's model and DeepSeek-V3 on v5p:16x16x16 (4,096 chips: twice XLA:CPU's limit)
and on v5p:16x20x28 (8,960 chips, the largest v5p pod Google Cloud offers; libtpu itself accepts any torus, even
64x64x64). Each case runs in its own process, so its compile time and this machine's peak memory (max RSS) are its
own. Writes docs/results/tpu_compile.json; docs/benchmarks.md quotes it. About 15 minutes on 2 cores.

    python scripts/compile_tpu.py [--out docs/results/tpu_compile.json] [--case NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from results import header, write_json  # noqa: E402  (first: it records the files the run opens)

from moe_jax.compile import compile_report  # noqa: E402
from moe_jax.load import load_config  # noqa: E402
from moe_jax.mesh import setup_devices  # noqa: E402
from moe_jax.target import parse_target  # noqa: E402

SEED = ("configs/seed.yaml", "meshes/seed-128.yaml")
DSV3 = ("configs/models/deepseek-v3.yaml", "meshes/deepseek-v3-2048.yaml")
# name -> (config, layout, target, overrides): the layouts scaled to the pod with the committed files' other settings
CASES = {
    "seed_v5p_4096": (*SEED, "v5p:16x16x16", ["layout.pp=4", "layout.dp=8", "layout.ep=64", "run.batch=1024",
                                               "layout.microbatches=2"]),
    "deepseek_v3_v5p_4096": (*DSV3, "v5p:16x16x16", ["layout.dp=4", "layout.microbatches=30"]),
    # 8960 = 2^8 x 35: pp 7 (16 layers: 3, 3, 2, 2, 2, 2, 2) x dp 20 x ep 64, no tp. With tp 2 (pp 2 x dp 35, or
    # pp 7 x dp 10) libtpu 0.0.42.1 dies compiling it: SIGFPE in its all-reduce emitter (RotatedPincerEmitter).
    "seed_v5p_8960": (*SEED, "v5p:16x20x28", ["layout.pp=7", "layout.dp=20", "layout.ep=64", "layout.tp=1",
                                               "run.batch=10240", "layout.microbatches=8",
                                               "layout.stage_layers=[3,3,2,2,2,2,2]"]),
    # 58 MoE layers over 14 stages: 2 of 5, 12 of 4; dp 10 x ep 64 = 640 rows of each of the 24 microbatches
    "deepseek_v3_v5p_8960": (*DSV3, "v5p:16x20x28", ["layout.pp=14", "layout.dp=10", "layout.microbatches=24",
                                                      "layout.stage_layers=[5,5,4,4,4,4,4,4,4,4,4,4,4,4]"]),
}  # fmt: skip


def run_case(name: str) -> dict:
    """Compile one case in this process and return its figures."""
    config, layout, target_name, overrides = CASES[name]
    cfg = load_config(config, layout, overrides)
    target = parse_target(target_name)
    mesh = setup_devices(cfg, target=target, compile_only=True)
    t0 = time.perf_counter()
    report, _, _ = compile_report(cfg, mesh, "train", target=target)
    wall = time.perf_counter() - t0
    return {
        "config": config,
        "layout": layout,
        "overrides": overrides,
        "layout_summary": cfg.layout.summary(),
        "target": report["target"],
        "memory_per_device_bytes": report["memory_per_device_bytes"],
        "host_memory_per_device_bytes": report["host_memory_per_device_bytes"],
        "fits": report["fits"],
        "flops": report["flops"],
        "bytes_by_kind": report["bytes_by_kind"],
        "audit_ok": report["audit_ok"],
        "unexpected": report["unexpected"],
        "lower_seconds": round(report["lower_seconds"], 1),
        "compile_seconds": round(report["compile_seconds"], 1),
        "wall_seconds": round(wall, 1),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "tpu_compile.json"))
    ap.add_argument("--case", choices=sorted(CASES), help="compile this case only and print its JSON")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    for config, layout, _, overrides in CASES.values():  # checked (and recorded as sources) here, before any compile
        load_config(config, layout, overrides)
    cases = {}
    for name in CASES:
        proc = subprocess.run([sys.executable, __file__, "--case", name], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        cases[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        c = cases[name]
        mem = c["memory_per_device_bytes"]
        print(f"{name}: {c['target']['target']} ({c['target']['chips']} chips), compiled in {c['compile_seconds']} s, "
              f"max RSS {c['max_rss_bytes'] / 2**30:.2f} GiB; peak {mem['peak'] / 2**30:.2f} GiB per chip "
              f"(fits: {c['fits']}), audit {c['audit_ok']}", flush=True)  # fmt: skip
    write_json(args.out, {"meta": {**header(), "compiler": "libtpu (jax[tpu] at the jax pin)"}, "cases": cases})


if __name__ == "__main__":
    main()
