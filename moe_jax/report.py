"""Terminal rendering (rich) of what the commands compute. Only cli.py calls these."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

from moe_jax.mesh import ranges_text


def _groups_line(groups: list[list[int]], full: bool, show: int = 4) -> str:
    def g(x: list[int]) -> str:
        if len(x) > 4 and len({b - a for a, b in zip(x, x[1:], strict=False)}) == 1 and x[1] - x[0] > 1:
            return f"[{x[0]},{x[1]}..{x[-1]}]"  # an arithmetic run: first, second .. last
        return "[" + ranges_text(x) + "]" if len(x) > 4 else "[" + ",".join(map(str, x)) + "]"

    if full or len(groups) <= 2 * show:
        return " ".join(g(x) for x in groups)
    return (
        " ".join(g(x) for x in groups[:show])
        + f" ... ({len(groups) - 2 * show} more) ... "
        + " ".join(g(x) for x in groups[-show:])
    )


def print_assignment(console: Console, table: dict[str, Any], full: bool = False) -> None:
    """One table per pipeline stage, a section per host, a row per device; then every kind of group."""
    lay, model = table["layout"], table["model"]
    console.print(
        f"[bold]{lay.get('name') or 'layout'}[/bold]: pp {lay['pp']} x dp {lay['dp']} x ep {lay['ep']} x tp {lay['tp']}"
        f" = {lay['devices']} devices on {lay['hosts']} host{'s' if lay['hosts'] > 1 else ''};"
        f" repeats {lay['repeats']}, microbatches"
        f" {lay['microbatches']}; model: {model['layers']} layers, {model['experts']} experts, {model['heads']} heads,"
        f" expert hidden {model['expert_hidden']}; batch {model['batch']} x seq {model['seq_len']}"
    )
    if lay.get("expert_tp") == "1" and lay["tp"] > 1:
        console.print(f"experts folded over ep x tp (layout.expert_tp=1): each device holds "
                      f"{model['experts'] // (lay['ep'] * lay['tp'])} whole expert(s) (F slice: the whole hidden); the "
                      f"dispatch all-to-all spans each expert_all_to_all group; attention keeps tp")  # fmt: skip
    split_vocab = lay.get("vocab_split", "none") != "none"
    if split_vocab:
        pad = model["vocab_stored"] - model["vocab"]
        axes = lay.get("vocab_axes", ["tp"])
        shards = math.prod(lay[a] for a in axes)
        console.print(f"vocabulary {model['vocab']} split over {' x '.join(axes)} (layout.vocab_split="
                      f"{lay['vocab_split']}): each device holds {model['vocab_stored'] // shards} embedding rows and "
                      f"head columns (the vocab column)"
                      + (f"; padded to {model['vocab_stored']}, the last {pad} id(s) never looked up and masked out "
                         f"of the loss" if pad else ""))  # fmt: skip
    if model.get("kv_heads", model["heads"]) != model["heads"]:
        console.print(f"K/V heads: {model['kv_heads']} for {model['heads']} query heads, {model['kv_heads_placement']}")
    if model.get("dense_layers") or model.get("moe_every", 1) > 1:
        console.print(f"layers: the first {model['dense_layers']} dense (held by every stage, run by stage 0), then "
                      f"{model['units']} units of {model['moe_every'] - 1} dense + 1 MoE layer split over the stages")  # fmt: skip
    uneven = table["layout"].get("stage_layers")
    if uneven:
        console.print(f"uneven stages: {', '.join(map(str, uneven))} pipelined layers; each stage's stack is padded to "
                      f"{max(uneven)} with units never applied")  # fmt: skip
    stages = sorted({d["coords"]["pp"] for d in table["devices"]})
    for s in stages:
        devs = [d for d in table["devices"] if d["coords"]["pp"] == s]
        pad = devs[0].get("padding_units", 0)
        t = Table(
            title=f"stage pp={s}: layers {ranges_text(devs[0]['layers'])}"
            + (f" (+{pad} padding unit{'s' if pad > 1 else ''})" if pad else ""),
            title_justify="left",
            show_lines=False,
            pad_edge=False,
        )
        kv = model.get("kv_heads", model["heads"]) != model["heads"]
        cols = ("host", "dev", "proc", "dp,ep,tp", "experts", "heads", *(("K/V heads",) if kv else ()), "F slice",
                *(("vocab",) if split_vocab else ()), "batch rows", "seq")  # fmt: skip
        for col in cols:
            t.add_column(col, no_wrap=True)
        host = None
        for d in devs:
            if host is not None and d["host"] != host:
                t.add_section()
            c = d["coords"]
            t.add_row(
                str(d["host"]) if d["host"] != host else "",
                str(d["id"]),
                str(d["process"]),
                f"{c['dp']},{c['ep']},{c['tp']}",
                ranges_text(d["experts"]),
                ranges_text(d["heads"]),
                *(
                    (
                        ranges_text(d["kv_heads_computed"])
                        + ("" if d["kv_heads"] == d["kv_heads_computed"] else f" (holds {ranges_text(d['kv_heads'])})"),
                    )
                    if kv
                    else ()
                ),  # fmt: skip
                f"{d['expert_hidden'][0]}:{d['expert_hidden'][1]}",
                *((f"{d['vocab'][0]}:{d['vocab'][1]}",) if split_vocab else ()),
                rows_text(d["batch_rows"]),
                f"{d['seq'][0]}:{d['seq'][1]}",
            )
            host = d["host"]
        console.print(t)

    console.print("[bold]groups[/bold] (device ids; a-b is a run of ids)")
    what = {
        "tp": "tensor: all-gather / reduce-scatter (sequence parallel)"
        + ("; the vocabulary-parallel embedding and cross-entropy" if split_vocab else ""),
        "ep": "expert parallel: the batch split, the experts split",
        "pp": "pipeline ring: collective-permute"
        + ("; the embedding and head split over the stages" if "pp" in lay.get("vocab_axes", []) else ""),
        "dp": "data replicas",
        "grad_reduce": "gradient sum of attention weights over (dp, ep)",
        "expert_all_to_all": "expert dispatch and combine: all-to-all over "
        + ("(ep, tp), experts folded" if lay.get("expert_tp") == "1" and lay["tp"] > 1 else "ep"),
    }
    for kind, groups in table["groups"].items():
        console.print(
            f"  {kind} ({len(groups)} x {len(groups[0])}, {what.get(kind, '')}): {_groups_line(groups, full)}"
        )
    for kind, entry in table["grad_reduce_by_kind"].items():
        groups = entry["groups"]
        console.print(
            f"  grad sum of {kind} weights over ({', '.join(entry['axes'])}) ({len(groups)} x {len(groups[0])}): "
            f"{_groups_line(groups, full)}"
        )


def rows_text(ranges: list[list[int]]) -> str:
    """[[0,1],[16,17],[32,33]] -> '0:1 +16j, j<3' when evenly spaced (one run per microbatch), else the runs."""
    if len(ranges) > 2:
        step = ranges[1][0] - ranges[0][0]
        width = ranges[0][1] - ranges[0][0]
        if all(b - a == width and a == ranges[0][0] + i * step for i, (a, b) in enumerate(ranges)):
            return f"{ranges[0][0]}:{ranges[0][1]} +{step}j, j<{len(ranges)}"
    return " ".join(f"{a}:{b}" for a, b in ranges)
