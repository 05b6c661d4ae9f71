"""GPipe against 1F1B on the seed at full size, seed-128 (pp 4, ep 16, tp 2, remat 'layer'), compile-only on 128 fake
CPU devices: per-device memory at M = 8, 16 and 32 microbatches for both schedules, each microbatch the same size
(run.batch = 16 M: one sequence per device and microbatch), and the planner's figure beside the compiler's
(`moe-jax plan --check`'s comparison). Writes docs/results/pipeline_memory.json.

    python scripts/compile_pipeline.py [--out docs/results/pipeline_memory.json]   (about 3 minutes on 2 cores)

The suite (tests/test_pipeline.py) compiles none of these: it checks the current planner against the committed
compiled figures, and that 1F1B's memory stays flat in M while GPipe's grows. Rerun this script when the step changes.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_NUM_CPU_DEVICES"] = "128"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from results import header, write_json  # noqa: E402  (first: it records the files the run opens)

MICROBATCHES = (8, 16, 32)
SCHEDULES = ("gpipe", "1f1b")


def config(schedule: str, mb: int):
    from moe_jax.load import load_config

    return load_config(None, os.path.join(ROOT, "meshes", "seed-128.yaml"),
                       [f"layout.schedule={schedule}", f"layout.microbatches={mb}", f"run.batch={16 * mb}"])  # fmt: skip


def main() -> None:
    import jax  # noqa: F401  (after the device count is set)

    from moe_jax.mesh import make_mesh
    from moe_jax.plan.check import compare, compiled_figures
    from moe_jax.plan.model import memory

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "pipeline_memory.json"))
    args = ap.parse_args()
    out = {**header(), "rows": []}
    for schedule in SCHEDULES:
        for mb in MICROBATCHES:
            cfg = config(schedule, mb)
            compiled = compiled_figures(cfg, make_mesh(cfg.layout))
            row = compare(cfg, compiled, 0.05)
            planned = memory(cfg, backend="cpu")
            held = sum(planned[k] for k in ("parameters", "optimizer_state", "batch"))
            out["rows"].append({
                "schedule": schedule, "microbatches": mb, "batch": cfg.run.batch,
                "compiled_total": compiled["memory_total"], "compiled_temp": compiled["memory_temp"],
                "planned_total": planned["total"], "planned_temp": planned["total"] - held,
                "error": row["memory"]["error"], "flops_error": row["flops"]["error"], "audit_ok": row["audit_ok"],
                "parts": row["parts"],
            })  # fmt: skip
            r = out["rows"][-1]
            print(f"{schedule} m {mb}: compiled total {r['compiled_total'] / 2**30:.3f} GiB, temp "
                  f"{r['compiled_temp'] / 2**30:.3f} GiB; planned {r['planned_total'] / 2**30:.3f} GiB "
                  f"({r['error']:+.1%}); FLOPs {r['flops_error']:+.1%}; audit {'clean' if r['audit_ok'] else 'NOT'}",
                  flush=True)  # fmt: skip
    write_json(args.out, out)


if __name__ == "__main__":
    main()
