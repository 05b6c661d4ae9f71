"""The four family presets at full size on their 64-device layouts (meshes/<preset>-64.yaml), compile-only on fake
CPU devices: every parameter's shards against the assignment, and the train step compiled and compared with the plan
part by part (`moe-jax plan --check`'s comparison, 5%). Writes docs/results/presets_64.json.

The suite (tests/test_full_size.py) compiles two of the four again and requires their compiled figures to equal the
committed ones (so the file is the current program's); for the other two it compares the current planner with the
committed compiled figures, which costs no compile. Rerun this script when the model or the step changes.

    python scripts/compile_presets.py [--out docs/results/presets_64.json]   (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_NUM_CPU_DEVICES"] = "64"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from results import write_json  # noqa: E402  (first: it records the files the run opens)

PRESETS = ("mixtral-8x7b-64", "qwen3-30b-a3b-64", "olmoe-1b-7b-64", "qwen1.5-moe-a2.7b-64")


def main() -> None:
    import jax

    from moe_jax.layouts import load_pair
    from moe_jax.mesh import make_mesh
    from moe_jax.plan.check import compare, compiled_figures

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "presets_64.json"))
    args = ap.parse_args()
    out = {"jax": jax.__version__, "cores": os.cpu_count(), "presets": {}}
    for name in PRESETS:
        cfg = load_pair(name)
        row = compare(cfg, compiled_figures(cfg, make_mesh(cfg.layout)), 0.05)
        out["presets"][name] = row
        mem = row["memory"]
        print(f"{name}: planned {mem['planned'] / 2**30:.3f} GiB, compiled {mem['compiled'] / 2**30:.3f} GiB "
              f"({mem['error']:+.1%}), FLOPs {row['flops']['error']:+.2%}, ok {row['ok']}", flush=True)  # fmt: skip
    write_json(args.out, out)


if __name__ == "__main__":
    main()
