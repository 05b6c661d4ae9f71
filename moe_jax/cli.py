"""`moe-jax` and its subcommands: parse, call, print.

Mistakes in configs and inputs end as one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
from typing import Any

from moe_jax.config import Config, ConfigError, check_devices
from moe_jax.load import load_config
from moe_jax.plan.hardware import PROFILES


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="model/run YAML (default: the seed's model, embedded)")
    p.add_argument("--layout", help="layout YAML from meshes/ (default: the config's layout, else seed-128)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. model.top_k=1 layout.ep=4 run.batch=64")


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--devices",
        type=int,
        help="number of fake CPU devices (default: the layout's device count); ignored with --real",
    )
    p.add_argument("--real", action="store_true", help="use this machine's accelerators instead of fake CPU devices")


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes (one per host; see docs/launch.md)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    g.add_argument("--distributed", action="store_true", help="let jax.distributed detect the cluster (Slurm, TPU)")
    g.add_argument("--local-devices", type=int, help="fake CPU devices in this process (local multi-process runs)")
    g.add_argument("--init-timeout", type=int, default=60, help="seconds to wait for every process to join")
    g.add_argument("--heartbeat-timeout", type=int, default=20, help="seconds of silence before a peer is lost")


def _config(args) -> Config:
    return load_config(args.config, args.layout, args.overrides)


def _setup_devices(args, cfg: Config, compile_only: bool = False):
    """Fake CPU devices unless --real; returns the mesh of the layout. `compile_only` (compile, hlo: the program is
    never run on fake devices) asks XLA:CPU for LLVM -O0 code: the HLO, memory and collectives are the same (the
    seed-128 train step's compiled text is byte-identical; tests/test_plan.py checks it on a pipelined tiny layout),
    and compiling takes about a third less time."""
    from moe_jax.mesh import make_mesh, use_fake_devices

    flags = os.environ.get("XLA_FLAGS", "")
    if compile_only and not args.real and "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()  # read when JAX starts XLA

    if getattr(args, "coordinator", None) or getattr(args, "distributed", False):
        from moe_jax.distributed import initialize

        initialize(args.coordinator, args.num_processes, args.process_id, args.local_devices, args.init_timeout,
                   args.heartbeat_timeout, auto=args.distributed)  # fmt: skip
        return make_mesh(cfg.layout)
    if not args.real:
        if args.devices is not None:
            if args.devices < 1:
                raise ConfigError(f"--devices={args.devices}: must be a positive integer")
            check_devices(cfg.layout, args.devices)  # before JAX makes them: 100000 fake devices take minutes
        use_fake_devices(args.devices if args.devices is not None else cfg.layout.devices)
    return make_mesh(cfg.layout)


def check_output(path: str, field: str, directory: bool) -> None:
    """Refuses an output path that cannot be written, before any work is done and without creating anything: the
    deepest part of the path that exists must be a directory in which a probe file can be made (and is removed)."""
    full = os.path.abspath(path)
    if directory and os.path.exists(full) and not os.path.isdir(full):
        raise ConfigError(f"{field}={path!r}: is a file, not a directory")
    if not directory and os.path.isdir(full):
        raise ConfigError(f"{field}={path!r}: is a directory; give a file path")
    existing = full if directory else os.path.dirname(full)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{field}={path!r}: cannot write there: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".moe-jax-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f"{field}={path!r}: cannot write there: making a file in {existing} fails ({e.strerror or e})"
        ) from None


def _check_outputs(args) -> None:
    for dest, directory in getattr(args, "outputs", {}).items():
        value = getattr(args, dest, None)
        if value:
            check_output(value, "--" + dest.replace("_", "-"), directory)


def _write_json(path: str, data: Any) -> None:
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------ commands


def cmd_mesh(args) -> int:
    import jax
    from rich.console import Console

    from moe_jax.mesh import assignment, check_placement
    from moe_jax.report import print_assignment

    cfg = _config(args)
    mesh = _setup_devices(args, cfg)
    table = assignment(cfg, mesh)
    if jax.process_count() > 1:  # every process states what JAX placed on it, for the record (and the tests)
        local = sorted(d.id for d in jax.local_devices())
        print(f"process {jax.process_index()} of {jax.process_count()} holds devices {local}", flush=True)
    console = Console(width=args.width or max(Console().width, 100), quiet=jax.process_index() != 0)
    print_assignment(console, table, full=args.full)
    if not args.no_check:
        from moe_jax.config import storage_model
        from moe_jax.model.transformer import param_table

        names, shapes = param_table(storage_model(cfg))  # as stored: uneven stages' padding included
        n = check_placement(cfg, mesh, names, shapes)
        console.print(
            f"placement check: {len(names)} parameters x {cfg.layout.devices} devices = {n} shards, each equal to "
            "JAX's devices_indices_map"
        )
    if args.json and jax.process_index() == 0:
        _write_json(args.json, table)
        console.print(f"wrote {args.json}")
    if args.png and jax.process_index() == 0:
        from moe_jax.viz import draw_mesh

        draw_mesh(table, args.png)
        console.print(f"wrote {args.png}")
    return 0


def cmd_verify(args) -> int:
    from rich.console import Console

    from moe_jax.verify import verify

    cfg = _config(args)
    mesh = _setup_devices(args, cfg)
    perturb = None
    if args.perturb:
        perturb = _perturb_one_gradient(args.perturb)
    result = verify(cfg, mesh, seed=args.seed, perturb=perturb)
    console = Console()
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
    if args.json:
        _write_json(args.json, result)
    return 0 if result["ok"] else 1


def _perturb_one_gradient(eps: float):
    """Self-test of the check: adds eps x max|g| to one element of the first expert gradient of the sharded result."""
    from flax import nnx

    def perturb(sharded):
        (loss, met), grads = sharded
        flat = dict(nnx.to_flat_state(grads))
        path = next(p for p in flat if "w_in" in map(str, p))
        g = flat[path][...].copy()
        g.flat[0] += eps * float(abs(g).max())
        flat[path][...] = g
        return (loss, met), grads

    return perturb


def cmd_hlo(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from moe_jax.hlo import audit
    from moe_jax.mesh import assignment
    from moe_jax.parallel.sharded import ShardedModel
    from moe_jax.parallel.step import lower_step

    cfg = _config(args)
    mesh = _setup_devices(args, cfg, compile_only=True)
    lowered = lower_step(ShardedModel.build(cfg, mesh))
    compiled = lowered.compile()
    before, after = lowered.as_text(dialect="hlo"), compiled.as_text()
    console = Console()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for name, text in (("before_optimizations", before), ("after_optimizations", after)):
            with open(os.path.join(args.out, f"{name}.hlo.txt"), "w") as f:
                f.write(text)
        console.print(f"wrote {args.out}/before_optimizations.hlo.txt and after_optimizations.hlo.txt")
    result = audit(before, after, cfg, assignment(cfg, mesh))
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
        console.print("audit: the collectives equal the expected set exactly; every replica group is a group of the "
                      "assignment; none spans a single device")  # fmt: skip
    else:
        console.print(f"[bold red]audit: {len(result['unexpected'])} unexpected[/bold red]")
        for u in result["unexpected"]:
            console.print(f"  {u}")
    if args.json:
        _write_json(args.json, result)
    return 0 if result["ok"] else 1


def cmd_schedule(args) -> int:
    from rich.console import Console

    from moe_jax.parallel.schedule import Schedule

    sched = Schedule(args.pp, args.microbatches, args.repeats, args.layers, args.remat, args.schedule)
    console = Console()
    one_f_one_b = sched.kind == "1f1b"
    name = ("interleaved 1F1B" if sched.repeats > 1 else "1F1B") if one_f_one_b else "GPipe"
    console.print(
        f"{name}: pp {sched.pp}, microbatches {sched.microbatches}, repeats {sched.repeats}: {sched.ticks} ticks"
        + (f" in the program (v M + v pp + pp - 2, empty slots skipped), {sched.time_ticks} in time" if one_f_one_b
           else " (v M + pp - 1)")
        + f", {sched.useful_ticks} useful per stage; utilisation {sched.useful_ticks}/{sched.time_ticks} = "
        f"{sched.utilization:.1%}, bubble {1 - sched.utilization:.1%}"
    )  # fmt: skip
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
    else:
        console.print(
            f"activation memory per stage, in {unit}: {slots['saved']} saved for the backward pass "
            f"({slots['saved_per_tick']} per tick, remat {sched.remat}), {slots['outputs']} outputs, "
            f"{slots['wrap_buffer']} in the wrap-around buffer"
        )
    width = len(str(sched.microbatches - 1)) + (2 if sched.repeats > 1 else 0)

    def cell(w, mark=""):
        return "." if w is None else mark + (f"{w[0]}" if sched.repeats == 1 else f"{w[0]}.{w[1]}")

    if one_f_one_b:
        console.print("  forward slot / backward slot (b) per tick; '.' an empty slot, skipped")
    for s in range(sched.pp):
        cells = []
        for t in range(sched.ticks):
            if one_f_one_b:
                both = f"{cell(sched.work(s, t)).rjust(width)}/{cell(sched.backward_work(s, t), 'b').rjust(width + 1)}"
                cells.append(both)
            else:
                cells.append(cell(sched.work(s, t)).rjust(width))
        console.print(f"  stage {s}: " + " ".join(cells), soft_wrap=True)
    if args.json:
        _write_json(args.json, sched.to_json())
    if args.png:
        from moe_jax.viz import draw_schedule

        draw_schedule(sched, args.png)
        console.print(f"wrote {args.png}")
    return 0


def cmd_compile(args) -> int:
    from rich.console import Console

    from moe_jax.compile import compile_report

    cfg = _config(args)
    mesh = _setup_devices(args, cfg, compile_only=True)
    report, lowered, compiled = compile_report(cfg, mesh, args.step, dump_buffers=bool(args.dump))
    console = Console()
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        files = {"before_optimizations.hlo.txt": lowered.as_text(dialect="hlo"),
                 "after_optimizations.hlo.txt": compiled.as_text(),
                 "buffer_assignment.txt": report.pop("xla_dump")["assignment"]}  # fmt: skip
        for name, text in files.items():
            with open(os.path.join(args.dump, name), "w") as f:
                f.write(text)
        console.print(f"wrote {args.dump}/" + ", ".join(files))
    mem = report["memory_per_device_bytes"]
    lay = cfg.layout
    console.print(
        f"{args.step} step, {lay.name or 'layout'} ({lay.summary()}) on {lay.devices} fake devices: lowered in "
        f"{report['lower_seconds']:.1f} "
        f"s, compiled in {report['compile_seconds']:.1f} s"
    )
    console.print(
        "memory per device: "
        + ", ".join(f"{k} {v / 2**30:.3f} GiB" for k, v in mem.items() if k != "total")
        + f"; total (argument + output + temp - alias) [bold]{mem['total'] / 2**30:.3f} GiB[/bold]"
    )
    console.print(
        f"matmul FLOPs per device per step (loops counted): {report['flops'] / 1e12:.3f} TFLOP "
        f"(XLA's cost_analysis, loop bodies once: {report['flops_xla_cost_analysis_loops_once'] / 1e12:.3f})"
    )
    console.print(
        "collective audit: " + ("equal to the expected set" if report["audit_ok"] else
                                f"[red]{len(report['unexpected'])} unexpected[/red]: {report['unexpected']}")
    )  # fmt: skip
    if args.json:
        _write_json(args.json, report)
    return 0 if report["audit_ok"] else 1


def cmd_plan(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from moe_jax.config import check_devices
    from moe_jax.model.params import param_formula
    from moe_jax.plan.hardware import get_hardware
    from moe_jax.plan.model import plan
    from moe_jax.plan.search import SEED_128, find, search

    hw = get_hardware(args.hardware)
    console = Console(width=max(Console().width, 120))
    if args.check and (args.step != "train" or args.search):
        raise ConfigError("--check: checks the train step of one layout; leave out --search and --step")
    if args.search:
        if args.devices is None:
            raise ConfigError("--search needs --devices N: the device count to lay out")
        cfg = load_config(args.config, None, args.overrides, check=False)
        result = search(cfg, args.devices, hw)
        console = Console(width=max(Console().width, 140))  # the ranked table's 18 columns
        t = Table(title=f"layouts of {args.devices} devices that fit ({len(result['fitting'])} of "
                  f"{result['candidates']}), {hw.name}, ranked by estimated step time", title_justify="left")  # fmt: skip
        for col in ("rank", "pp", "dp", "ep", "tp", "m", "v", "remat", "schedule", "zero", "fold", "vocab", "GB/dev",
                    "step ms", "compute", "comm", "bubble", "MFU"):  # fmt: skip
            t.add_column(col, justify="right")
        for r in result["fitting"][: args.top]:
            t.add_row(str(r["rank"]), str(r["pp"]), str(r["dp"]), str(r["ep"]), str(r["tp"]), str(r["microbatches"]),
                      str(r["repeats"]), r["remat"], r["schedule"], str(r["zero"]),
                      "yes" if r["expert_tp"] == "1" else "no", r["vocab_split"].replace("_", "+"),
                      f"{r['memory_gb']:.2f}", f"{r['step_time_s'] * 1e3:.1f}",
                      f"{r['compute_s'] * 1e3:.1f}", f"{r['comm_s'] * 1e3:.1f}", f"{r['bubble_s'] * 1e3:.1f}",
                      f"{r['mfu']:.1%}")  # fmt: skip
        console.print(t)
        own = find(result, **SEED_128)
        if own and args.devices == 128:
            best = result["fitting"][0]
            console.print(
                f"the seed's 128-device layout (pp4, ep16, tp2, m8) ranks {own['rank']}: "
                f"{own['step_time_s'] * 1e3:.1f} ms against {best['step_time_s'] * 1e3:.1f} ms; its bubble costs "
                f"{own['bubble_s'] * 1e3:.1f} ms (utilisation {own['utilization']:.1%}) and its communication "
                f"{own['comm_s'] * 1e3:.1f} ms vs {best['comm_s'] * 1e3:.1f} ms"
            )
        if args.json:
            _write_json(args.json, result)
        return 0

    cfg = _config(args)
    if args.devices is not None:
        check_devices(cfg.layout, args.devices)
    if args.check:
        return _plan_check(args, cfg, console)
    if args.step != "train":
        return _plan_serve(args, cfg, hw, console)
    p = plan(cfg, hw)
    mem = p["memory_per_device_bytes"]
    lay = cfg.layout
    console.print(f"plan: {lay.name or 'layout'} ({lay.summary(remat=True)}) on {hw.name}: {hw.notes}")
    claim = "the seed claims 30B: " if cfg.model == load_config(None, None).model else ""
    active = p["params"]["active_per_token"]
    console.print(f"parameters: {p['params']['total']:,} total ({claim}{escape(param_formula(cfg.model))}), {active:,} "
                  f"active per token (embedding and head counted), {p['params']['per_device']:,} per device; per token "
                  f"from the active ones: {2 * active / 1e9:.1f} GFLOP forward, {6 * active / 1e9:.1f} GFLOP to train "
                  "(attention scores not included)")  # fmt: skip
    parts = ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in mem.items() if k not in ("total", "peak_phase") and v)
    console.print(f"memory per device at the peak ({mem['peak_phase']}): {parts}; [bold]total {mem['total'] / 1e9:.2f} "
                  f"GB[/bold] of {hw.hbm_bytes / 1e9:.0f} GB (docs/planner.md; `--check` compiles it and compares)")  # fmt: skip
    t = Table(title="collectives per step and device", title_justify="left")
    for col in ("kind", "axes", "group", "link", "bytes/device", "count", "ms", "what"):
        t.add_column(col)
    for r in p["collectives"]:
        t.add_row(r["kind"], ",".join(r["axes"]), str(r["group_size"]), r["link"], f"{r['bytes_per_device']:,}",
                  str(r["count_per_step"]), f"{r['seconds'] * 1e3:.2f}", r["what"])  # fmt: skip
    console.print(t)
    st = p["step_time_s"]
    console.print(
        f"FLOPs per device per step {p['flops_per_step'] / 1e12:.2f} T computed, {p['flops_useful_per_step'] / 1e12:.2f} T"
        f" useful (what MFU counts); step time {st['total'] * 1e3:.1f} ms = "
        f"compute {st['compute'] * 1e3:.1f} + communication {st['comm'] * 1e3:.1f} + bubble {st['bubble'] * 1e3:.1f} "
        f"(no overlap assumed); MFU {p['mfu']:.1%}; {p['tokens_per_s']:,.0f} tokens/s"
    )
    if args.json:
        _write_json(args.json, p)
    if not p["fits"]:
        print(f"moe-jax plan: error: does not fit: needs {mem['total'] / 1e9:.1f} GB per device, has "
              f"{hw.hbm_bytes / 1e9:.0f}", file=sys.stderr)  # fmt: skip
        return 2
    return 0


def _plan_check(args, cfg, console) -> int:
    from rich.table import Table

    from moe_jax.plan.check import compare, compiled_figures

    if not 0 < args.tolerance < 100:
        raise ConfigError(f"--tolerance={args.tolerance}: a percentage between 0 and 100")
    mesh = _setup_devices(args, cfg, compile_only=True)
    lay = cfg.layout
    console.print(f"compiling the train step of {lay.name or 'the layout'} ({lay.summary(remat=True)}) on "
                  f"{lay.devices} fake CPU devices ...")  # fmt: skip
    result = compare(cfg, compiled_figures(cfg, mesh), args.tolerance / 100)
    mem = result["memory"]
    t = Table(title=f"memory per device at the peak (planned peak: {mem['peak_phase']}); error as a share of the "
              "compiled total", title_justify="left")  # fmt: skip
    for col in ("part", "planned GiB", "compiled GiB", "error"):
        t.add_column(col, justify="left" if col == "part" else "right")
    for r in result["parts"]:
        t.add_row(
            r["part"], f"{r['planned'] / 2**30:.3f}", f"{r['compiled'] / 2**30:.3f}", f"{r['error_of_total']:+.1%}"
        )
    t.add_row("[bold]total[/bold]", f"{mem['planned'] / 2**30:.3f}", f"{mem['compiled'] / 2**30:.3f}",
              f"[bold]{mem['error']:+.1%}[/bold]")  # fmt: skip
    console.print(t)
    fl = result["flops"]
    console.print(f"FLOPs per device per step: planned {fl['planned'] / 1e12:.3f} T (useful {fl['useful'] / 1e12:.3f} T), "
                  f"compiled {fl['compiled'] / 1e12:.3f} T ({fl['error']:+.1%})")  # fmt: skip
    by = result["bytes_by_kind"]
    same = by["planned"] == by["compiled"]
    console.print(
        "collective bytes per kind: " + ("equal" if same else f"planned {by['planned']}, compiled {by['compiled']}")
    )
    if args.json:
        _write_json(args.json, result)
    if result["failures"]:
        for f in result["failures"]:
            print(f"moe-jax plan --check: beyond {args.tolerance:g}%: {f}", file=sys.stderr)
        return 1
    console.print(f"plan and compiler agree within {args.tolerance:g}%")
    return 0


def _plan_serve(args, cfg, hw, console) -> int:
    from moe_jax.plan.model import serve_plan

    p = serve_plan(cfg, hw, args.step)
    mem, st = p["memory_per_device_bytes"], p["step_time_s"]
    lay = cfg.layout
    console.print(f"plan {args.step}: batch {cfg.run.batch}, cache of {cfg.run.seq_len} positions, {lay.name or 'layout'}"
                  f" (pp {lay.pp}, dp {lay.dp}, ep {lay.ep}, tp {lay.tp}, m {lay.microbatches}) on {hw.name}")  # fmt: skip
    console.print("memory per device: " + ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in mem.items() if k != "total")
                  + f"; [bold]total {mem['total'] / 1e9:.2f} GB[/bold] of {hw.hbm_bytes / 1e9:.0f} GB")  # fmt: skip
    console.print(f"step time {st['total'] * 1e3:.2f} ms = max(compute {st['compute'] * 1e3:.2f}, memory "
                  f"{st['memory'] * 1e3:.2f} for {p['bytes_read_per_step'] / 1e9:.2f} GB read) + communication "
                  f"{st['comm'] * 1e3:.2f} ({len(p['collectives'])} kinds, latency included); "
                  f"{p['tokens_per_s']:,.0f} tokens/s")  # fmt: skip
    if args.json:
        _write_json(args.json, p)
    if not p["fits"]:
        print(f"moe-jax plan: error: does not fit: needs {mem['total'] / 1e9:.1f} GB per device, has "
              f"{hw.hbm_bytes / 1e9:.0f}", file=sys.stderr)  # fmt: skip
        return 2
    return 0


def cmd_audit(args) -> int:
    from moe_jax.plan.audit import claims, markdown

    text = markdown(claims())
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {args.out}")
    return 0


def _progress(console, total: int, start: int = 0):
    """A rich progress bar whose fields are the step's metrics; returns (progress, on_step)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("step"), MofNCompleteColumn(), BarColumn(bar_width=20),
        TextColumn("loss {task.fields[loss]}  router {task.fields[router]}  {task.fields[tps]} tok/s  "
                   "dropped {task.fields[dropped]}  max/mean load {task.fields[load]}"),
        TimeElapsedColumn(), console=console, transient=False,
    )  # fmt: skip
    task = progress.add_task("train", total=total, completed=start, loss="-", router="-", tps="-", dropped="-",
                             load="-")  # fmt: skip

    def on_step(r):
        progress.update(task, completed=r["step"], loss=f"{r['loss']:.3f}", router=f"{r['router_loss']:.4f}",
                        tps=f"{r['tokens_per_s']:,.0f}", dropped=f"{r['dropped_share']:.1%}",
                        load=f"{r['max_over_mean_load']:.2f}")  # fmt: skip

    return progress, on_step


def cmd_train(args) -> int:
    import jax
    from rich.console import Console

    from moe_jax.train.data import make_source
    from moe_jax.train.loop import train

    steps = [f"run.steps={args.steps}"] if args.steps is not None else []
    init_params = None
    if args.init_from_hf:
        from moe_jax.hf import config_from_hf
        from moe_jax.hf.checkpoint import import_state

        cfg, _ = config_from_hf(args.init_from_hf, args.config, args.layout, [*args.overrides, *steps])

        def init_params(sm):
            return import_state(sm, args.init_from_hf, cfg.run.seed)[:2]  # the weights, and V3's routing bias
    else:
        cfg = load_config(args.config, args.layout, [*args.overrides, *steps])
    mesh = _setup_devices(args, cfg)
    source = make_source(args.data, cfg.model.vocab, cfg.run.seq_len, cfg.run.seed, args.data_dtype)
    quiet = jax.process_index() != 0
    console = Console(quiet=quiet)
    lay = cfg.layout
    console.print(f"train: {lay.name or 'layout'} ({lay.summary()}) on {lay.devices} devices; data: "
                  f"{source.describe()}")  # fmt: skip
    progress, on_step = _progress(console, cfg.run.steps)
    try:
        with progress:
            state, records = train(
                cfg, mesh, source, cfg.run.steps, metrics_path=args.metrics, checkpoint_dir=args.checkpoint_dir,
                checkpoint_every=args.checkpoint_every, keep=args.keep, resume=args.resume, profile_dir=args.profile,
                on_step=on_step, stop_at=args.stop_at, allow_config_change=args.allow_config_change,
                init_params=init_params,
            )  # fmt: skip
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        from moe_jax.distributed import lost_peer_message

        print(f"moe-jax train: error: process {jax.process_index()}: {lost_peer_message(e)}", file=sys.stderr)
        return 1
    if records:
        last = records[-1]
        console.print(f"step {last['step']}: loss {last['loss']:.4f} (cross-entropy {last['ce']:.4f}); "
                      f"{sum(r['skipped'] for r in records)} steps skipped for overflow")  # fmt: skip
    else:
        console.print(f"nothing to do: the checkpoint is at step {state.step}, at or past step "
                      f"{args.stop_at or cfg.run.steps}")  # fmt: skip
    if args.profile:
        console.print(f"wrote a jax.profiler trace to {args.profile}")
    return 0


def cmd_demo(args) -> int:
    import numpy as np
    from rich.console import Console
    from rich.markup import escape

    from moe_jax.layouts import MESHES, config_for
    from moe_jax.mesh import assignment
    from moe_jax.model.params import param_formula, total_params
    from moe_jax.serve.generate import continue_sequences
    from moe_jax.serve.step import ServeModel
    from moe_jax.train.data import SyntheticTask
    from moe_jax.train.loop import train
    from moe_jax.verify import verify
    from moe_jax.viz import draw_loss, draw_mesh

    layout = os.path.join(MESHES, f"{args.layout}.yaml")
    cfg = load_config(args.config or config_for(args.layout), layout, [*args.overrides, f"run.steps={args.steps}"])
    mesh = _setup_devices(args, cfg)
    console = Console(width=max(Console().width, 110))
    lay = cfg.layout
    os.makedirs(args.out, exist_ok=True)
    table = assignment(cfg, mesh)
    console.rule("[bold]moe_jax demo[/bold]")
    console.print(f"model: {cfg.model.layers} layers, {cfg.model.experts} experts (top-{cfg.model.top_k}), width "
                  f"{cfg.model.d_model}, {total_params(cfg.model):,} parameters; layout {lay.name}: pp {lay.pp} x dp "
                  f"{lay.dp} x ep {lay.ep} x tp {lay.tp} on {lay.devices} fake CPU devices")  # fmt: skip
    seed = load_config(None, None)
    console.print(f"(the seed's full-size model has {escape(param_formula(seed.model))} parameters, not the 30B it "
                  "claims: moe-jax audit)")  # fmt: skip
    for s in range(lay.pp):
        devs = [d for d in table["devices"] if d["coords"]["pp"] == s]
        console.print(f"  stage {s}: layers {devs[0]['layers']}, devices {[d['id'] for d in devs]}; "
                      + "; ".join(f"dev {d['id']}: experts {d['experts'][0]}-{d['experts'][-1]}, heads "
                                  f"{d['heads'][0]}-{d['heads'][-1]}" for d in devs[:4]))  # fmt: skip
    draw_mesh(table, os.path.join(args.out, "mesh.png"))
    console.print("[bold]1. the sharded first step against one device[/bold]")
    check = verify(cfg, mesh, seed=cfg.run.seed)
    worst = max(check["errors"].items(), key=lambda kv: kv[1])
    console.print(f"  loss {check['loss']:.6f} vs {check['reference_loss']:.6f}; largest relative error {worst[1]:.1e}"
                  f" ({worst[0]}), tolerance {check['tolerance']:.0e}: " + ("[green]equal[/green]" if check["ok"]
                  else "[red]differ[/red]"))  # fmt: skip
    source = SyntheticTask(cfg.model.vocab, cfg.run.seq_len, cfg.run.seed)
    console.print(f"[bold]2. training {args.steps} steps[/bold] on the {escape(source.describe())}")
    progress, on_step = _progress(console, args.steps)
    with progress:
        import shutil

        checkpoint = os.path.join(args.out, "checkpoint")
        shutil.rmtree(checkpoint, ignore_errors=True)
        state, records = train(cfg, mesh, source, args.steps, metrics_path=os.path.join(args.out, "metrics.jsonl"),
                               checkpoint_dir=checkpoint, checkpoint_every=args.steps, on_step=on_step)  # fmt: skip
    # The trained model at work: held-out sequences of the task (a step the training never drew), each prompted with
    # its rule id and first two tokens and continued greedily on the mesh (prefill, then KV-cache decode).
    prompt_len = 3
    held_out, _ = source.rows(HELD_OUT_STEP, cfg.run.batch)
    srv = ServeModel.build(cfg, mesh, max_len=cfg.run.seq_len)
    new, right = continue_sequences(srv, state.params, state.rest, held_out, prompt_len)
    row = int(np.argmax(right.sum(axis=1)))
    example = held_out[row, :prompt_len].tolist()
    console.print(f"[bold]3. the trained model continues {len(held_out)} held-out sequences[/bold] (prompt: rule id and "
                  f"first two tokens, then {new.shape[1]} greedy tokens): {int(right.sum())} of {right.size} tokens "
                  f"right ({right.mean():.0%}; chance {1 / cfg.model.vocab:.0%})")  # fmt: skip
    console.print(f"  e.g. rule {example[0]}: {example} -> {new[row].tolist()}; the rule gives "
                  f"{held_out[row, prompt_len:].tolist()} ({int(right[row].sum())} of {new.shape[1]} right)")  # fmt: skip
    chance = float(np.log(cfg.model.vocab))
    draw_loss(records, os.path.join(args.out, "loss.png"), f"{lay.name}, tiny model, synthetic task", chance)
    first, last = records[0], records[-1]
    steady = sorted(r["tokens_per_s"] for r in records[2:]) or [first["tokens_per_s"]]
    console.rule("[bold]summary[/bold]")
    console.print(f"  check against one device: {'equal' if check['ok'] else 'DIFFER'} (worst {worst[1]:.1e})")
    console.print(f"  loss {first['loss']:.3f} -> {last['loss']:.3f} in {last['step']} steps (chance {chance:.2f}); "
                  f"median {steady[len(steady) // 2]:,.0f} tokens/s on fake CPU devices")  # fmt: skip
    console.print(f"  last step: max/mean expert load {last['max_over_mean_load']:.2f}, dropped "
                  f"{last['dropped_share']:.1%}, router loss {last['router_loss']:.4f}")  # fmt: skip
    console.print(f"  held-out continuations: {int(right.sum())} of {right.size} tokens right")
    command = ["moe-jax", "generate", "--prompt-tokens", ",".join(map(str, example)), "--max-new", str(new.shape[1])]
    if checkpoint != DEMO_CHECKPOINT or args.config:  # else generate finds the demo's checkpoint by itself
        command[2:2] = ["--checkpoint", checkpoint]
    if args.config:
        command += ["--config", args.config]
    if args.layout != DEMO_LAYOUT:
        command += ["--layout", os.path.relpath(layout)]
    command += list(args.overrides)
    console.print(f"  wrote {args.out}/mesh.png, {args.out}/loss.png, {args.out}/metrics.jsonl and the trained model "
                  f"in {checkpoint}")  # fmt: skip
    console.print(f"  continue a prompt with it: {escape(' '.join(command))}", soft_wrap=True)
    for line in DEMO_NEXT:
        console.print(f"  next: {line}", soft_wrap=True)
    return 0 if check["ok"] else 1


def cmd_generate(args) -> int:
    import jax
    import numpy as np
    from rich.console import Console

    from moe_jax.layouts import CONFIGS, MESHES
    from moe_jax.serve.generate import check_lengths, generate
    from moe_jax.serve.step import ServeModel
    from moe_jax.train.checkpoint import Checkpoints, read_meta
    from moe_jax.train.step import init_train_state, make_optimizer

    if args.hf and args.checkpoint:
        raise ConfigError("--hf and --checkpoint: give one source of weights")
    if (args.prompt is None) == (args.prompt_tokens is None):
        raise ConfigError("give the prompt as text (--prompt) or as token ids (--prompt-tokens), one of the two")
    directory = args.checkpoint
    if directory is None and not args.hf and os.path.isdir(DEMO_CHECKPOINT) and args.config is None:
        directory = DEMO_CHECKPOINT  # the demo's tiny model; it restores onto any layout
    saved = read_meta(directory) if directory else None
    tokenizer_text = None
    if args.hf:
        from moe_jax.hf import config_from_hf, read_tokenizer_files

        cfg, _ = config_from_hf(args.hf, args.config, args.layout, args.overrides)
        tokenizer_text, where = read_tokenizer_files(args.hf).get("tokenizer.json"), args.hf
    elif saved is not None and args.config is None and directory != DEMO_CHECKPOINT:
        # a checkpoint's own model (an imported one, or any other): no --config needed
        cfg = load_config(None, args.layout, args.overrides, base=saved["config"])
        tokenizer_text, where = saved.get("hf_files", {}).get("tokenizer.json"), directory
    else:
        # Defaults: the demo's tiny model and layout (and its trained weights when the demo has run).
        config = args.config or os.path.join(CONFIGS, "tiny.yaml")
        layout = args.layout or os.path.join(MESHES, "cpu8-pp2-ep2-tp2.yaml")
        cfg = load_config(config, layout, args.overrides)
        where = directory or "this model"
    tokenizer = None
    if args.prompt is not None:
        from moe_jax.hf import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_text, where)
        prompt = tokenizer.encode(args.prompt).ids
        if not prompt:
            raise ConfigError(f"--prompt={args.prompt!r}: the tokenizer makes no tokens of it")
    else:
        try:
            prompt = [int(x) for x in args.prompt_tokens.replace(",", " ").split()]
        except ValueError:
            raise ConfigError(f"--prompt-tokens={args.prompt_tokens!r}: expected token ids like 3,14,15") from None
        if not prompt:
            raise ConfigError("--prompt-tokens='': give at least one token id")
    lay = cfg.layout
    lay_min = lay.dp * lay.ep * lay.microbatches
    batch = args.batch if args.batch is not None else lay_min
    if batch < 1 or batch % lay_min:
        raise ConfigError(f"--batch={batch}: must be a positive multiple of layout.dp x layout.ep x "
                          f"layout.microbatches = {lay_min}")  # fmt: skip
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, batch=batch))
    check_lengths(len(prompt), args.max_new, cfg.model.max_seq_len)
    mesh = _setup_devices(args, cfg)
    srv = ServeModel.build(cfg, mesh, max_len=len(prompt) + args.max_new)
    sm = srv.sm
    console = Console(quiet=jax.process_index() != 0)
    if args.hf:
        from moe_jax.hf.checkpoint import import_state

        params, rest, _ = import_state(sm, args.hf, cfg.run.seed)
        console.print(f"weights: Hugging Face checkpoint {args.hf}")
    else:
        template = init_train_state(sm, make_optimizer(cfg.run), cfg.run.seed)
        if directory:
            state = Checkpoints(directory).restore(sm, template)
            console.print(f"weights: checkpoint {directory} at step {state.step}")
        else:
            state = template
            why = "--config given" if args.config else f"no demo checkpoint at {DEMO_CHECKPOINT}"
            console.print(f"weights: fresh (no --checkpoint given; {why})")
        params, rest = state.params, state.rest
    prompts = np.tile(np.asarray(prompt, np.int32), (batch, 1))
    tokens, timing = generate(srv, params, rest, prompts, args.max_new, args.temperature, args.top_k, args.seed)
    for row in tokens[: args.show]:
        if tokenizer is not None:
            console.print(f"{args.prompt} -> {tokenizer.decode(row.tolist(), skip_special_tokens=True)}", markup=False)
        else:
            console.print(f"{prompt} -> {row.tolist()}")
    console.print(f"prefill {timing['prefill_s'] * 1e3:.0f} ms (compile included); {timing['decode_steps']} decode "
                  f"steps, after the first (compile): {timing['decode_tokens_per_s']:,.0f} tokens/s (batch {batch})")  # fmt: skip
    return 0


def cmd_import_hf(args) -> int:
    import jax
    from rich.console import Console

    from moe_jax.hf import config_from_hf, read_tokenizer_files
    from moe_jax.hf.checkpoint import import_state, prepare_out, replace_dir, rest_shapes
    from moe_jax.hf.families import family_of
    from moe_jax.model.params import total_params
    from moe_jax.parallel.sharded import ShardedModel
    from moe_jax.train.checkpoint import Checkpoints

    cfg, hf = config_from_hf(args.dir, args.config, args.layout, args.overrides)
    prepare_out(args.out, args.force)
    mesh = _setup_devices(args, cfg)
    console = Console(quiet=jax.process_index() != 0)
    sm = ShardedModel.build(cfg, mesh)
    params, rest, tensors = import_state(sm, args.dir, cfg.run.seed)
    family = family_of(hf, args.dir)
    counted = total_params(cfg.model) + (sum(math.prod(s) for s in rest_shapes(cfg).values()) if family.rest else 0)
    below = cfg.model.layers if family.extra_layers_ok else None
    if counted != tensors.total_elements(below):  # the tables and the config agree on every tensor; this is the sum
        raise ConfigError(f"{args.dir}: {tensors.total_elements(below):,} elements in the safetensors, the model has "
                          f"{counted:,} parameters")  # fmt: skip
    out = os.path.abspath(args.out.rstrip("/"))
    tmp = f"{out}.partial"
    if jax.process_index() == 0 and os.path.exists(tmp):
        import shutil

        shutil.rmtree(tmp)
    Checkpoints(tmp, every=1, keep=1).save_weights(
        sm, cfg, params, rest, {"hf_config": hf, "hf_files": read_tokenizer_files(args.dir)}
    )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("import-hf written")
    if jax.process_index() == 0:
        replace_dir(tmp, out)
    lay = cfg.layout
    console.print(f"import-hf: {hf['model_type']} from {args.dir}: {len(tensors.shapes)} tensors, {counted:,} "
                  f"parameters, read into the shards of pp {lay.pp}, dp {lay.dp}, ep {lay.ep}, tp {lay.tp} "
                  f"({lay.devices} devices)")  # fmt: skip
    console.print(f"wrote {args.out}: a weights-only checkpoint (step 0) that restores onto any layout")
    console.print(f"  next: moe-jax generate --checkpoint {args.out} --prompt-tokens 1,2,3", soft_wrap=True)
    return 0


def cmd_export_hf(args) -> int:
    from rich.console import Console

    from moe_jax.hf.checkpoint import export, parse_size, prepare_out
    from moe_jax.hf.families import FAMILIES, family_for_model
    from moe_jax.parallel.sharded import ShardedModel
    from moe_jax.train.checkpoint import Checkpoints, read_meta
    from moe_jax.train.step import init_train_state, make_optimizer

    max_bytes = parse_size(args.max_shard_size)
    prepare_out(args.out, args.force)
    saved = read_meta(args.checkpoint)  # before JAX starts: the saved layout sets the device count
    if saved is None:
        raise ConfigError(f"{args.checkpoint}: no such checkpoint directory, or no complete checkpoint in it")
    cfg = load_config(None, args.layout, args.overrides, base=saved["config"])
    base = saved.get("hf_config")
    family = FAMILIES[args.model_type] if args.model_type else (
        FAMILIES[base["model_type"]] if base else family_for_model(cfg.model)
    )  # fmt: skip
    mesh = _setup_devices(args, cfg)
    sm = ShardedModel.build(cfg, mesh)
    state = Checkpoints(args.checkpoint).restore(sm, init_train_state(sm, make_optimizer(cfg.run), cfg.run.seed))
    summary = export(sm, state.params, args.out, family, args.dtype, max_bytes, base, saved.get("hf_files"),
                     args.force, rest=state.rest)  # fmt: skip
    Console().print(f"export-hf: {family.model_type} ({family.architecture}) from {args.checkpoint} step "
                    f"{state.step}: {summary['tensors']} tensors, {summary['bytes'] / 1e6:,.1f} MB of {args.dtype} "
                    f"in {len(summary['files'])} file(s) -> {args.out}")  # fmt: skip
    return 0


DEMO_CHECKPOINT = os.path.join("out", "demo", "checkpoint")
DEMO_LAYOUT = "cpu8-pp2-ep2-tp2"
HELD_OUT_STEP = 10**6  # the synthetic task's batches are a function of the step: training never reaches this one
# What the demo suggests next; a test runs each as printed.
DEMO_NEXT = (
    "moe-jax mesh   (the seed's model on seed-128: every device's layers, experts, heads and groups)",
    "moe-jax plan --devices 128 --search   (every 128-device layout ranked by estimated step time)",
    "moe-jax compile --layout meshes/seed-128.yaml   (the full train step compiled on 128 fake devices)",
    "moe-jax audit   (the seed's claims checked, written to docs/seed-audit.md)",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mesh", help="the exact device assignment of a layout: table, JSON and picture")
    _add_config_args(p)
    _add_device_args(p)
    p.add_argument("--json", help="write the assignment JSON here")
    p.add_argument("--png", help="draw the mesh picture here")
    p.add_argument("--full", action="store_true", help="list every group instead of the first and last few")
    p.add_argument("--no-check", action="store_true", help="skip the check against JAX's placement of every parameter")
    p.add_argument("--width", type=int, help="terminal width for the table")
    _add_distributed_args(p)
    p.set_defaults(func=cmd_mesh, outputs={"json": False, "png": False})

    p = sub.add_parser("verify", help="one train step sharded and on one device: loss, router terms, gradients")
    _add_config_args(p)
    _add_device_args(p)
    p.add_argument("--json", help="write the errors here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perturb", type=float, help=argparse.SUPPRESS)  # self-test: shows the check can fail
    p.set_defaults(func=cmd_verify, outputs={"json": False})

    p = sub.add_parser("train", help="train on the mesh: synthetic task by default, or --data token files")
    _add_config_args(p)
    _add_device_args(p)
    p.add_argument("--steps", type=int, help="the run's length, run.steps: it also sets the learning-rate schedule")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="end this invocation at STEP (checkpointed) without changing the run; --resume continues it")  # fmt: skip
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept a model or run config that differs from the checkpoint's")  # fmt: skip
    p.add_argument("--data", help="token file: .npy, or .bin of uint16 / uint32 (default: the synthetic task)")
    p.add_argument("--data-dtype", default="uint16", help="token dtype of a .bin file: uint16 or uint32")
    p.add_argument("--metrics", help="write one JSON line per step here")
    p.add_argument("--checkpoint-dir")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--init-from-hf", metavar="DIR",
                   help="start from a Hugging Face checkpoint's weights (its config.json is the model)")  # fmt: skip
    p.add_argument("--profile", help="write a jax.profiler trace of steps 3-5 here")
    _add_distributed_args(p)
    p.set_defaults(func=cmd_train, outputs={"metrics": False, "checkpoint_dir": True, "profile": True})

    p = sub.add_parser(
        "demo", help="the main job: assignment, a check against one device, training, generation, pictures"
    )
    p.add_argument("--config", help="default: the tiny config")
    p.add_argument("--layout", default=DEMO_LAYOUT, help="a layout name from meshes/")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    _add_device_args(p)
    p.add_argument("--steps", type=int, default=150, help="training steps (150 learn the task to about 94%%)")
    p.add_argument("--out", default="out/demo", help="pictures and metrics go here")
    p.set_defaults(func=cmd_demo, outputs={"out": True})

    p = sub.add_parser("generate", help="prefill a prompt and decode on the mesh, greedy or sampled")
    p.add_argument("--config", help="default: the weights' own model (the tiny config's for the demo checkpoint)")
    p.add_argument("--layout", help="default: one device with --hf, the checkpoint's own, else the demo's layout")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    _add_device_args(p)
    p.add_argument("--checkpoint", help="a checkpoint directory of `moe-jax train` or `import-hf` (default: the "
                                        "demo's, if any)")  # fmt: skip
    p.add_argument("--hf", metavar="DIR", help="a Hugging Face checkpoint directory, read straight into the shards")
    p.add_argument("--prompt", help="text, tokenized with the checkpoint's tokenizer.json; the output is text")
    p.add_argument("--prompt-tokens", help="token ids, e.g. 3,14,15")
    p.add_argument("--max-new", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--batch", type=int, help="sequences (copies of the prompt); default: the layout's minimum")
    p.add_argument("--show", type=int, default=4, help="rows to print")
    p.add_argument("--seed", type=int, default=0)
    _add_distributed_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("import-hf", help="a Hugging Face checkpoint (Mixtral, Qwen3-MoE, OLMoE, Qwen1.5/2-MoE) -> a "
                                         "moe_jax checkpoint, each device reading only its own slices")  # fmt: skip
    p.add_argument("dir", help="the Hugging Face directory: config.json and *.safetensors (an index if sharded)")
    p.add_argument("--out", required=True, help="the checkpoint directory to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--config", help="a run section to keep with the weights (default: config.json's dtype)")
    p.add_argument("--layout", help="the layout whose shards are read (default: one device)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    _add_device_args(p)
    _add_distributed_args(p)
    p.set_defaults(func=cmd_import_hf, outputs={"out": True})

    p = sub.add_parser("export-hf", help="a moe_jax checkpoint -> a Hugging Face directory that transformers loads")
    p.add_argument("checkpoint", help="a checkpoint directory of `moe-jax train` or `import-hf`")
    p.add_argument("--out", required=True, help="the directory to write: config.json, safetensors (+ index)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--max-shard-size", default="5GB", help="split the safetensors above this size (default 5GB)")
    p.add_argument("--model-type", choices=("mixtral", "qwen3_moe", "olmoe", "qwen2_moe"),
                   help="the family to write (default: the imported one, else the one the architecture matches)")  # fmt: skip
    p.add_argument("--layout", help="the layout to restore onto (default: the checkpoint's own)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    _add_device_args(p)
    p.set_defaults(func=cmd_export_hf, outputs={"out": True})

    p = sub.add_parser("compile", help="compile a step for the layout on fake devices: memory, FLOPs, collectives")
    _add_config_args(p)
    _add_device_args(p)
    p.add_argument("--step", default="train", choices=("train", "prefill", "decode"))
    p.add_argument("--dump", help="write the HLO before and after optimisation and XLA's buffer assignment here")
    p.add_argument("--json")
    p.set_defaults(func=cmd_compile, outputs={"dump": True, "json": False})

    p = sub.add_parser("plan", help="the analytic plan of a layout, or --search every layout of --devices N")
    _add_config_args(p)
    p.add_argument("--hardware", default="seed", help=", ".join(PROFILES))
    p.add_argument("--step", default="train", choices=("train", "prefill", "decode"))
    p.add_argument("--devices", type=int, help="the device count (checked against the layout; needed by --search)")
    p.add_argument("--search", action="store_true")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--check", action="store_true",
                   help="compile the layout on fake devices and print plan and compiler side by side, part by part; "
                        "exit 1 when a part, the total or the FLOPs differ by more than --tolerance")  # fmt: skip
    p.add_argument("--tolerance", type=float, default=5.0, help="percent, for --check (default 5)")
    p.add_argument("--json")
    p.set_defaults(func=cmd_plan, outputs={"json": False}, real=False)

    p = sub.add_parser("audit", help="check every claim of the design seed; writes docs/seed-audit.md")
    p.add_argument("--out", default="docs/seed-audit.md")
    p.set_defaults(func=cmd_audit, outputs={"out": False})

    p = sub.add_parser("schedule", help="a pipeline schedule: ticks, utilisation, memory, and its chart")
    p.add_argument("--pp", type=int, required=True)
    p.add_argument("--microbatches", type=int, required=True)
    p.add_argument("--repeats", type=int, default=1, help="circular repeats v (default 1: contiguous stages)")
    p.add_argument("--layers", type=int, help="layers, for the per-tick memory figures")
    p.add_argument("--remat", default="layer", choices=("none", "tick", "layer"))
    p.add_argument("--schedule", default="gpipe", choices=("gpipe", "1f1b"),
                   help="gpipe, or 1f1b (interleaved with --repeats > 1)")  # fmt: skip
    p.add_argument("--json")
    p.add_argument("--png")
    p.set_defaults(func=cmd_schedule, outputs={"json": False, "png": False})

    p = sub.add_parser("hlo", help="the train step's HLO and the audit of its collectives against the expected set")
    _add_config_args(p)
    _add_device_args(p)
    p.add_argument("--out", help="write before/after_optimizations.hlo.txt here")
    p.add_argument("--json", help="write the collective table and the audit here")
    p.set_defaults(func=cmd_hlo, outputs={"out": True, "json": False})
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after an option that follows a positional (import-hf DIR --out X key=value)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        _check_outputs(args)
        return args.func(args)
    except ConfigError as e:
        print(f"moe-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that could not be read or written after the checks (full disk, removed directory)
        where = f" {e.filename!r}:" if e.filename else ""
        print(f"moe-jax {args.command}: error:{where} {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
