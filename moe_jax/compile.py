"""Ahead-of-time compilation of a step on fake devices from abstract inputs (nothing allocated), and its report."""

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
from moe_jax.parallel.sharded import ShardedModel, abstract_inputs
from moe_jax.serve.step import ServeModel, cache_shapes, cache_specs, tokens_spec
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


def compile_report(
    cfg: Config, mesh, step: str = "train", dump_buffers: bool = False
) -> tuple[dict[str, Any], Any, Any]:
    """Returns (report, lowered, compiled). Memory is per device: total = argument + output + temp - alias.
    `dump_buffers`: XLA's buffer assignment texts too, under report["xla_dump"] (`buffers.py`)."""
    t0 = time.perf_counter()
    lowered = lower(cfg, mesh, step)
    t1 = time.perf_counter()
    compiled, texts = compile_with_dump(lowered) if dump_buffers else (lowered.compile(), None)
    t2 = time.perf_counter()
    ma = compiled.memory_analysis()
    mem = {
        "argument": ma.argument_size_in_bytes,
        "output": ma.output_size_in_bytes,
        "temp": ma.temp_size_in_bytes,
        "alias": ma.alias_size_in_bytes,
    }
    mem["total"] = mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
    before, after = lowered.as_text(dialect="hlo"), compiled.as_text()
    result = audit(before, after, cfg, assignment(cfg, mesh), step=step)
    cost = compiled.cost_analysis() or {}
    report = {
        "step": step,
        "devices": cfg.layout.devices,
        "memory_per_device_bytes": mem,
        "flops": dot_flops(before),
        "flops_xla_cost_analysis_loops_once": float(cost.get("flops", 0.0)),
        "collectives": result["collectives"],
        "bytes_by_kind": bytes_by_kind(result["collectives"]),
        "unexpected": result["unexpected"],
        "audit_ok": result["ok"],
        "lower_seconds": t1 - t0,
        "compile_seconds": t2 - t1,
    }
    if dump_buffers:
        report["xla_dump"] = texts
    return report, lowered, compiled
