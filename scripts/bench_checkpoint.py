"""What a checkpoint costs the step: the demo's model and layout (configs/tiny.yaml on cpu8-pp2-ep2-tp2, 8 fake CPU
devices) trained with no checkpoints, with synchronous saves and with asynchronous ones (Orbax writes in a background
thread; the step waits only for the copy off the devices), a save every `--every` steps.

    python scripts/bench_checkpoint.py [--steps 60] [--every 5] [--reps 3] [--json docs/results/bench_checkpoint.json]

A step's time is the wall time between two consecutive steps' ends, so a save made after step k counts in step k + 1's
interval. Reported: the median interval of the steps that follow a save and of the others, per mode, each the median
over `--reps` runs made in turn in this one process (after one run that compiles); ratios are of those medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_NUM_CPU_DEVICES"] = "8"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

MODES = ("none", "sync", "async")


def one_run(cfg, mesh, steps: int, every: int, mode: str) -> dict[str, float]:
    from moe_jax.train.data import SyntheticTask
    from moe_jax.train.loop import train

    ends: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(cfg, mesh, SyntheticTask(cfg.model.vocab, cfg.run.seq_len, cfg.run.seed), steps,
              checkpoint_dir=None if mode == "none" else os.path.join(tmp, "ck"), checkpoint_every=every,
              keep=3, on_step=lambda r: ends.append(time.perf_counter()), async_save=mode == "async")  # fmt: skip
        total = time.perf_counter() - t0
    intervals = [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)]  # interval i ends at step i + 2
    after_save = [x for i, x in enumerate(intervals) if (i + 1) % every == 0]
    others = [x for i, x in enumerate(intervals) if (i + 1) % every != 0]
    return {"after_save_s": statistics.median(after_save), "other_s": statistics.median(others), "total_s": total}


def main() -> None:
    import jax
    from bench_moe import machine
    from results import write_json

    from moe_jax.layouts import DEMO_LAYOUT, MESHES, config_for
    from moe_jax.load import load_config
    from moe_jax.mesh import make_mesh

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    cfg = load_config(os.path.join(ROOT, config_for(DEMO_LAYOUT)), os.path.join(MESHES, f"{DEMO_LAYOUT}.yaml"),
                      [f"run.steps={args.steps}"])  # fmt: skip
    mesh = make_mesh(cfg.layout)
    one_run(cfg, mesh, args.steps, args.every, "sync")  # compiles the step; every mode reuses it
    runs = {m: [] for m in MODES}
    for _ in range(args.reps):
        for mode in MODES:  # interleaved, so the machine's drift falls on every mode alike
            runs[mode].append(one_run(cfg, mesh, args.steps, args.every, mode))
    rows = {}
    for mode in MODES:
        rows[mode] = {k: statistics.median(r[k] for r in runs[mode]) for k in runs[mode][0]}
        print(f"{mode:>5}: step after a save {rows[mode]['after_save_s'] * 1e3:7.1f} ms, other steps "
              f"{rows[mode]['other_s'] * 1e3:6.1f} ms, {args.steps} steps {rows[mode]['total_s']:.2f} s")  # fmt: skip
    base = rows["none"]["after_save_s"]
    ratios = {m: rows[m]["after_save_s"] / base for m in ("sync", "async")}
    print(f"the step after a save, over no checkpoints: sync {ratios['sync']:.2f}x, async {ratios['async']:.2f}x")
    if args.json:
        write_json(args.json, {"machine": machine(), "jax": jax.__version__, "layout": DEMO_LAYOUT,
                               "steps": args.steps, "every": args.every, "reps": args.reps, "modes": rows,
                               "after_save_over_none": ratios})  # fmt: skip


if __name__ == "__main__":
    main()
