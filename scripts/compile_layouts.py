"""The vocabulary split, ZeRO-1 and expert folding at full size, compile-only on fake CPU devices, each against the same layout without
it (GPipe, so that the comparison is of the option alone): per-device memory compiled and planned part by part
(`moe-jax plan --check`'s comparison), collective bytes per kind against the HLO's, the train step's audit.

    ZeRO-1 (layout.zero 0 and 1): the seed on seed-128 (dp 1 x ep 16) and Mixtral-8x7B on pp 4 x dp 2 x ep 8
        (its 64-device layout before folding: dp x ep = 16)
    expert folding (layout.expert_tp tp and 1): the seed on seed-128 (ep 16 x tp 2) and Mixtral-8x7B on its
        64-device layout (pp 4 x dp 2 x ep 4 x tp 2)
    the vocabulary split (layout.vocab_split none, tp and tp_pp): the seed on seed-128, Mixtral-8x7B and
        Qwen3-30B-A3B (vocabulary 151936) on their 64-device layouts

Writes docs/results/layouts_memory.json.

    python scripts/compile_layouts.py [--out docs/results/layouts_memory.json]   (about 5 minutes on 2 cores)

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

from results import header, write_json  # noqa: E402  (first: it records the files the run opens)

MIXTRAL = ("configs/models/mixtral-8x7b.yaml", "meshes/mixtral-8x7b-64.yaml")
# (name, model config, layout file, overrides, the option and its two values)
CASES = [
    ("seed-128", None, "meshes/seed-128.yaml", [], "zero", (0, 1)),
    (
        "mixtral-8x7b-64 ep8",
        *MIXTRAL,
        ["layout.ep=8", "layout.tp=1", "layout.expert_tp=tp", "layout.microbatches=16"],
        "zero",
        (0, 1),
    ),
    ("seed-128", None, "meshes/seed-128.yaml", [], "expert_tp", ("tp", "1")),
    ("mixtral-8x7b-64", *MIXTRAL, ["layout.zero=0"], "expert_tp", ("tp", "1")),
    ("seed-128", None, "meshes/seed-128.yaml", [], "vocab_split", ("none", "tp", "tp_pp")),
    ("mixtral-8x7b-64", *MIXTRAL, [], "vocab_split", ("none", "tp", "tp_pp")),
    (
        "qwen3-30b-a3b-64",
        "configs/models/qwen3-30b-a3b.yaml",
        "meshes/qwen3-30b-a3b-64.yaml",
        [],
        "vocab_split",
        ("tp", "tp_pp"),
    ),
]


def overrides(case, value) -> list[str]:
    """The full override list of one row: GPipe, the case's own, then the option's value."""
    _, _, _, extra, option, _ = case
    return ["layout.schedule=gpipe", *extra, f"layout.{option}={value}"]


def main() -> None:
    import jax  # noqa: F401  (after the device count is set)

    from moe_jax.load import load_config
    from moe_jax.mesh import make_mesh
    from moe_jax.plan.check import compare, compiled_figures

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "layouts_memory.json"))
    args = ap.parse_args()
    out = {**header(), "rows": []}
    done = {}
    for case in CASES:
        name, model, layout, _, option, values = case
        for value in values:
            over = overrides(case, value)
            cfg = load_config(model and os.path.join(ROOT, model), os.path.join(ROOT, layout), over)
            if cfg not in done:
                devices = jax.devices()[: cfg.layout.devices]
                done[cfg] = compare(cfg, compiled_figures(cfg, make_mesh(cfg.layout, devices)), 0.05)
            row = done[cfg]
            out["rows"].append({"name": name, "model": model, "layout": layout, "overrides": over, "option": option,
                                "value": value, **row})  # fmt: skip
            mem = row["memory"]
            print(f"{name} {option}={value}: planned {mem['planned'] / 2**30:.3f} GiB, compiled "
                  f"{mem['compiled'] / 2**30:.3f} GiB ({mem['error']:+.1%}); bytes by kind equal: "
                  f"{row['bytes_by_kind']['planned'] == row['bytes_by_kind']['compiled']}; audit "
                  f"{'clean' if row['audit_ok'] else 'NOT'}; ok {row['ok']}", flush=True)  # fmt: skip
    write_json(args.out, out)


if __name__ == "__main__":
    main()
