"""ZeRO-1 at full size, compile-only on fake CPU devices: the seed on seed-128 (dp 1 x ep 16) and the Mixtral-8x7B preset
on its 64-device layout (dp 2 x ep 8), GPipe, each with layout.zero=0 and 1: per-device memory compiled and planned part by
part (`moe-jax plan --check`'s comparison), collective bytes per kind against the HLO's, the train step's audit.
Writes docs/results/zero_memory.json.

    python scripts/compile_zero.py [--out docs/results/zero_memory.json]   (about 3 minutes on 2 cores)

The suite (tests/test_parallel.py) compiles none of these: it checks the current planner against the committed compiled
figures. Rerun this script when the step changes.
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

LAYOUTS = {"seed-128": (None, "meshes/seed-128.yaml"), "mixtral-8x7b-64": ("configs/models/mixtral-8x7b.yaml",
                                                                             "meshes/mixtral-8x7b-64.yaml")}  # fmt: skip


def config(name: str, zero: int):
    from moe_jax.config import load_config

    model, layout = LAYOUTS[name]
    # GPipe, whatever schedule the layout file names: the comparison is of ZeRO-1 alone.
    overrides = [f"layout.zero={zero}", "layout.schedule=gpipe"]
    return load_config(model and os.path.join(ROOT, model), os.path.join(ROOT, layout), overrides)


def main() -> None:
    import jax  # noqa: F401  (after the device count is set)
    from results import header, write_json

    from moe_jax.mesh import make_mesh
    from moe_jax.plan.check import compare, compiled_figures

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "zero_memory.json"))
    args = ap.parse_args()
    out = {**header(), "rows": []}
    for name in LAYOUTS:
        for zero in (0, 1):
            cfg = config(name, zero)
            devices = jax.devices()[: cfg.layout.devices]
            row = compare(cfg, compiled_figures(cfg, make_mesh(cfg.layout, devices)), 0.05)
            out["rows"].append({"layout": name, "zero": zero, **row})
            mem = row["memory"]
            print(f"{name} zero {zero}: planned {mem['planned'] / 2**30:.3f} GiB, compiled {mem['compiled'] / 2**30:.3f} "
                  f"GiB ({mem['error']:+.1%}); bytes by kind equal: "
                  f"{row['bytes_by_kind']['planned'] == row['bytes_by_kind']['compiled']}; audit "
                  f"{'clean' if row['audit_ok'] else 'NOT'}; ok {row['ok']}", flush=True)  # fmt: skip
    write_json(args.out, out)


if __name__ == "__main__":
    main()
