"""Ahead-of-time compilation of a step from abstract inputs (nothing allocated, nothing run), and its report: on
XLA:CPU's fake devices, or on a TPU topology's compile-only devices with the TPU compiler (target.py)."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax.buffers import compile_with_dump
from moe_jax.collectives import bytes_by_kind
from moe_jax.config import Config, ConfigError
from moe_jax.hlo import audit, dot_flops
from moe_jax.mesh import assignment
from moe_jax.model.layers import compute_dtype
from moe_jax.parallel.sharded import ShardedModel, abstract_inputs, mesh_platform
from moe_jax.serve.step import ServeModel, cache_shapes, cache_specs, tokens_spec
from moe_jax.target import Target, compiler_options
from moe_jax.train.step import abstract_train_inputs, make_optimizer, train_step


def lower(cfg: Config, mesh, step: str = "train"):
    if step in ("prefill", "decode"):
        return _lower_serve(cfg, mesh, step)
    if step != "train":
        raise ConfigError(f"--step={step!r}: valid: train, prefill, decode")

    sm = ShardedModel.build(cfg, mesh)
    tx = make_optimizer(cfg.run)
    with jax.set_mesh(mesh):
        return train_step(sm, tx).lower(*abstract_train_inputs(sm, tx))


def _lower_serve(cfg: Config, mesh, step: str):
    """Prefill: run.seq_len prompt tokens into an empty cache of run.seq_len; decode: one token with that cache."""
    srv = ServeModel.build(cfg, mesh, max_len=cfg.run.seq_len)
    params, rest, _, _ = abstract_inputs(srv.sm)
    sizes = srv.sm.sizes
    specs = cache_specs(cfg, sizes)

    def cache(which):
        return {
            k: jax.ShapeDtypeStruct(shape, compute_dtype(cfg.run.dtype), sharding=NamedSharding(mesh, specs[k]))
            for k, shape in cache_shapes(cfg, cfg.run.seq_len, which).items()
        }

    mb = cfg.layout.microbatches
    s = cfg.run.seq_len if step == "prefill" else 1
    tokens = jax.ShapeDtypeStruct(
        (mb, cfg.run.batch // mb, s), jnp.int32, sharding=NamedSharding(mesh, tokens_spec(sizes))
    )
    pos = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
        return srv.step_fn().lower(params, rest, cache("k"), cache("v"), tokens, pos)


def memory_figures(compiled, platform: str) -> tuple[dict[str, int], dict[str, int]]:
    """(device memory, host memory) per device from the compiler's memory analysis. total = argument + output +
    temp - alias, both; the device's also has the compiler's own `peak` where it is one (not XLA:CPU's, which leaves
    temp out) and its generated code. Host memory is what the program offloads (zero unless it does)."""
    ma = compiled.memory_analysis()

    def part(prefix: str) -> dict[str, int]:
        mem = {k: int(getattr(ma, f"{prefix}{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "temp",
                                                                                    "alias")}  # fmt: skip
        mem["total"] = mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
        return mem

    device, host = part(""), part("host_")
    if platform != "cpu":
        device["peak"] = int(ma.peak_memory_in_bytes)
        device["generated_code"] = int(ma.generated_code_size_in_bytes)
    return device, host


def compile_report(
    cfg: Config, mesh, step: str = "train", dump_buffers: bool = False, target: Target | None = None
) -> tuple[dict[str, Any], Any, Any]:
    """Returns (report, lowered, compiled). Memory is per device: total = argument + output + temp - alias.
    `dump_buffers`: XLA's buffer assignment texts too, under report["xla_dump"] (`buffers.py`). `target`: the TPU
    topology `mesh` is on (its chips' HBM is reported against the memory); None, XLA:CPU's fake devices."""
    platform = mesh_platform(mesh)
    t0 = time.perf_counter()
    lowered = lower(cfg, mesh, step)
    t1 = time.perf_counter()
    options = compiler_options(platform)
    compiled, texts = compile_with_dump(lowered, options) if dump_buffers else (lowered.compile(options), None)
    t2 = time.perf_counter()
    mem, host = memory_figures(compiled, platform)
    before, after = lowered.as_text(dialect="hlo"), compiled.as_text()
    result = audit(before, after, cfg, assignment(cfg, mesh), step=step, platform=platform)
    cost = compiled.cost_analysis() or {}
    report = {
        "step": step,
        "devices": cfg.layout.devices,
        "target": target.describe() if target else {"target": platform, "devices": cfg.layout.devices},
        "memory_per_device_bytes": mem,
        "host_memory_per_device_bytes": host,
        "flops": dot_flops(before),
        "flops_xla_cost_analysis_loops_once": float(cost.get("flops", 0.0)),
        "collectives": result["collectives"],
        "bytes_by_kind": bytes_by_kind(result["collectives"]),
        "unexpected": result["unexpected"],
        "audit_ok": result["ok"],
        "lower_seconds": t1 - t0,
        "compile_seconds": t2 - t1,
    }
    if target:  # what the TPU compiler checks against its HBM: its peak (less than the total: see docs/tpu.md)
        report["fits"] = mem["peak"] <= target.chip.hbm_bytes
    if dump_buffers:
        report["xla_dump"] = texts
    return report, lowered, compiled
