"""Decode throughput of the tiny model on 8 fake CPU devices, and the planner's decode step for the seed on its card.

    python scripts/bench_decode.py [--layouts cpu8-ep8,cpu8-pp2-ep2-tp2] [--batch 16] [--steps 32] [--json PATH]

Greedy generation: one prefill, then `--steps` decode steps; the first decode step (it compiles) is not timed.
"""

from __future__ import annotations

import argparse
import json
import os

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

from moe_jax.layouts import config_for, load_pair  # noqa: E402
from moe_jax.load import load_config  # noqa: E402
from moe_jax.mesh import make_mesh  # noqa: E402
from moe_jax.plan.hardware import get_hardware  # noqa: E402
from moe_jax.plan.model import serve_plan  # noqa: E402
from moe_jax.serve.generate import generate  # noqa: E402
from moe_jax.serve.step import ServeModel  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default="cpu8-ep8,cpu8-ep4-tp2,cpu8-pp2-ep2-tp2")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--json")
    args = p.parse_args()
    out = {"cores": os.cpu_count(), "tiny": {}}
    for name in args.layouts.split(","):
        cfg = load_config(config_for(name), f"meshes/{name}.yaml", [f"run.batch={args.batch}"])
        srv = ServeModel.build(cfg, make_mesh(cfg.layout), max_len=8 + args.steps + 1)
        params, rest = srv.sm.init(0)
        prompts = np.random.default_rng(0).integers(0, cfg.model.vocab, (args.batch, 8)).astype(np.int32)
        _, t = generate(srv, params, rest, prompts, args.steps + 1)
        out["tiny"][name] = t
        print(f"tiny on {name}: {t['decode_tokens_per_s']:,.0f} tokens/s decoding (batch {args.batch}, "
              f"{args.steps - 1} timed steps), prefill {t['prefill_s'] * 1e3:.0f} ms with its compile", flush=True)  # fmt: skip
    hw = get_hardware("seed")
    for name in ("seed-128", "seed-512"):
        cfg = load_pair(name)
        for seq in (2048, 10240):
            c = load_config(config_for(name), f"meshes/{name}.yaml", [f"run.seq_len={seq}"])
            plan = serve_plan(c, hw, "decode")
            st = plan["step_time_s"]
            out[f"{name}-{seq}"] = {"step_s": st, "tokens_per_s": plan["tokens_per_s"],
                                    "memory_gb": plan["memory_per_device_bytes"]["total"] / 1e9}  # fmt: skip
            print(f"planner, seed on {name}, batch {cfg.run.batch}, cache {seq}: decode step {st['total'] * 1e3:.2f} ms "
                  f"(memory {st['memory'] * 1e3:.2f}, comm {st['comm'] * 1e3:.2f}, compute {st['compute'] * 1e3:.3f}),"
                  f" {plan['tokens_per_s']:,.0f} tokens/s", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
