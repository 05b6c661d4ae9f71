"""The planner against the TPU compiler: the accuracy grid's layouts (moe_jax/plan/accuracy.py, `tpu_grid`) compiled
for the TPU v5p torus of their device count by libtpu on this CPU-only machine (`plan --check --target`), bf16, each
point's memory at the TPU compiler's peak read part by part from its buffer assignment, beside the plan.

    python scripts/planner_accuracy_tpu.py             # the grid -> docs/results/planner_accuracy_tpu.json and
                                                       # docs/planner-accuracy-tpu.md
    python scripts/planner_accuracy_tpu.py --match s128   # the points whose id contains this (printed only)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from results import header, write_json  # noqa: E402  (first: it records the files the run opens)

from moe_jax.mesh import setup_devices  # noqa: E402
from moe_jax.plan.accuracy import V5P_TOPOLOGIES, evaluate, markdown, point_config, tpu_grid  # noqa: E402
from moe_jax.target import parse_target  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--match", help="only the points whose id contains this; results printed, docs left alone")
    ap.add_argument("--tolerance", type=float, default=5.0, help="percent (default 5)")
    ap.add_argument("--out-md", default=os.path.join(ROOT, "docs", "planner-accuracy-tpu.md"))
    ap.add_argument("--out-json", default=os.path.join(ROOT, "docs", "results", "planner_accuracy_tpu.json"))
    args = ap.parse_args()
    points = [p for p in tpu_grid() if args.match is None or args.match in p["id"]]
    if not points:
        print(f"--match={args.match!r}: no point of the TPU grid has it in its id", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = []
    for p in points:
        cfg = point_config(p)
        topology = V5P_TOPOLOGIES[cfg.layout.devices]
        mesh = setup_devices(cfg, target=parse_target(topology), compile_only=True)
        row = {**evaluate(p, mesh, args.tolerance / 100, backend="accelerator"), "devices": cfg.layout.devices,
               "topology": topology}  # fmt: skip
        rows.append(row)
        print(f"{p['id']:40s} {topology:10s} memory {row['memory']['error']:+6.1%}  FLOPs {row['flops']['error']:+6.2%}"
              f"  {'ok' if row['ok'] else 'MISS'}  ({row['seconds']:.0f} s)", flush=True)  # fmt: skip
    minutes = (time.time() - t0) / 60
    ok = sum(r["ok"] for r in rows)
    print(f"{ok} of {len(rows)} points within {args.tolerance:g}% ({minutes:.1f} min)")
    if args.match is not None:
        return 0
    top = (
        "# The planner against the TPU compiler\n\n"
        "Written by `python scripts/planner_accuracy_tpu.py` (docs/results/planner_accuracy_tpu.json): the grid's "
        "layouts compiled for TPU v5p topologies by libtpu on a CPU-only machine, bf16, the plan with the "
        "accelerator's dtype sizes. The compiled total is the TPU compiler's peak (what it checks against HBM; "
        f"docs/tpu.md). {len(rows)} points, {minutes:.0f} minutes on this machine.\n"
    )
    with open(args.out_md + ".tmp", "w") as f:
        f.write(markdown(rows, top))
    os.replace(args.out_md + ".tmp", args.out_md)
    write_json(args.out_json, {"meta": {**header(), "minutes": round(minutes, 1)}, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
