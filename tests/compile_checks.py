"""The suite's full-size, compile-only checks for one fake device count, run in ONE process per count by
tests/test_full_size.py: JAX starts its devices once and every program compiles once, then the test reads the JSON
this prints. Usage: python tests/compile_checks.py N (N = 32, 64, 128 or 512; JAX_NUM_CPU_DEVICES=N)."""

import copy
import json
import os
import sys

import numpy as np

from moe_jax.compile import compile_report
from moe_jax.config import storage_model
from moe_jax.hlo import audit, collectives
from moe_jax.layouts import load_pair
from moe_jax.load import load_config
from moe_jax.mesh import assignment, check_placement, make_mesh
from moe_jax.model.moe import capacity
from moe_jax.model.transformer import param_table
from moe_jax.parallel.sharded import ShardedModel
from moe_jax.parallel.step import lower_step
from moe_jax.sharding import MESH_AXES


def placement(name: str) -> dict:
    """Every parameter's shards against the assignment, groups against mesh coordinates, and a corrupted row."""
    cfg = load_pair(name)
    mesh = make_mesh(cfg.layout)
    table = assignment(cfg, mesh)
    names, shapes = param_table(storage_model(cfg))  # as stored: the vocabulary padded over tp
    n = check_placement(cfg, mesh, names, shapes, table)
    groups = {}
    for k, axis in enumerate(MESH_AXES):  # independent groups, from mesh coordinates alone
        buckets: dict[tuple, list[int]] = {}
        for idx in np.ndindex(mesh.devices.shape):
            buckets.setdefault(idx[:k] + idx[k + 1 :], []).append(mesh.devices[idx].id)
        groups[axis] = sorted(sorted(g) for g in buckets.values())
    wrong = copy.deepcopy(table)
    wrong["devices"][37]["experts"] = [e + 1 for e in wrong["devices"][37]["experts"]]
    try:
        check_placement(cfg, mesh, names, shapes, wrong)
        caught = False
    except AssertionError as e:
        caught = "device 37" in str(e)
    return {"checked": n, "groups": all(sorted(table["groups"][a]) == groups[a] for a in MESH_AXES),
            "caught": caught, "devices": table["devices"]}  # fmt: skip


def planned_vs_compiled(layout: str, seq: int, remat: str = "layer", dispatch: str = "capacity", extra=None) -> dict:
    """A point of the planner's accuracy grid (moe_jax/plan/accuracy.py): the train step compiled, its memory read
    part by part at the peak, FLOPs and collective bytes, against the plan (5% tolerance)."""
    from moe_jax.plan.accuracy import evaluate, point, point_config

    p = point(layout, seq, remat, dispatch, "fp16", extra)
    return evaluate(p, make_mesh(point_config(p).layout))


def plan_check_cli() -> dict:
    """`moe-jax plan --check` at seq 10240 as a user runs it, then with one planner part deliberately wrong."""
    import contextlib
    import io
    import tempfile

    from moe_jax import cli
    from moe_jax.plan import check

    report = os.path.join(tempfile.mkdtemp(), "check.json")
    args = ["plan", "--check", "--config", "configs/seed.yaml", "--layout", "meshes/seed-128.yaml",
            "run.seq_len=10240", "--json", report]  # fmt: skip

    def run() -> dict:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(args)
        return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}

    right = run()
    with open(report) as f:
        right["report"] = json.load(f)  # the grid point seed-128 s10240 layer capacity fp16
    real = check.memory  # as plan.check.compare looks it up

    def wrong(cfg, step="train", backend="accelerator"):
        out = dict(real(cfg, step, backend))
        out["saved_for_backward"] *= 2  # what remat 'layer' would keep with the residuals counted twice
        out["total"] += out["saved_for_backward"] // 2
        return out

    check.memory = wrong
    try:
        bad = run()  # the compiled step is cached: only the plan changes
    finally:
        check.memory = real
    return {"right": right, "wrong": bad}


def train_step(layout: str, overrides: list[str], step: str = "train") -> dict:
    """The compile report of a step (memory, FLOPs, the collective audit) of the seed's model."""
    cfg = load_config("configs/seed.yaml", layout, overrides)
    report, _, _ = compile_report(cfg, make_mesh(cfg.layout), step)
    return report


def grad_audit(layout: str, overrides: list[str]) -> dict:
    """The sharded gradient step's audit, and whether every replica group is a group of the assignment table."""
    cfg = load_config("configs/seed.yaml", layout, overrides)
    mesh = make_mesh(cfg.layout)
    lowered = lower_step(ShardedModel.build(cfg, mesh))
    compiled = lowered.compile()
    table = assignment(cfg, mesh)
    result = audit(lowered.as_text(dialect="hlo"), compiled.as_text(), cfg, table)
    groups = {frozenset(g) for gs in table["groups"].values() for g in gs}
    groups |= {frozenset(g) for e in table["grad_reduce_by_kind"].values() for g in e["groups"]}
    in_table = all(frozenset(g) in groups for c in collectives(compiled.as_text(), cfg.layout.shape) for g in c.groups)
    lay = cfg.layout
    tokens = cfg.run.batch // (lay.dp * lay.ep) * cfg.run.seq_len // lay.tp
    return {"ok": result["ok"], "unexpected": result["unexpected"], "collectives": result["collectives"],
            "in_table": in_table, "capacity": capacity(cfg.model, tokens)}  # fmt: skip


def preset(name: str, live: bool) -> dict:
    """A model family's preset on its layout of meshes/: every parameter's shards against the assignment, and the
    plan compared with the compiled train step (`moe-jax plan --check`'s comparison, 5%): compiled here when `live`,
    else the compiled figures committed by scripts/compile_presets.py (the current planner, no compile)."""
    from moe_jax.plan.check import compare, compiled_figures, compiled_from_row

    cfg = load_pair(name)
    mesh = make_mesh(cfg.layout)
    names, shapes = param_table(storage_model(cfg))  # as stored: the vocabulary padded over tp
    checked = check_placement(cfg, mesh, names, shapes)
    with open(os.path.join("docs", "results", "presets_64.json")) as f:
        committed = json.load(f)["presets"][name]
    compiled = compiled_figures(cfg, mesh) if live else compiled_from_row(committed)
    result = compare(cfg, compiled, 0.05)
    return dict(result, checked=checked, parameters=len(names), live=live, committed=committed)


PRESETS = ("mixtral-8x7b-64", "qwen3-30b-a3b-64", "olmoe-1b-7b-64", "qwen1.5-moe-a2.7b-64")
LIVE = ("mixtral-8x7b-64", "qwen1.5-moe-a2.7b-64")  # compiled in the suite; all four: scripts/compile_presets.py

CHECKS = {
    32: {"audit_seed32": lambda: grad_audit("meshes/seed-32.yaml", [])},
    64: {name: (lambda name=name: preset(name, name in LIVE)) for name in PRESETS},
    128: {
        "placement_seed128": lambda: placement("seed-128"),
        "plan_seed128_v4": lambda: planned_vs_compiled("seed-128", 2048, extra=["layout.repeats=4"]),
        "plan_check_cli": plan_check_cli,
        "audit_ep64": lambda: grad_audit("meshes/seed-32.yaml", ["layout.ep=64"]),
        "decode_seed128_10240": lambda: train_step("meshes/seed-128.yaml", ["run.seq_len=10240"], "decode"),
        "prefill_seed128_2048": lambda: train_step("meshes/seed-128.yaml", ["run.seq_len=2048"], "prefill"),
    },
    512: {
        "placement_seed512": lambda: placement("seed-512"),
        "plan_seed512": lambda: planned_vs_compiled("seed-512", 2048),
    },
}

if __name__ == "__main__":
    print(json.dumps({name: check() for name, check in CHECKS[int(sys.argv[1])].items()}))
