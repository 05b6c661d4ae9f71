"""`moe-jax demo`, the main job on its embedded default: the tiny model on 8 fake CPU devices (pp 2 x ep 2 x tp 2).
It shows the device assignment, checks the sharded first step against one device, trains on the synthetic task,
continues held-out sequences on the mesh with the trained model, and writes the pictures, the metrics and the model."""

from __future__ import annotations

import os
import shutil

import numpy as np
from rich.console import Console
from rich.markup import escape

from moe_jax.config import Config
from moe_jax.layouts import DEMO_CHECKPOINT, DEMO_LAYOUT
from moe_jax.load import load_config
from moe_jax.mesh import assignment
from moe_jax.model.params import param_formula, total_params
from moe_jax.report import train_progress
from moe_jax.serve.generate import continue_sequences
from moe_jax.serve.step import ServeModel
from moe_jax.train.data import SyntheticTask
from moe_jax.train.loop import train
from moe_jax.verify import verify
from moe_jax.viz import draw_loss, draw_mesh

HELD_OUT_STEP = 10**6  # the synthetic task's batches are a function of the step: training never reaches this one
PROMPT_LEN = 3  # a held-out sequence's rule id and first two tokens
# What the demo suggests next; a test runs each as printed.
DEMO_NEXT = (
    "moe-jax mesh   (the seed's model on seed-128: every device's layers, experts, heads and groups)",
    "moe-jax plan --devices 128 --search   (every 128-device layout ranked by estimated step time)",
    "moe-jax compile --layout meshes/seed-128.yaml   (the full train step compiled on 128 fake devices)",
    "moe-jax audit   (the seed's claims checked, written to docs/seed-audit.md)",
)


def run_demo(cfg: Config, mesh, out: str, steps: int, console: Console) -> tuple[bool, dict]:
    """The scenario; returns (the check against one device passed, what the summary and the next command need)."""
    os.makedirs(out, exist_ok=True)
    console.rule("[bold]moe_jax demo[/bold]")
    _show_assignment(cfg, mesh, out, console)
    console.print("[bold]1. the sharded first step against one device[/bold]")
    check = verify(cfg, mesh, seed=cfg.run.seed)
    worst = max(check["errors"].items(), key=lambda kv: kv[1])
    console.print(
        f"  loss {check['loss']:.6f} vs {check['reference_loss']:.6f}; largest relative error {worst[1]:.1e}"
        f" ({worst[0]}), tolerance {check['tolerance']:.0e}: "
        + ("[green]equal[/green]" if check["ok"] else "[red]differ[/red]")
    )
    source = SyntheticTask(cfg.model.vocab, cfg.run.seq_len, cfg.run.seed)
    console.print(f"[bold]2. training {steps} steps[/bold] on the {escape(source.describe())}")
    progress, on_step = train_progress(console, steps)
    checkpoint = os.path.join(out, "checkpoint")
    with progress:
        shutil.rmtree(checkpoint, ignore_errors=True)
        state, records = train(
            cfg,
            mesh,
            source,
            steps,
            metrics_path=os.path.join(out, "metrics.jsonl"),
            checkpoint_dir=checkpoint,
            checkpoint_every=steps,
            on_step=on_step,
        )
    held = _continue_held_out(cfg, mesh, source, state, console)
    chance = float(np.log(cfg.model.vocab))
    draw_loss(records, os.path.join(out, "loss.png"), f"{cfg.layout.name}, tiny model, synthetic task", chance)
    return check["ok"], {
        "check": check,
        "worst": worst,
        "records": records,
        "chance": chance,
        "checkpoint": checkpoint,
        **held,
    }


def _show_assignment(cfg: Config, mesh, out: str, console: Console) -> None:
    lay = cfg.layout
    table = assignment(cfg, mesh)
    console.print(
        f"model: {cfg.model.layers} layers, {cfg.model.experts} experts (top-{cfg.model.top_k}), width "
        f"{cfg.model.d_model}, {total_params(cfg.model):,} parameters; layout {lay.name}: pp {lay.pp} x dp "
        f"{lay.dp} x ep {lay.ep} x tp {lay.tp} on {lay.devices} fake CPU devices"
    )
    seed = load_config(None, None)
    console.print(
        f"(the seed's full-size model has {escape(param_formula(seed.model))} parameters, not the 30B it "
        "claims: moe-jax audit)"
    )
    for s in range(lay.pp):
        devs = [d for d in table["devices"] if d["coords"]["pp"] == s]
        console.print(
            f"  stage {s}: layers {devs[0]['layers']}, devices {[d['id'] for d in devs]}; "
            + "; ".join(
                f"dev {d['id']}: experts {d['experts'][0]}-{d['experts'][-1]}, heads {d['heads'][0]}-{d['heads'][-1]}"
                for d in devs[:4]
            )
        )
    draw_mesh(table, os.path.join(out, "mesh.png"))


def _continue_held_out(cfg: Config, mesh, source: SyntheticTask, state, console: Console) -> dict:
    """The trained model at work: held-out sequences of the task (a step the training never drew), each prompted with
    its rule id and first two tokens and continued greedily on the mesh (prefill, then KV-cache decode)."""
    held_out, _ = source.rows(HELD_OUT_STEP, cfg.run.batch)
    srv = ServeModel.build(cfg, mesh, max_len=cfg.run.seq_len)
    new, right = continue_sequences(srv, state.params, state.rest, held_out, PROMPT_LEN)
    row = int(np.argmax(right.sum(axis=1)))
    example = held_out[row, :PROMPT_LEN].tolist()
    console.print(
        f"[bold]3. the trained model continues {len(held_out)} held-out sequences[/bold] (prompt: rule id and "
        f"first two tokens, then {new.shape[1]} greedy tokens): {int(right.sum())} of {right.size} tokens "
        f"right ({right.mean():.0%}; chance {1 / cfg.model.vocab:.0%})"
    )
    console.print(
        f"  e.g. rule {example[0]}: {example} -> {new[row].tolist()}; the rule gives "
        f"{held_out[row, PROMPT_LEN:].tolist()} ({int(right[row].sum())} of {new.shape[1]} right)"
    )
    return {"example": example, "new": new, "right": right}


def print_summary(console: Console, out: str, r: dict, generate_command: list[str]) -> None:
    first, last = r["records"][0], r["records"][-1]
    steady = sorted(x["tokens_per_s"] for x in r["records"][2:]) or [first["tokens_per_s"]]
    right, worst = r["right"], r["worst"]
    console.rule("[bold]summary[/bold]")
    console.print(f"  check against one device: {'equal' if r['check']['ok'] else 'DIFFER'} (worst {worst[1]:.1e})")
    console.print(
        f"  loss {first['loss']:.3f} -> {last['loss']:.3f} in {last['step']} steps (chance {r['chance']:.2f}); "
        f"median {steady[len(steady) // 2]:,.0f} tokens/s on fake CPU devices"
    )
    console.print(
        f"  last step: max/mean expert load {last['max_over_mean_load']:.2f}, dropped "
        f"{last['dropped_share']:.1%}, router loss {last['router_loss']:.4f}"
    )
    console.print(f"  held-out continuations: {int(right.sum())} of {right.size} tokens right")
    console.print(
        f"  wrote {out}/mesh.png, {out}/loss.png, {out}/metrics.jsonl and the trained model in {r['checkpoint']}"
    )
    console.print(f"  continue a prompt with it: {escape(' '.join(generate_command))}", soft_wrap=True)
    for line in DEMO_NEXT:
        console.print(f"  next: {line}", soft_wrap=True)


def generate_command(r: dict, config: str | None, layout: str, layout_path: str, overrides) -> list[str]:
    """The `moe-jax generate` line that continues the demo's example prompt with the trained model."""
    command = [
        "moe-jax",
        "generate",
        "--prompt-tokens",
        ",".join(map(str, r["example"])),
        "--max-new",
        str(r["new"].shape[1]),
    ]
    if r["checkpoint"] != DEMO_CHECKPOINT or config:  # else generate finds the demo's checkpoint by itself
        command[2:2] = ["--checkpoint", r["checkpoint"]]
    if config:
        command += ["--config", config]
    if layout != DEMO_LAYOUT:
        command += ["--layout", os.path.relpath(layout_path)]
    return command + list(overrides)
