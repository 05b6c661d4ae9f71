"""What the commands print (rich) and the files they write (JSON atomically, output paths checked before any work)."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from moe_jax.mesh import ranges_text

# Wide enough that no table is cut and no line wrapped: what a file or a pipe gets.
UNCUT = 100_000


def make_console(least: int = 0, width: int | None = None, quiet: bool = False) -> Console:
    """The console a command prints with: on a terminal its width (at least `least`, or `width` when given); to a
    file or a pipe plain text with no width limit, so a saved table keeps every character (rich would cut cells to
    80 columns with an ellipsis)."""
    if width is None and not sys.stdout.isatty():
        return Console(width=UNCUT, quiet=quiet)
    return Console(width=width or max(Console().width, least), quiet=quiet)


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
        chip = "chip" in devs[0]  # a TPU target: the chip's torus coordinates (and slice, core where there are more)
        cols = ("host", "dev", *(("chip x,y,z",) if chip else ()), "proc", "dp,ep,tp", "experts", "heads",
                *(("K/V heads",) if kv else ()), "F slice", *(("vocab",) if split_vocab else ()), "batch rows", "seq")  # fmt: skip
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
                *((_chip_text(d["chip"]),) if chip else ()),
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


def _chip_text(chip: dict[str, Any]) -> str:
    """'1,2,3', with 's1/' before it on slice 1 and '/c1' after it for core 1 of a chip."""
    text = ",".join(map(str, chip["coords"]))
    return (f"s{chip['slice']}/" if chip["slice"] else "") + text + (f"/c{chip['core']}" if chip["core"] else "")


def rows_text(ranges: list[list[int]]) -> str:
    """[[0,1],[16,17],[32,33]] -> '0:1 +16j, j<3' when evenly spaced (one run per microbatch), else the runs."""
    if len(ranges) > 2:
        step = ranges[1][0] - ranges[0][0]
        width = ranges[0][1] - ranges[0][0]
        if all(b - a == width and a == ranges[0][0] + i * step for i, (a, b) in enumerate(ranges)):
            return f"{ranges[0][0]}:{ranges[0][1]} +{step}j, j<{len(ranges)}"
    return " ".join(f"{a}:{b}" for a, b in ranges)


# --------------------------------------------------------------------------------------------- files the commands write


def write_json(path: str, data: Any) -> None:
    """`data` as indented JSON at `path`, written atomically (a file that is there is whole)."""
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def write_texts(directory: str, files: dict[str, str]) -> str:
    """Each text into directory/name; returns the line that says so."""
    os.makedirs(directory, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)
    return f"wrote {directory}/" + ", ".join(files)


# ------------------------------------------------------------------------------------------------ what commands print


def print_verify(console: Console, cfg, result: dict[str, Any]) -> None:
    lay = cfg.layout
    console.print(
        f"verify {lay.name or 'layout'} (pp {lay.pp}, dp {lay.dp}, ep {lay.ep}, tp {lay.tp}) against one device, "
        f"{cfg.run.dtype}, {cfg.model.dispatch} dispatch: loss {result['loss']:.6f} vs {result['reference_loss']:.6f}"
    )
    for name, err in result["errors"].items():
        mark = "ok" if err <= result["tolerance"] else "[bold red]FAIL[/bold red]"
        console.print(f"  {name:<22} max relative error {err:.2e}  {mark}")
    verdict = "[green]equal[/green]" if result["ok"] else f"[bold red]differ[/bold red]: {', '.join(result['failed'])}"
    console.print(f"tolerance {result['tolerance']:.0e} ({cfg.run.dtype}): {verdict}")


def print_hlo_audit(console: Console, result: dict[str, Any]) -> None:
    """The collectives of the lowered train step, each named by the expected row it is, and the audit's verdict."""
    what = {(r["kind"], tuple(r["axes"]), r["bytes_per_device"]): r["what"] for r in result["expected"]}
    t = Table(title="collectives per train step (lowered HLO; bytes = what one device puts in)", title_justify="left")
    for col in ("kind", "axes", "bytes/device", "per step", "bytes/step", "what"):
        t.add_column(col, justify="right" if col.startswith(("bytes", "per")) else "left")
    for r in result["collectives"]:
        key = (r["kind"], tuple(r["axes"]), r["bytes_per_device"])
        total = r["bytes_per_device"] * r["count_per_step"]
        label = what.get(key, "[red]not expected[/red]")
        t.add_row(
            r["kind"], ",".join(r["axes"]), f"{r['bytes_per_device']:,}", str(r["count_per_step"]), f"{total:,}", label
        )
    console.print(t)
    if result["ok"]:
        console.print(
            "audit: the collectives equal the expected set exactly; every replica group is a group of the "
            "assignment; none spans a single device"
        )
    else:
        console.print(f"[bold red]audit: {len(result['unexpected'])} unexpected[/bold red]")
        for u in result["unexpected"]:
            console.print(f"  {u}")


def print_schedule(console: Console, sched) -> None:
    """A schedule's ticks, utilisation and activation memory, and its chart: one row per stage, one cell per tick."""
    one_f_one_b = sched.kind == "1f1b"
    name = ("interleaved 1F1B" if sched.repeats > 1 else "1F1B") if one_f_one_b else "GPipe"
    console.print(
        f"{name}: pp {sched.pp}, microbatches {sched.microbatches}, repeats {sched.repeats}: {sched.ticks} ticks"
        + (
            f" in the program (v M + v pp + pp - 2, empty slots skipped), {sched.time_ticks} in time"
            if one_f_one_b
            else " (v M + pp - 1)"
        )
        + f", {sched.useful_ticks} useful per stage; utilisation {sched.useful_ticks}/{sched.time_ticks} = "
        f"{sched.utilization:.1%}, bubble {1 - sched.utilization:.1%}"
    )
    slots = sched.activation_slots()
    unit = "microbatch activations [B/(M dp ep), S/tp, D]"
    if one_f_one_b:
        per = "each unit's input" if sched.remat == "layer" else "the chunk's input"
        console.print(
            f"activation memory per stage, in {unit}: a stash of {slots['stash']} slots ({per} per slot, remat "
            f"{sched.remat}; the same array on every stage), of which stage s holds at its peak "
            + ", ".join(f"{s}: {n}" for s, n in enumerate(slots["in_flight"]))
            + " (2 v pp - 1 at most whatever M is)"
        )
        console.print("  forward slot / backward slot (b) per tick; '.' an empty slot, skipped")
    else:
        console.print(
            f"activation memory per stage, in {unit}: {slots['saved']} saved for the backward pass "
            f"({slots['saved_per_tick']} per tick, remat {sched.remat}), {slots['outputs']} outputs, "
            f"{slots['wrap_buffer']} in the wrap-around buffer"
        )
    width = len(str(sched.microbatches - 1)) + (2 if sched.repeats > 1 else 0)

    def cell(w, mark=""):
        return "." if w is None else mark + (f"{w[0]}" if sched.repeats == 1 else f"{w[0]}.{w[1]}")

    for s in range(sched.pp):
        cells = []
        for t in range(sched.ticks):
            cells.append(cell(sched.work(s, t)).rjust(width))
            if one_f_one_b:
                cells[-1] += f"/{cell(sched.backward_work(s, t), 'b').rjust(width + 1)}"
        console.print(f"  stage {s}: " + " ".join(cells), soft_wrap=True)


def print_compile(console: Console, cfg, step: str, report: dict[str, Any]) -> None:
    mem = report["memory_per_device_bytes"]
    lay = cfg.layout
    target = report.get("target", {"target": "cpu"})
    on = (f"{lay.devices} fake devices (XLA:CPU)" if target["target"] == "cpu" else
          f"TPU {target['target']} ({target['chips']} chips, the TPU compiler)")  # fmt: skip
    console.print(
        f"{step} step, {lay.name or 'layout'} ({lay.summary()}) on {on}: lowered in "
        f"{report['lower_seconds']:.1f} s, compiled in {report['compile_seconds']:.1f} s"
    )
    parts = ("argument", "output", "temp", "alias")
    console.print(
        "memory per device: "
        + ", ".join(f"{k} {mem[k] / 2**30:.3f} GiB" for k in parts)
        + f"; total (argument + output + temp - alias) [bold]{mem['total'] / 2**30:.3f} GiB[/bold]"
        + (f"; the compiler's peak {mem['peak'] / 2**30:.3f} GiB, code {mem['generated_code'] / 2**30:.3f} GiB"
           if "peak" in mem else "")
    )  # fmt: skip
    host = report.get("host_memory_per_device_bytes", {})
    if host.get("total"):
        console.print("host (offloaded) memory per device: "
                      + ", ".join(f"{k} {host[k] / 2**30:.3f} GiB" for k in (*parts, "total")))  # fmt: skip
    if "fits" in report:
        hbm = target["hbm_bytes_per_device"]
        console.print(f"the TPU compiler's HBM per device {hbm / 2**30:.2f} GiB: the peak "
                      + ("fits" if report["fits"] else f"[red]does not fit[/red] ({mem['peak'] / hbm:.0%} of it)"))  # fmt: skip
    console.print(
        f"matmul FLOPs per device per step (loops counted): {report['flops'] / 1e12:.3f} TFLOP "
        f"(XLA's cost_analysis, loop bodies once: {report['flops_xla_cost_analysis_loops_once'] / 1e12:.3f})"
    )
    console.print(
        "collective audit: "
        + (
            "equal to the expected set"
            if report["audit_ok"]
            else f"[red]{len(report['unexpected'])} unexpected[/red]: {report['unexpected']}"
        )
    )


def train_progress(console: Console, total: int, start: int = 0):
    """(a rich Progress, on_step(record)): the training bar with loss, router loss, tokens/s, drops and load."""
    progress = Progress(
        TextColumn("step"),
        MofNCompleteColumn(),
        BarColumn(bar_width=20),
        TextColumn(
            "loss {task.fields[loss]}  router {task.fields[router]}  {task.fields[tps]} tok/s  "
            "dropped {task.fields[dropped]}  max/mean load {task.fields[load]}"
        ),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task(
        "train", total=total, completed=start, loss="-", router="-", tps="-", dropped="-", load="-"
    )

    def on_step(r):
        progress.update(
            task,
            completed=r["step"],
            loss=f"{r['loss']:.3f}",
            router=f"{r['router_loss']:.4f}",
            tps=f"{r['tokens_per_s']:,.0f}",
            dropped=f"{r['dropped_share']:.1%}",
            load=f"{r['max_over_mean_load']:.2f}",
        )

    return progress, on_step
