"""What `moe-jax plan` prints: the plan of a layout (train, prefill or decode), the ranked search, and plan against
compiler part by part."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moe_jax.model.params import param_formula
from moe_jax.plan.search import SEED_128, find


def print_search(console: Console, result: dict[str, Any], hw, devices: int, top: int) -> None:
    """The fitting layouts ranked by estimated step time (18 columns), and where the seed's own layout ranks."""
    t = Table(
        title=f"layouts of {devices} devices that fit ({len(result['fitting'])} of {result['candidates']}), "
        f"{hw.name}, ranked by estimated step time",
        title_justify="left",
    )
    for col in (
        "rank",
        "pp",
        "dp",
        "ep",
        "tp",
        "m",
        "v",
        "remat",
        "schedule",
        "zero",
        "fold",
        "vocab",
        "GB/dev",
        "step ms",
        "compute",
        "comm",
        "bubble",
        "MFU",
    ):
        t.add_column(col, justify="right")
    for r in result["fitting"][:top]:
        t.add_row(
            str(r["rank"]),
            str(r["pp"]),
            str(r["dp"]),
            str(r["ep"]),
            str(r["tp"]),
            str(r["microbatches"]),
            str(r["repeats"]),
            r["remat"],
            r["schedule"],
            str(r["zero"]),
            "yes" if r["expert_tp"] == "1" else "no",
            r["vocab_split"].replace("_", "+"),
            f"{r['memory_gb']:.2f}",
            f"{r['step_time_s'] * 1e3:.1f}",
            f"{r['compute_s'] * 1e3:.1f}",
            f"{r['comm_s'] * 1e3:.1f}",
            f"{r['bubble_s'] * 1e3:.1f}",
            f"{r['mfu']:.1%}",
        )
    console.print(t)
    own = find(result, **SEED_128)
    if own and devices == 128:
        best = result["fitting"][0]
        console.print(
            f"the seed's 128-device layout (pp4, ep16, tp2, m8) ranks {own['rank']}: "
            f"{own['step_time_s'] * 1e3:.1f} ms against {best['step_time_s'] * 1e3:.1f} ms; its bubble costs "
            f"{own['bubble_s'] * 1e3:.1f} ms (utilisation {own['utilization']:.1%}) and its communication "
            f"{own['comm_s'] * 1e3:.1f} ms vs {best['comm_s'] * 1e3:.1f} ms"
        )


def print_plan(console: Console, cfg, hw, p: dict[str, Any], seed_model: bool) -> None:
    """A train step's plan: parameters, memory by part at the peak, the collectives, FLOPs and step time."""
    mem = p["memory_per_device_bytes"]
    lay = cfg.layout
    console.print(f"plan: {lay.name or 'layout'} ({lay.summary(remat=True)}) on {hw.name}: {hw.notes}")
    claim = "the seed claims 30B: " if seed_model else ""
    active = p["params"]["active_per_token"]
    console.print(
        f"parameters: {p['params']['total']:,} total ({claim}{escape(param_formula(cfg.model))}), {active:,} "
        f"active per token (embedding and head counted), {p['params']['per_device']:,} per device; per token "
        f"from the active ones: {2 * active / 1e9:.1f} GFLOP forward, {6 * active / 1e9:.1f} GFLOP to train "
        "(attention scores not included)"
    )
    parts = ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in mem.items() if k not in ("total", "peak_phase") and v)
    console.print(
        f"memory per device at the peak ({mem['peak_phase']}): {parts}; [bold]total {mem['total'] / 1e9:.2f} "
        f"GB[/bold] of {hw.hbm_bytes / 1e9:.0f} GB (docs/planner.md; `--check` compiles it and compares)"
    )
    t = Table(title="collectives per step and device", title_justify="left")
    for col in ("kind", "axes", "group", "link", "bytes/device", "count", "ms", "what"):
        t.add_column(col)
    for r in p["collectives"]:
        t.add_row(
            r["kind"],
            ",".join(r["axes"]),
            str(r["group_size"]),
            r["link"],
            f"{r['bytes_per_device']:,}",
            str(r["count_per_step"]),
            f"{r['seconds'] * 1e3:.2f}",
            r["what"],
        )
    console.print(t)
    st = p["step_time_s"]
    console.print(
        f"FLOPs per device per step {p['flops_per_step'] / 1e12:.2f} T computed, {p['flops_useful_per_step'] / 1e12:.2f} T"
        f" useful (what MFU counts); step time {st['total'] * 1e3:.1f} ms = "
        f"compute {st['compute'] * 1e3:.1f} + communication {st['comm'] * 1e3:.1f} + bubble {st['bubble'] * 1e3:.1f} "
        f"(no overlap assumed); MFU {p['mfu']:.1%}; {p['tokens_per_s']:,.0f} tokens/s"
    )


def print_serve_plan(console: Console, cfg, hw, step: str, p: dict[str, Any]) -> None:
    mem, st = p["memory_per_device_bytes"], p["step_time_s"]
    lay = cfg.layout
    console.print(
        f"plan {step}: batch {cfg.run.batch}, cache of {cfg.run.seq_len} positions, {lay.name or 'layout'}"
        f" (pp {lay.pp}, dp {lay.dp}, ep {lay.ep}, tp {lay.tp}, m {lay.microbatches}) on {hw.name}"
    )
    console.print(
        "memory per device: "
        + ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in mem.items() if k != "total")
        + f"; [bold]total {mem['total'] / 1e9:.2f} GB[/bold] of {hw.hbm_bytes / 1e9:.0f} GB"
    )
    console.print(
        f"step time {st['total'] * 1e3:.2f} ms = max(compute {st['compute'] * 1e3:.2f}, memory "
        f"{st['memory'] * 1e3:.2f} for {p['bytes_read_per_step'] / 1e9:.2f} GB read) + communication "
        f"{st['comm'] * 1e3:.2f} ({len(p['collectives'])} kinds, latency included); "
        f"{p['tokens_per_s']:,.0f} tokens/s"
    )


def print_plan_check(console: Console, result: dict[str, Any]) -> None:
    """Plan against compiler: memory part by part (error as a share of the compiled total), FLOPs, bytes per kind."""
    mem = result["memory"]
    t = Table(
        title=f"memory per device at the peak (planned peak: {mem['peak_phase']}); error as a share of the "
        "compiled total",
        title_justify="left",
    )
    for col in ("part", "planned GiB", "compiled GiB", "error"):
        t.add_column(col, justify="left" if col == "part" else "right")
    for r in result["parts"]:
        t.add_row(
            r["part"], f"{r['planned'] / 2**30:.3f}", f"{r['compiled'] / 2**30:.3f}", f"{r['error_of_total']:+.1%}"
        )
    t.add_row(
        "[bold]total[/bold]",
        f"{mem['planned'] / 2**30:.3f}",
        f"{mem['compiled'] / 2**30:.3f}",
        f"[bold]{mem['error']:+.1%}[/bold]",
    )
    console.print(t)
    fl = result["flops"]
    console.print(
        f"FLOPs per device per step: planned {fl['planned'] / 1e12:.3f} T (useful {fl['useful'] / 1e12:.3f} T), "
        f"compiled {fl['compiled'] / 1e12:.3f} T ({fl['error']:+.1%})"
    )
    by = result["bytes_by_kind"]
    same = by["planned"] == by["compiled"]
    console.print(
        "collective bytes per kind: " + ("equal" if same else f"planned {by['planned']}, compiled {by['compiled']}")
    )
