"""Every valid layout of N devices for a model and batch, with the planner's memory and step time, ranked."""

from __future__ import annotations

import dataclasses
from typing import Any

from moe_jax.config import Config, ConfigError, LayoutConfig, check_config
from moe_jax.plan.hardware import Hardware
from moe_jax.plan.model import plan


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg: Config, devices: int, devices_per_host: int) -> list[Config]:
    """(pp, dp, ep, tp) with pp dp ep tp = devices; microbatches dividing the batch; repeats 1, 2, 4; remat layer or
    tick. Only layouts that pass every config check."""
    out = []
    for pp in _divisors(devices):
        for tp in _divisors(devices // pp):
            for ep in _divisors(devices // (pp * tp)):
                dp = devices // (pp * tp * ep)
                shards = dp * ep
                if cfg.run.batch % shards:
                    continue
                for mb in _divisors(cfg.run.batch // shards):
                    if pp == 1 and mb > 1:
                        continue  # without a pipeline, microbatches only trade speed for memory: left out
                    if pp > 1 and mb < pp:
                        continue  # fewer microbatches than stages leaves stages idle most of the step
                    for v in (1, 2, 4) if pp > 1 else (1,):
                        for remat in ("layer", "tick"):
                            lay = LayoutConfig(pp=pp, dp=dp, ep=ep, tp=tp, repeats=v, microbatches=mb,
                                               devices_per_host=devices_per_host, remat=remat)  # fmt: skip
                            c = dataclasses.replace(cfg, layout=lay)
                            try:
                                check_config(c)
                            except ConfigError:
                                continue
                            out.append(c)
    return out


def search(cfg: Config, devices: int, hw: Hardware) -> dict[str, Any]:
    """Plans of every candidate; those that fit, ranked by estimated step time."""
    rows = []
    for c in candidates(cfg, devices, hw.devices_per_host):
        p = plan(c, hw)
        rows.append(
            {
                **p["layout"],
                "memory_gb": p["memory_per_device_bytes"]["total"] / 1e9,
                "fits": p["fits"],
                "step_time_s": p["step_time_s"]["total"],
                "compute_s": p["step_time_s"]["compute"],
                "comm_s": p["step_time_s"]["comm"],
                "bubble_s": p["step_time_s"]["bubble"],
                "mfu": p["mfu"],
                "utilization": p["schedule"]["utilization"],
            }
        )
    fitting = sorted((r for r in rows if r["fits"]), key=lambda r: r["step_time_s"])
    for rank, r in enumerate(fitting, 1):
        r["rank"] = rank
    return {"devices": devices, "hardware": hw.name, "candidates": len(rows), "fitting": fitting,
            "not_fitting": sum(not r["fits"] for r in rows)}  # fmt: skip


def find(result: dict[str, Any], **layout) -> dict[str, Any] | None:
    """The ranked row of a given layout (e.g. pp=4, ep=16, tp=2, microbatches=8, repeats=1, remat='layer')."""
    for r in result["fitting"]:
        if all(r.get(k) == v for k, v in layout.items()):
            return r
    return None
