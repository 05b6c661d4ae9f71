"""Every valid layout of N devices for a model and batch, with the planner's memory and step time, ranked."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

from moe_jax.config import Config, ConfigError, LayoutConfig
from moe_jax.load import check_with_model
from moe_jax.plan.hardware import Hardware
from moe_jax.plan.model import plan


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def balanced_stages(cfg: Config, pp: int) -> tuple[int, ...]:
    """Uneven stages for a pp that does not divide the pipelined units: the first U mod pp stages one unit more
    (in layers: units x model.moe_every); () where pp divides them (equal stages)."""
    m = cfg.model
    if m.units % pp == 0 or pp > m.units:
        return ()
    base, extra = divmod(m.units, pp)
    return tuple((base + (s < extra)) * m.moe_every for s in range(pp))


def candidates(cfg: Config, devices: int, devices_per_host: int) -> list[Config]:
    """(pp, dp, ep, tp) with pp dp ep tp = devices; microbatches dividing the batch; repeats 1, 2, 4; remat layer or
    tick; schedule GPipe or 1F1B where there is a pipeline; ZeRO-1 or not where there are batch axes; experts split
    over tp or folded over (ep, tp) where tp > 1; the vocabulary over tp, or over tp and pp where there is a
    pipeline; where pp does not divide the pipelined units, uneven stages
    (`balanced_stages`, repeats 1). Only layouts that pass every config check."""
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
                    stages = balanced_stages(cfg, pp)
                    for v in (1, 2, 4) if pp > 1 and not stages else (1,):
                        for remat, schedule, zero, fold, vocab in itertools.product(
                            ("layer", "tick"),
                            ("gpipe", "1f1b") if pp > 1 else ("gpipe",),
                            (0, 1) if shards > 1 else (0,),
                            ("tp", "1") if tp > 1 else ("tp",),
                            ("tp", "tp_pp") if pp > 1 else ("tp",),
                        ):
                            lay = LayoutConfig(pp=pp, dp=dp, ep=ep, tp=tp, repeats=v, microbatches=mb,
                                               devices_per_host=devices_per_host, remat=remat, stage_layers=stages,
                                               schedule=schedule, zero=zero, expert_tp=fold,
                                               vocab_split=vocab)  # fmt: skip
                            c = dataclasses.replace(cfg, layout=lay)
                            try:
                                check_with_model(c)
                            except ConfigError:
                                continue
                            out.append(c)
    return out


def layout_counts(cfg: Config) -> list[int]:
    """Every device count that has a layout under the rules `candidates` applies (from divisors alone: cheap)."""
    m, run = cfg.model, cfg.run
    counts = set()
    widths = [w for w in (m.shared_hidden, m.dense_hidden) if w]
    kv = m.n_kv_heads
    for pp in range(1, m.units + 1):  # uneven stages where pp does not divide the units
        for tp in _divisors(math.gcd(m.heads, run.seq_len, *widths)):
            if kv % tp and tp % kv:
                continue
            for ep in _divisors(m.experts):
                if m.expert_hidden % tp and m.experts % (ep * tp):  # neither split over tp nor folded
                    continue
                for shards in _divisors(run.batch):  # dp x ep
                    if shards % ep == 0 and (pp == 1 or run.batch // shards >= pp):
                        counts.add(pp * tp * shards)
    return sorted(counts)


def no_layout_reason(cfg: Config, devices: int) -> str:
    """One line: why no layout of `devices` exists, and the nearest device counts that have one."""
    m, run = cfg.model, cfg.run
    pipelined = f"model.layers={m.layers}" if m.units == m.layers else f"the pipelined units={m.units}"
    rules = (
        f"pp must be at most {pipelined}, tp must divide model.heads={m.heads}, model.expert_hidden="
        f"{m.expert_hidden} (or ep x tp model.experts, folded), every other FFN width and run.seq_len={run.seq_len} "
        f"and divide or be a multiple of "
        f"model.kv_heads={m.n_kv_heads}, ep must divide model.experts={m.experts}, and dp x ep must "
        f"divide run.batch={run.batch} (with at least pp microbatches)"
    )
    counts = layout_counts(cfg)
    near = [n for n in (max((c for c in counts if c < devices), default=None),
                        min((c for c in counts if c > devices), default=None)) if n is not None]  # fmt: skip
    return (
        f"--devices={devices}: no layout of {devices} devices exists for this model and batch: {rules}; the nearest "
        f"device counts with layouts: {' and '.join(map(str, near))} (at most {counts[-1]})"
    )


@functools.lru_cache(maxsize=8)
def search(cfg: Config, devices: int, hw: Hardware) -> dict[str, Any]:
    """Plans of every candidate; those that fit, ranked by estimated step time. Raises ConfigError in one line when
    no layout exists, or none fits the hardware's memory. Cached per (config, devices, hardware) in a process (the
    audit, the CLI and the tests ask the same question): the result is shared, read it, do not change it."""
    if devices < 1:
        raise ConfigError(f"--devices={devices}: must be a positive integer")
    rows = []
    for c in candidates(cfg, devices, hw.devices_per_host):
        p = plan(c, hw)
        rows.append(
            {
                **p["layout"],
                "memory_gb": p["memory_per_device_bytes"]["total"] / 1e9,
                "fits": p["fits"],
                "step_time_s": round(p["step_time_s"]["total"], 9),  # ns: float noise between equal plans
                "compute_s": p["step_time_s"]["compute"],
                "comm_s": p["step_time_s"]["comm"],
                "bubble_s": p["step_time_s"]["bubble"],
                "mfu": p["mfu"],
                "utilization": p["schedule"]["utilization"],
            }
        )
    if not rows:
        raise ConfigError(no_layout_reason(cfg, devices))
    # Ties (1F1B and GPipe take the same lockstep time) go to the smaller memory.
    fitting = sorted((r for r in rows if r["fits"]), key=lambda r: (r["step_time_s"], r["memory_gb"]))
    if not fitting:
        least = min(rows, key=lambda r: r["memory_gb"])
        raise ConfigError(
            f"--devices={devices}: none of the {len(rows)} layouts of {devices} devices fits {hw.name}'s "
            f"{hw.hbm_bytes / 1e9:.0f} GB per device; the smallest, (pp {least['pp']}, dp {least['dp']}, ep "
            f"{least['ep']}, tp {least['tp']}, m {least['microbatches']}, remat {least['remat']}), needs "
            f"{least['memory_gb']:.1f} GB: use more devices, a smaller run.batch or run.seq_len, or other --hardware"
        )
    for rank, r in enumerate(fitting, 1):
        r["rank"] = rank
    return {"devices": devices, "hardware": hw.name, "candidates": len(rows), "fitting": fitting,
            "not_fitting": sum(not r["fits"] for r in rows)}  # fmt: skip


# The seed's own 128-device layout (meshes/seed-128.yaml) as the search's rows name it: the row the audit, the CLI
# and the tests rank it by.
SEED_128 = {"pp": 4, "dp": 1, "ep": 16, "tp": 2, "microbatches": 8, "repeats": 1, "remat": "layer", "schedule": "gpipe",
            "zero": 0, "expert_tp": "tp", "vocab_split": "tp"}  # fmt: skip


def find(result: dict[str, Any], **layout) -> dict[str, Any] | None:
    """The ranked row of a given layout (e.g. pp=4, ep=16, tp=2, microbatches=8, repeats=1, remat='layer')."""
    for r in result["fitting"]:
        if all(r.get(k) == v for k, v in layout.items()):
            return r
    return None
