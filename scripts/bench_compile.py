"""Compile time of a full train step (AdamW included) on fake CPU devices, compile-only, nothing allocated: the seed's
layouts, or the model families' presets on theirs (meshes/<preset>-64.yaml).

    python scripts/bench_compile.py [--layouts seed-128,seed-512] [--reps 3] [--json PATH]
    python scripts/bench_compile.py --layouts mixtral-8x7b-64,qwen3-30b-a3b-64,olmoe-1b-7b-64,qwen1.5-moe-a2.7b-64

Each measurement runs in a fresh process (the device count is fixed per process); medians of --reps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CODE = """
import json, time
from moe_jax.compile import compile_report
from moe_jax.layouts import load_pair
from moe_jax.mesh import make_mesh
cfg = load_pair({name!r})
report, _, _ = compile_report(cfg, make_mesh(cfg.layout))
print(json.dumps({{k: report[k] for k in ("lower_seconds", "compile_seconds", "memory_per_device_bytes", "audit_ok")}}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default="seed-128,seed-512")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    out = {"cores": os.cpu_count()}
    from moe_jax.layouts import load_pair

    for name in args.layouts.split(","):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(load_pair(name).layout.devices))
        runs = []
        for _ in range(args.reps):
            proc = subprocess.run([sys.executable, "-c", CODE.format(name=name)], env=env, capture_output=True,
                                  text=True, check=True)  # fmt: skip
            runs.append(json.loads(proc.stdout.splitlines()[-1]))
        lower = statistics.median(r["lower_seconds"] for r in runs)
        comp = statistics.median(r["compile_seconds"] for r in runs)
        total = runs[0]["memory_per_device_bytes"]["total"]
        out[name] = {"lower_s": lower, "compile_s": comp, "memory_per_device_gib": total / 2**30,
                     "audit_ok": runs[0]["audit_ok"], "runs": [r["compile_seconds"] for r in runs]}  # fmt: skip
        print(f"{name}: lowered in {lower:.2f} s, compiled in {comp:.2f} s (median of {args.reps}), "
              f"{total / 2**30:.3f} GiB per device", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
