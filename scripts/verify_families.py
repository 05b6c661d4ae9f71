"""Every model family against one device (moe_jax/verify/matrix.py): each tiny family on ep4-tp2, dp2-ep2-tp2,
pp2-ep2-tp2, pp2 circular and pp4-tp2 in fp32, bf16 on two layouts, dense first layers under pp, MoE every second
layer under circular pp, tp 4, and prefill + decode per family; each train case with the HLO audit of the program it
checked. Runs in one process on 8 fake CPU devices (about 10 minutes on 2 cores; XLA:CPU at LLVM -O0 as in the tests).
`--set pipeline`: the 1F1B schedule's cases instead (matrix.pipeline_cases, about 7 minutes); `--set layouts`: ZeRO-1's
(matrix.layout_cases, about 3 minutes).

    python scripts/verify_families.py              # every case -> docs/families.md and docs/results/families.json
    python scripts/verify_families.py --set pipeline  # -> docs/pipeline-1f1b.md and docs/results/pipeline_1f1b.json
    python scripts/verify_families.py --set layouts   # -> docs/layouts.md and docs/results/layouts.json
    python scripts/verify_families.py --match qwen3  # the cases whose id contains this (printed only)
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from results import header, write_json  # noqa: E402  (first: it records the files the run opens)


def release_programs() -> None:
    """Drops every compiled program between cases: one process compiling 30 cases of several programs each otherwise
    outgrows this machine's 23 GB (the layouts set did, at its 24th case). Each case compiles its own anyway."""
    import functools
    import gc

    import jax

    for name, module in list(sys.modules.items()):
        if name.startswith("moe_jax"):
            for value in list(vars(module).values()):
                if isinstance(value, functools._lru_cache_wrapper):
                    value.cache_clear()
    jax.clear_caches()
    gc.collect()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--match", default="", help="only the cases whose id contains this; nothing is written")
    ap.add_argument("--set", default="families", choices=("families", "pipeline", "layouts"))
    args = ap.parse_args()
    json_path, md_path = {
        "families": ("docs/results/families.json", "docs/families.md"),
        "pipeline": ("docs/results/pipeline_1f1b.json", "docs/pipeline-1f1b.md"),
        "layouts": ("docs/results/layouts.json", "docs/layouts.md"),
    }[args.set]
    os.chdir(ROOT)
    # As the tests do (tests/conftest.py): LLVM -O0 halves compile times and leaves the HLO and every result unchanged.
    os.environ["XLA_FLAGS"] = " ".join(
        filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"])
    )
    from moe_jax.mesh import use_fake_devices

    use_fake_devices(8)
    import jax

    from moe_jax.verify.matrix import cases, layout_cases, pipeline_cases, run

    rows = []
    for c in {"families": cases, "pipeline": pipeline_cases, "layouts": layout_cases}[args.set]():
        if args.match not in c["id"]:
            continue
        row = run(c)
        worst = max(row["errors"].items(), key=lambda kv: kv[1])
        print(f"{row['id']}: {'ok' if row['ok'] else 'FAILED ' + str(row['failed'])} (largest {worst[0]} "
              f"{worst[1]:.1e}, tolerance {row['tolerance']:.0e}; {row['seconds']} s)", flush=True)  # fmt: skip
        rows.append(row)
        release_programs()
    if args.match:
        return 0 if all(r["ok"] for r in rows) else 1
    meta = {**header(), "devices": "8 fake CPU devices"}
    commit = meta["commit"]
    write_json(json_path, {"meta": meta, "cases": rows})
    title, what = {
        "families": ("The model families against one device", "Decode cases: a prefill and 3 decode steps against "
                     "the full forward."),
        "pipeline": ("The 1F1B schedule against one device", "The fp16 case: 3 training steps (loss scale, clipping, "
                     "AdamW) with 1F1B and GPipe on the same layout, losses and parameters compared."),
        "layouts": ("The vocabulary split, ZeRO-1, expert folding, the ragged exchange and bf16 moments against one "
                    "device", "Each "
                    "vocabulary, ZeRO-1 and folding case also runs 5 AdamW steps with the option and without it on the "
                    "same layout (layout.vocab_split=none, layout.zero=0, layout.expert_tp=tp): the losses, and in "
                    "fp32 every parameter, compared. In bf16 the "
                    "parameters' difference is reported, not held to the tolerance: AdamW's first steps move a weight "
                    "by about the learning rate whatever its gradient's size, so a gradient below bf16's rounding "
                    "that changes sign between two programs (folding sums an expert's hidden in one matmul, not tp "
                    "partial sums) leaves that weight about 2 lr away (moe_jax/verify/matrix.py, `run_against`). "
                    "The audit is of the train step: reduce-scatter and all-gather over the batch axes for ZeRO-1, "
                    "the experts' all-to-all over (ep, tp) and no tp collective of expert rows for folding. The "
                    "ragged_exchange cases are ragged dispatch's own exchange (layout.ragged_exchange=emulated: "
                    "ragged_all_to_all's semantics from a padded all-to-all), the gradient step against one device "
                    "and the audit of its program. The moments_bf16 cases (run.exp_avg_dtype=exp_avg_sq_dtype=bf16) "
                    "run 5 AdamW steps on the layout and on one device with the same bf16 moments, held to bf16's "
                    "tolerance (the moments are bf16-stored values; the sums' last bits differ between the programs "
                    "and flip a rounding now and then), check every moment is stored in bf16, audit the train step, "
                    "and report the difference from fp32 moments on the layout (tests/test_train.py bounds it on "
                    "fixed gradients)."),
    }[args.set]  # fmt: skip
    cmd = "python scripts/verify_families.py" + ("" if args.set == "families" else f" --set {args.set}")
    lines = [
        f"# {title}",
        "",
        f"`{cmd}` at commit {commit} (jax {jax.__version__}, {meta['machine']}, "
        "8 fake CPU devices); the cases are moe_jax/verify/matrix.py's. Train cases: loss, router terms, every "
        "gradient group and the gradient norm against one device (relative to each leaf's largest element), then the "
        f"HLO audit of the program checked. {what}",
        "",
        f"{sum(r['ok'] for r in rows)} of {len(rows)} cases pass.",
        "",
        "| case | result | largest error | tolerance | audit | s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        worst = max(r["errors"].items(), key=lambda kv: kv[1])
        audit = "clean" if r.get("audit_ok") else "-" if "audit_ok" not in r else "UNEXPECTED"
        reported = "".join(f"; {k} {v:.1e} (reported)" for k, v in r.get("reported", {}).items())
        lines.append(f"| {r['id']} | {'ok' if r['ok'] else 'FAILED'} | {worst[1]:.1e} ({worst[0]}){reported} | "
                     f"{r['tolerance']:.0e} | {audit} | {r['seconds']} |")  # fmt: skip
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {md_path} and {json_path}: {sum(r['ok'] for r in rows)} of {len(rows)} pass")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
