"""Time of the layout search (`moe-jax plan --devices N --search`) for the seed's model, in this process.

    python scripts/bench_plan.py [--devices 128,512,2048] [--reps 5] [--json PATH]

Medians of --reps; each search plans every candidate layout (memory, FLOPs, collectives with their links, step time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from moe_jax.load import load_config
from moe_jax.plan.hardware import get_hardware
from moe_jax.plan.search import search


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="128,512,2048")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()
    cfg = load_config("configs/seed.yaml", None, check=False)
    hw = get_hardware("seed")
    out = {"cores": os.cpu_count()}
    for n in (int(x) for x in args.devices.split(",")):
        runs = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            search.cache_clear()  # time the search, not its per-process cache
            result = search(cfg, n, hw)
            runs.append(time.perf_counter() - t0)
        best = result["fitting"][0]
        out[str(n)] = {"seconds": statistics.median(runs), "runs": runs, "candidates": result["candidates"],
                       "fitting": len(result["fitting"]), "best": {k: best[k] for k in ("pp", "dp", "ep", "tp",
                       "microbatches", "repeats", "remat", "step_time_s")}}  # fmt: skip
        print(f"{n} devices: {result['candidates']} candidates, {len(result['fitting'])} fit, searched in "
              f"{statistics.median(runs):.3f} s (median of {args.reps})", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
