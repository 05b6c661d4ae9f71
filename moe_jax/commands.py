"""The commands of `moe-jax`: each takes its parsed arguments, calls one function of the modules below and prints
what it returns (report.py, plan/report.py). cli.py parses and dispatches here."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from rich.console import Console

from moe_jax import demo
from moe_jax.compile import compile_report
from moe_jax.config import Config, ConfigError, check_devices, storage_model
from moe_jax.distributed import lost_peer_message
from moe_jax.hf import config_from_hf, import_checkpoint, is_hf_config
from moe_jax.hf.checkpoint import export, import_state, parse_size, prepare_out
from moe_jax.hf.families import FAMILIES, family_for_model, supported_by
from moe_jax.hlo import audit
from moe_jax.layouts import DEMO_LAYOUT, MESHES, config_for
from moe_jax.load import load_config
from moe_jax.mesh import assignment, check_placement, setup_devices
from moe_jax.model.transformer import param_table
from moe_jax.parallel.schedule import Schedule
from moe_jax.parallel.sharded import ShardedModel, mesh_platform
from moe_jax.parallel.step import lower_step
from moe_jax.plan.audit import claims, markdown
from moe_jax.plan.check import compare, compiled_figures
from moe_jax.plan.hardware import get_hardware
from moe_jax.plan.model import plan, serve_plan
from moe_jax.plan.report import print_plan, print_plan_check, print_search, print_serve_plan
from moe_jax.plan.search import search
from moe_jax.report import (
    make_console,
    print_assignment,
    print_compile,
    print_hlo_audit,
    print_schedule,
    print_verify,
    train_progress,
    write_json,
    write_texts,
)
from moe_jax.serve import inputs
from moe_jax.serve.generate import check_lengths, generate
from moe_jax.serve.step import ServeModel
from moe_jax.target import Target, compiler_options, parse_target
from moe_jax.train.checkpoint import Checkpoints, read_meta
from moe_jax.train.data import make_source
from moe_jax.train.loop import Stopped, train
from moe_jax.train.step import init_train_state, make_optimizer
from moe_jax.verify import perturb_one_gradient, verify
from moe_jax.viz import draw_mesh, draw_schedule


def _config(args, check: bool = True, with_layout: bool = True) -> Config:
    """The command's config: --hf DIR (or a config.json given as --config) is the model, with --config's run and
    layout; else --config and --layout as YAML files. `with_layout=False`: --layout left out (the search's)."""
    hf, config = getattr(args, "hf", None), args.config
    layout = args.layout if with_layout else None
    if hf is None and config is not None and is_hf_config(config):
        hf, config = config, None
    if hf is not None:
        return config_from_hf(hf, config, layout, args.overrides, check=check)[0]
    return load_config(config, layout, args.overrides, check=check)


def _target(args) -> Target | None:
    return parse_target(getattr(args, "target", None), getattr(args, "slices", 1))


def _devices(args, cfg: Config, compile_only: bool = False):
    """The mesh on the devices the command's flags ask for (mesh.setup_devices)."""
    dist = None
    if getattr(args, "coordinator", None) or getattr(args, "distributed", False):
        dist = {
            "coordinator": args.coordinator,
            "num_processes": args.num_processes,
            "process_id": args.process_id,
            "local_devices": args.local_devices,
            "timeout": args.init_timeout,
            "heartbeat": args.heartbeat_timeout,
            "auto": args.distributed,
        }
    return setup_devices(cfg, args.real, args.devices, compile_only, dist, _target(args))


def _json(args, data) -> None:
    """Writes --json from process 0. A command that set up no devices (plan, schedule) is one process, and asking
    JAX which one it is would start its backends (libtpu, where installed, prints its warnings doing so)."""
    if args.json and (jax.config.jax_platforms is None or jax.process_index() == 0):
        write_json(args.json, data)


def _fits(p: dict) -> int:
    """Exit status 2 with one line when the plan does not fit its device's memory."""
    if p["fits"]:
        return 0
    need, have = p["memory_per_device_bytes"]["total"] / 1e9, p["hbm_bytes"] / 1e9
    print(f"moe-jax plan: error: does not fit: needs {need:.1f} GB per device, has {have:.0f}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------------------ commands


def cmd_mesh(args) -> int:
    cfg = _config(args)
    mesh = _devices(args, cfg)
    table = assignment(cfg, mesh)
    if jax.process_count() > 1:  # every process states what JAX placed on it, for the record (and the tests)
        local = sorted(d.id for d in jax.local_devices())
        print(f"process {jax.process_index()} of {jax.process_count()} holds devices {local}", flush=True)
    console = make_console(100, args.width, quiet=jax.process_index() != 0)
    print_assignment(console, table, full=args.full)
    if not args.no_check:
        names, shapes = param_table(storage_model(cfg))  # as stored: uneven stages' padding included
        n = check_placement(cfg, mesh, names, shapes)
        console.print(
            f"placement check: {len(names)} parameters x {cfg.layout.devices} devices = {n} shards, each "
            "equal to JAX's devices_indices_map"
        )
    _json(args, table)
    if args.png and jax.process_index() == 0:
        draw_mesh(table, args.png)
    for path in filter(None, (args.json, args.png)):
        console.print(f"wrote {path}")
    return 0


def cmd_verify(args) -> int:
    cfg = _config(args)
    mesh = _devices(args, cfg)
    perturb = perturb_one_gradient(args.perturb) if args.perturb else None
    result = verify(cfg, mesh, seed=args.seed, perturb=perturb)
    print_verify(make_console(), cfg, result)
    _json(args, result)
    return 0 if result["ok"] else 1


def cmd_hlo(args) -> int:
    cfg = _config(args)
    mesh = _devices(args, cfg, compile_only=True)
    lowered = lower_step(ShardedModel.build(cfg, mesh))
    platform = mesh_platform(mesh)
    before, after = lowered.as_text(dialect="hlo"), lowered.compile(compiler_options(platform)).as_text()
    console = make_console()
    if args.out:
        console.print(
            write_texts(args.out, {"before_optimizations.hlo.txt": before, "after_optimizations.hlo.txt": after})
        )
    result = audit(before, after, cfg, assignment(cfg, mesh), platform=platform)
    print_hlo_audit(console, result)
    _json(args, result)
    return 0 if result["ok"] else 1


def cmd_schedule(args) -> int:
    sched = Schedule(args.pp, args.microbatches, args.repeats, args.layers, args.remat, args.schedule)
    console = make_console()
    print_schedule(console, sched)
    _json(args, sched.to_json())
    if args.png:
        draw_schedule(sched, args.png)
        console.print(f"wrote {args.png}")
    return 0


def cmd_compile(args) -> int:
    cfg = _config(args)
    mesh = _devices(args, cfg, compile_only=True)
    report, lowered, compiled = compile_report(cfg, mesh, args.step, bool(args.dump), _target(args))
    console = make_console()
    if args.dump:
        console.print(
            write_texts(
                args.dump,
                {
                    "before_optimizations.hlo.txt": lowered.as_text(dialect="hlo"),
                    "after_optimizations.hlo.txt": compiled.as_text(),
                    "buffer_assignment.txt": report.pop("xla_dump")["assignment"],
                },
            )
        )
    print_compile(console, cfg, args.step, report)
    _json(args, report)
    return 0 if report["audit_ok"] else 1


def cmd_plan(args) -> int:
    hw = get_hardware(args.hardware)
    _target(args)  # a misspelt --target is refused even where only --check would use it
    console = make_console(140 if args.search else 120)  # the ranked table's 18 columns
    if args.check and (args.step != "train" or args.search):
        raise ConfigError("--check: checks the train step of one layout; leave out --search and --step")
    if args.search:
        if args.devices is None:
            raise ConfigError("--search needs --devices N: the device count to lay out")
        result = search(_config(args, check=False, with_layout=False), args.devices, hw)
        print_search(console, result, hw, args.devices, args.top)
        _json(args, result)
        return 0
    cfg = _config(args)
    if args.devices is not None:
        check_devices(cfg.layout, args.devices)
    if args.check:
        return _plan_check(args, cfg, console)
    if args.step != "train":
        p = serve_plan(cfg, hw, args.step)
        print_serve_plan(console, cfg, hw, args.step, p)
    else:
        p = plan(cfg, hw)
        print_plan(console, cfg, hw, p, seed_model=cfg.model == load_config(None, None).model)
    _json(args, p)
    return _fits(p)


def _plan_check(args, cfg: Config, console: Console) -> int:
    if not 0 < args.tolerance < 100:
        raise ConfigError(f"--tolerance={args.tolerance}: a percentage between 0 and 100")
    mesh = _devices(args, cfg, compile_only=True)
    lay, target = cfg.layout, _target(args)
    on = f"TPU {target.name} (the TPU compiler)" if target else f"{lay.devices} fake CPU devices"
    console.print(f"compiling the train step of {lay.name or 'the layout'} ({lay.summary(remat=True)}) on {on} ...")
    # XLA:CPU keeps bf16 intermediates in fp32 (plan.model.compiled_dtype_bytes); a TPU keeps them as they are
    backend = "accelerator" if target else "cpu"
    result = compare(cfg, compiled_figures(cfg, mesh), args.tolerance / 100, backend)
    print_plan_check(console, result)
    _json(args, result)
    for f in result["failures"]:
        print(f"moe-jax plan --check: beyond {args.tolerance:g}%: {f}", file=sys.stderr)
    if not result["failures"]:
        console.print(f"plan and compiler agree within {args.tolerance:g}%")
    return 1 if result["failures"] else 0


def cmd_audit(args) -> int:
    text = markdown(claims())
    write_texts(os.path.dirname(args.out) or ".", {os.path.basename(args.out): text})
    print(text)
    print(f"wrote {args.out}")
    return 0


def cmd_train(args) -> int:
    overrides = [*args.overrides, *([f"run.steps={args.steps}"] if args.steps is not None else [])]
    init_params = None
    if args.init_from_hf:
        cfg, _ = config_from_hf(args.init_from_hf, args.config, args.layout, overrides)

        def init_params(sm):
            return import_state(sm, args.init_from_hf, cfg.run.seed)[:2]  # the weights, and V3's routing bias
    else:
        cfg = load_config(args.config, args.layout, overrides)
    mesh = _devices(args, cfg)
    source = make_source(args.data, cfg.model.vocab, cfg.run.seq_len, cfg.run.seed, args.data_dtype)
    console = make_console(quiet=jax.process_index() != 0)
    console.print(
        f"train: {cfg.layout.name or 'layout'} ({cfg.layout.summary()}) on {cfg.layout.devices} devices; "
        f"data: {source.describe()}",
        markup=False,  # the task's description has brackets: x[t+1]
    )
    progress, on_step = train_progress(console, cfg.run.steps)
    try:
        with progress:
            state, records = train(
                cfg,
                mesh,
                source,
                cfg.run.steps,
                metrics_path=args.metrics,
                checkpoint_dir=args.checkpoint_dir,
                checkpoint_every=args.checkpoint_every,
                keep=args.keep,
                resume=args.resume,
                profile_dir=args.profile,
                on_step=on_step,
                stop_at=args.stop_at,
                allow_config_change=args.allow_config_change,
                init_params=init_params,
                on_note=lambda line: console.print(f"[yellow]{line}[/]", soft_wrap=True),
            )
    except Stopped as e:
        if e.records:
            console.print(_train_summary(e.records), soft_wrap=True)
        if e.status:
            if jax.process_index() == 0:
                print(f"moe-jax train: error: {e}", file=sys.stderr)
        else:  # every process says it (each one's log shows why it ended)
            print(e, flush=True)
        return e.status
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        print(f"moe-jax train: error: process {jax.process_index()}: {lost_peer_message(e)}", file=sys.stderr)
        return 1
    if records:
        console.print(_train_summary(records))
    else:
        console.print(
            f"nothing to do: the checkpoint is at step {state.step}, at or past step {args.stop_at or cfg.run.steps}"
        )
    if args.profile:
        console.print(f"wrote a jax.profiler trace to {args.profile}")
    return 0


def _train_summary(records: list[dict]) -> str:
    return (f"step {records[-1]['step']}: loss {records[-1]['loss']:.4f} (cross-entropy {records[-1]['ce']:.4f}); "
            f"{sum(r['skipped'] for r in records)} steps skipped for non-finite gradients")  # fmt: skip


def cmd_demo(args) -> int:
    name = args.layout or DEMO_LAYOUT
    layout = os.path.join(MESHES, f"{name}.yaml")
    cfg = load_config(args.config or config_for(name), layout, [*args.overrides, f"run.steps={args.steps}"])
    mesh = _devices(args, cfg)
    console = make_console(110)
    ok, result = demo.run_demo(cfg, mesh, args.out, args.steps, console)
    command = demo.generate_command(result, args.config, name, layout, args.overrides)
    demo.print_summary(console, args.out, result, command)
    return 0 if ok else 1


def cmd_generate(args) -> int:
    if args.hf and args.checkpoint:
        raise ConfigError("--hf and --checkpoint: give one source of weights")
    inputs.check_one_prompt(args.prompt, args.prompt_tokens)  # before any config is read, as prompt_ids checks later
    src = inputs.weights_source(args.hf, args.checkpoint, args.config, args.layout, args.overrides)
    prompt, tokenizer = inputs.prompt_ids(src, args.prompt, args.prompt_tokens)
    cfg = inputs.with_batch(src.cfg, args.batch)
    check_lengths(len(prompt), args.max_new, cfg.model.max_seq_len)
    srv = ServeModel.build(cfg, _devices(args, cfg), max_len=len(prompt) + args.max_new)
    console = make_console(quiet=jax.process_index() != 0)
    params, rest, where = inputs.load_weights(src, srv.sm)
    console.print(where)
    prompts = np.tile(np.asarray(prompt, np.int32), (cfg.run.batch, 1))
    tokens, timing = generate(srv, params, rest, prompts, args.max_new, args.temperature, args.top_k, args.seed)
    for row in tokens[: args.show]:
        if tokenizer is not None:
            console.print(f"{args.prompt} -> {tokenizer.decode(row.tolist(), skip_special_tokens=True)}", markup=False)
        else:
            console.print(f"{prompt} -> {row.tolist()}")
    console.print(
        f"prefill {timing['prefill_s'] * 1e3:.0f} ms (compile included); {timing['decode_steps']} decode "
        f"steps, after the first (compile): {timing['decode_tokens_per_s']:,.0f} tokens/s (batch "
        f"{cfg.run.batch})"
    )
    return 0


def cmd_import_hf(args) -> int:
    prepare_out(args.out, args.force, args.dir, "the Hugging Face directory")
    cfg, hf = config_from_hf(args.dir, args.config, args.layout, args.overrides)
    done = import_checkpoint(cfg, hf, args.dir, args.out, _devices(args, cfg))
    lay = cfg.layout
    console = make_console(quiet=jax.process_index() != 0)
    console.print(
        f"import-hf: {hf['model_type']} from {args.dir}: {done['tensors']} tensors, {done['parameters']:,} "
        f"parameters, read into the shards of pp {lay.pp}, dp {lay.dp}, ep {lay.ep}, tp {lay.tp} "
        f"({lay.devices} devices)"
    )
    console.print(f"wrote {args.out}: a weights-only checkpoint (step 0) that restores onto any layout")
    console.print(f"  next: moe-jax generate --checkpoint {args.out} --prompt-tokens 1,2,3", soft_wrap=True)
    return 0


def cmd_export_hf(args) -> int:
    max_bytes = parse_size(args.max_shard_size)
    prepare_out(args.out, args.force, args.checkpoint, "the checkpoint")
    saved = read_meta(args.checkpoint)  # before JAX starts: the saved layout sets the device count
    if saved is None:
        raise ConfigError(f"{args.checkpoint}: no such checkpoint directory, or no complete checkpoint in it")
    cfg = load_config(None, args.layout, args.overrides, base=saved["config"])
    base = saved.get("hf_config")
    family = FAMILIES[args.model_type or base["model_type"]] if args.model_type or base else family_for_model(cfg.model)
    why = supported_by(cfg.model, family)
    if why:
        raise ConfigError(f"--model-type={family.model_type}: {why}; the checkpoint lacks those tensors (it exports "
                          f"as {family_for_model(cfg.model).model_type})")  # fmt: skip
    sm = ShardedModel.build(cfg, _devices(args, cfg))
    state = Checkpoints(args.checkpoint).restore(sm, init_train_state(sm, make_optimizer(cfg.run), cfg.run.seed))
    summary = export(
        sm,
        state.params,
        args.out,
        family,
        args.dtype,
        max_bytes,
        base,
        saved.get("hf_files"),
        args.force,
        rest=state.rest,
    )
    make_console().print(
        f"export-hf: {family.model_type} ({family.architecture}) from {args.checkpoint} step "
        f"{state.step}: {summary['tensors']} tensors, {summary['bytes'] / 1e6:,.1f} MB of {args.dtype} "
        f"in {len(summary['files'])} file(s) -> {args.out}"
    )
    return 0


COMMANDS = {
    "mesh": cmd_mesh,
    "verify": cmd_verify,
    "train": cmd_train,
    "demo": cmd_demo,
    "generate": cmd_generate,
    "import-hf": cmd_import_hf,
    "export-hf": cmd_export_hf,
    "compile": cmd_compile,
    "plan": cmd_plan,
    "audit": cmd_audit,
    "schedule": cmd_schedule,
    "hlo": cmd_hlo,
}
