"""Step time of GPipe against 1F1B on 8 fake CPU devices, at the same layout and microbatch count: the loss and
gradient step (`grad_step`, the part the schedule changes; the optimizer's update is the same for both), on the tiny
model scaled up so that a step takes about a second, pp4-tp2 and pp2-ep2-tp2.

    python scripts/bench_pipeline.py [--reps 5] [--json docs/results/bench_pipeline.json]

Medians of `--reps` timed steps after one compile-and-warm-up step; ratios are of medians from this same run. On fake
CPU devices every device shares the host's cores, so a step's time is the sum of every device's work, not (as on a pod
in lockstep) each tick's busiest stage: 1F1B skips its empty slots while GPipe computes its bubble ticks on padding, and
1F1B recomputes each chunk's forward (GPipe's remat 'layer' recomputes each layer's: the same FLOPs).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_NUM_CPU_DEVICES"] = "8"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

# The tiny model's structure at sizes where a step takes about a second on 2 cores.
SCALE = ["model.d_model=128", "model.heads=4", "model.head_dim=32", "model.expert_hidden=256", "model.layers=8",
         "run.batch=32", "run.seq_len=64", "run.dtype=fp32", "model.dispatch=capacity"]  # fmt: skip
LAYOUTS = {
    "pp4-tp2": ["layout.pp=4", "layout.tp=2", "layout.ep=1"],
    "pp2-ep2-tp2": ["layout.pp=2", "layout.ep=2", "layout.tp=2"],
}
MICROBATCHES = (8,)


def main() -> None:
    import jax
    from bench_moe import machine, timed
    from results import write_json

    from moe_jax.load import load_config
    from moe_jax.mesh import make_mesh
    from moe_jax.parallel.sharded import ShardedModel
    from moe_jax.parallel.step import grad_step
    from moe_jax.verify import synthetic_batch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for name, layout in LAYOUTS.items():
        for mb in MICROBATCHES:
            row = {"layout": name, "microbatches": mb}
            for schedule in ("gpipe", "1f1b"):
                cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), None,
                                  [*SCALE, *layout, f"layout.microbatches={mb}", f"layout.schedule={schedule}"])  # fmt: skip
                mesh = make_mesh(cfg.layout)
                sm = ShardedModel.build(cfg, mesh)
                params, rest = sm.init(0)
                with jax.set_mesh(mesh):
                    batch = sm.put_batch(*synthetic_batch(cfg))
                    median, times = timed(grad_step(sm), (params, rest, *batch), args.reps)
                row[schedule] = {"median_s": median, "times_s": times}
                print(f"{name} m {mb} {schedule}: median {median:.3f} s ({', '.join(f'{t:.3f}' for t in times)})",
                      flush=True)  # fmt: skip
            row["ratio_1f1b_to_gpipe"] = row["1f1b"]["median_s"] / row["gpipe"]["median_s"]
            print(f"{name} m {mb}: 1F1B / GPipe = {row['ratio_1f1b_to_gpipe']:.2f}", flush=True)
            rows.append(row)
    if args.json:
        write_json(args.json, {"machine": machine(), "model": SCALE, "reps": args.reps, "rows": rows})


if __name__ == "__main__":
    main()
