"""`moe-jax plan --check`: the plan of a layout beside what the compiler builds for it on fake devices, part by part.

Memory: the planner's parts (`plan.model.memory`) against the compiled train step's, the compiled step's buffers at
the temporary arena's peak named by `classify` (below) and its arguments by their paths. FLOPs: the planner's count
against the dots of the lowered program, loops counted. Communication: bytes per collective kind, equal or not.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from moe_jax.buffers import Buffer, peak_buffers
from moe_jax.collectives import bytes_by_kind, expected_collectives, local_sizes
from moe_jax.compile import compile_report
from moe_jax.config import Config, storage_model
from moe_jax.hlo import array_dims
from moe_jax.parallel.schedule import Schedule, schedule_of
from moe_jax.parallel.sharded import ShardedModel
from moe_jax.plan.model import flops, memory


def _param_shapes(cfg: Config, mesh) -> set[tuple[int, ...]]:
    """Every parameter's local (per-device) shape."""
    sm = ShardedModel.build(cfg, mesh)
    return {
        sharding.shard_shape(a.shape)
        for a, sharding in zip(
            jax.tree.leaves(sm.abstract_params), jax.tree.leaves(sm.shardings(sm.param_specs)), strict=True
        )
    }


def classify(buf: Buffer, cfg: Config, param_shapes: set[tuple[int, ...]]) -> str:
    """The planner's part a temporary buffer at the peak stands for, from what made it and its shape."""
    m, lay = cfg.model, cfg.layout
    loc = local_sizes(cfg)
    sched = Schedule(lay.pp, lay.microbatches, lay.repeats, storage_model(cfg).units, lay.remat)
    dtype, shape = array_dims(buf.shape)
    if lay.schedule == "1f1b":
        return _classify_1f1b(buf, cfg, param_shapes, dtype, shape)
    if buf.opcode == "copy" and any(o.startswith("param") for o in buf.operands) and shape in param_shapes:
        return "head_copy_or_gradient"  # pp > 1: the head's gradient lives in the head's argument buffer
    if buf.opcode == "while" and buf.op_name.endswith("transpose(jvp())/shard_map/while") and shape in param_shapes:
        return "head_copy_or_gradient"  # pp = 1: no copy; the loss scan's finished head gradient is a temporary
    if shape and shape[0] == sched.ticks and len(shape) > 1:
        return "saved_for_backward"
    bsd = (loc["batch"], loc["seq"], m.d_model)
    if sched.ticks == 1 and len(shape) == 4 and shape == (sched.layers_per_chunk, *bsd):
        return "saved_for_backward"  # one tick (no pipeline, one microbatch): the layer scan's stacked inputs
    if m.dense_layers and shape == (lay.microbatches, m.dense_layers, *bsd):
        return "saved_for_backward"  # the dense first layers' inputs, every microbatch
    if loc["vocab"] in shape and "_take" in buf.op_name:
        return "gradients"  # the embedding's gradient (the transpose of its gather)
    if loc["vocab"] in shape:
        # The loss head's working set: one microbatch's logits, log-softmax and gradient, the head in the compute
        # dtype and the head's gradient being made. (When b s = d the logits have the head's shape: they are told
        # apart from the parameters by what made them, not by shape.)
        return "logits"
    if "rematted_computation" in buf.op_name:
        return "layer_working_set"  # recomputed inside a checkpoint's backward (may have a parameter's shape)
    if dtype == "f32" and shape in param_shapes:
        return "gradients"
    bsd = (loc["batch"], loc["seq"], m.d_model)
    if len(shape) == 4 and shape[1:] == bsd and shape[0] in (lay.microbatches, 1):
        return "pipeline_buffers"
    return "layer_working_set"


def _classify_1f1b(buf: Buffer, cfg: Config, param_shapes: set[tuple[int, ...]], dtype: str, shape) -> str:
    """1F1B's buffers: the gradient accumulators (the tick loop's carry, parameter-shaped fp32), the stash ring,
    activations in flight, the loss head's working set (logits-sized, and the head's gradient being made)."""
    m, lay = cfg.model, cfg.layout
    loc = local_sizes(cfg)
    sched = schedule_of(cfg)
    bsd = (loc["batch"], loc["seq"], m.d_model)
    segments = sched.layers_per_chunk if lay.remat == "layer" else 1
    if shape == (sched.stash_slots, segments, *bsd):
        return "saved_for_backward"
    if dtype == "f32" and shape in param_shapes and buf.opcode == "parameter":
        return "gradients"  # an accumulator, inside the tick loop
    if loc["vocab"] in shape:
        return "logits"
    if dtype == "f32" and shape in param_shapes and len(shape) > 1 and shape[0] == sched.layers_per_chunk * lay.repeats:
        return "gradients"  # a segment's stacked gradient from jax.vjp, before it is added
    if shape in (bsd, (bsd[0] * bsd[1], bsd[2])):
        return "pipeline_buffers"
    return "layer_working_set"


@functools.lru_cache(maxsize=8)
def compiled_figures(cfg: Config, mesh) -> dict[str, Any]:
    """Compile the train step on `mesh` (fake devices) and read memory by part, FLOPs and collective bytes."""
    report, _, _ = compile_report(cfg, mesh, "train", dump_buffers=True)
    mem = report["memory_per_device_bytes"]
    peak = peak_buffers(report.pop("xla_dump"))
    parts: dict[str, int] = {}
    for a in peak["arguments"]:
        key = ("parameters" if a.op_name.startswith("params") else "optimizer_state" if a.op_name.startswith("opt")
               else "batch" if a.op_name in ("tokens", "targets") else "scalars")  # fmt: skip
        parts[key] = parts.get(key, 0) + a.nbytes
    shapes = _param_shapes(cfg, mesh)
    for b in peak["buffers"]:
        key = classify(b, cfg, shapes)
        parts[key] = parts.get(key, 0) + b.nbytes
    if "peak" in mem:
        # The TPU compiler: what it checks against the chip's HBM is its peak (arguments and the temporaries live
        # together), below argument + temp: its temp allocation is larger than any moment's live set (docs/tpu.md).
        total = mem["peak"]
        parts["arena_packing"] = total - mem["argument"] - peak["live_bytes"]
    else:
        total = mem["total"]
        parts["arena_packing"] = mem["temp"] - peak["live_bytes"]
        parts["outputs_not_aliased"] = mem["output"] - mem["alias"]
    return {
        "memory_total": total,
        "memory_temp": mem["temp"],
        "memory_parts": parts,
        "buffers": peak["buffers"],
        "flops": report["flops"],
        "bytes_by_kind": report["bytes_by_kind"],
        "audit_ok": report["audit_ok"],
    }


def compare(cfg: Config, compiled: dict[str, Any], tolerance: float, backend: str = "cpu") -> dict[str, Any]:
    """Rows {part, planned, compiled, error of the total} and the verdict. A part fails when its planned and compiled
    bytes differ by more than `tolerance` of the compiled total; the total, when off by more than `tolerance`; FLOPs,
    by more than `tolerance`; collective bytes, when not equal."""
    planned = memory(cfg, backend=backend)
    total_c = compiled["memory_total"]
    names = [k for k in planned if k not in ("total", "peak_phase")]
    names += [k for k in compiled["memory_parts"] if k not in names]
    rows, failures = [], []
    for name in names:
        p, c = planned.get(name, 0), compiled["memory_parts"].get(name, 0)
        err = (p - c) / total_c
        rows.append({"part": name, "planned": p, "compiled": c, "error_of_total": err})
        if abs(err) > tolerance:
            failures.append(f"memory part {name}: planned {p / 2**30:.3f} GiB, compiled {c / 2**30:.3f} GiB "
                            f"({err:+.1%} of the compiled total)")  # fmt: skip
    total_err = (planned["total"] - total_c) / total_c
    if abs(total_err) > tolerance:
        failures.append(f"memory total: planned {planned['total'] / 2**30:.3f} GiB, compiled {total_c / 2**30:.3f} GiB "
                        f"({total_err:+.1%})")  # fmt: skip
    fl = flops(cfg)  # 'total': what the program holds (1F1B: every slot, the skipped ones too), as the HLO is read
    flops_err = fl["total"] / compiled["flops"] - 1
    if abs(flops_err) > tolerance:
        failures.append(f"FLOPs: planned {fl['total']:.4g}, compiled {compiled['flops']:.4g} ({flops_err:+.1%})")
    planned_bytes = bytes_by_kind(expected_collectives(cfg, "train"))
    if planned_bytes != compiled["bytes_by_kind"]:
        failures.append(f"collective bytes by kind: planned {planned_bytes}, compiled {compiled['bytes_by_kind']}")
    if not compiled["audit_ok"]:
        failures.append("the compiled step's collectives differ from the expected set (moe-jax compile shows which)")
    return {
        "parts": rows,
        "memory": {
            "planned": planned["total"],
            "compiled": total_c,
            "error": total_err,
            "peak_phase": planned.get("peak_phase", ""),
        },  # fmt: skip
        "flops": {"planned": fl["total"], "compiled": compiled["flops"], "error": flops_err, "useful": fl["useful"]},
        "bytes_by_kind": {"planned": planned_bytes, "compiled": compiled["bytes_by_kind"]},
        "audit_ok": compiled["audit_ok"],
        "failures": failures,
        "ok": not failures,
    }


def compiled_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """The compiled side of a `compare` result, to compare again with a changed planner without compiling."""
    return {
        "memory_total": row["memory"]["compiled"],
        "memory_parts": {r["part"]: r["compiled"] for r in row["parts"] if r["compiled"]},
        "flops": row["flops"]["compiled"],
        "bytes_by_kind": row["bytes_by_kind"]["compiled"],
        "audit_ok": row["audit_ok"],
    }
