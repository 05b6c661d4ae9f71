"""Compiling for a TPU topology on this CPU-only machine: libtpu (in the test extra) compiles the tiny layout's train
step for v5p:2x2x2, eight compile-only TPU v5p chips that run nothing. One compile, shared by the tests: ragged
dispatch (its real ragged all-to-all, which XLA:CPU cannot compile), the TPU compiler's memory, the audit of the TPU
program, and the mesh on the chips' torus. The spelling of targets and XLA:CPU's device limit need no libtpu."""

import functools

import jax
import numpy as np
import pytest

from moe_jax import target as target_module
from moe_jax.compile import compile_report
from moe_jax.config import ConfigError, storage_model
from moe_jax.hlo import audit
from moe_jax.load import load_config
from moe_jax.mesh import assignment, check_placement, setup_devices
from moe_jax.model.transformer import param_table
from moe_jax.parallel.sharded import ShardedModel
from moe_jax.target import CPU_MAX_DEVICES, TPU_CHIPS, libtpu_installed, parse_target
from moe_jax.train.step import abstract_train_inputs, make_optimizer

needs_libtpu = pytest.mark.skipif(
    not libtpu_installed(), reason="libtpu is not installed (pip install -e '.[tpu]'; the test extra has it)"
)
TINY = ("configs/tiny.yaml", "meshes/cpu8-pp2-ep2-tp2.yaml", ["model.dispatch=ragged"])


@functools.cache
def tiny_on_v5p():
    """(cfg, mesh, report, lowered, compiled): the tiny train step (pp 2, ep 2, tp 2, ragged dispatch) on v5p:2x2x2."""
    cfg = load_config(*TINY)
    target = parse_target("v5p:2x2x2")
    mesh = setup_devices(cfg, target=target)
    report, lowered, compiled = compile_report(cfg, mesh, "train", target=target)
    return cfg, mesh, report, lowered, compiled


@needs_libtpu
def test_the_tpu_compiler_compiles_the_train_step_and_gives_its_memory():
    cfg, mesh, report, _, compiled = tiny_on_v5p()
    assert {d.platform for d in mesh.devices.flat} == {"tpu"} and mesh.devices.flat[0].device_kind == "TPU v5"
    assert report["target"]["chips"] == 8 and report["target"]["hbm_bytes_per_device"] == TPU_CHIPS["v5p"].hbm_bytes
    # The TPU's program: its arrays carry TPU tiled layouts, which XLA:CPU never writes.
    assert ":T(8,128)" in compiled.as_text()
    mem, host = report["memory_per_device_bytes"], report["host_memory_per_device_bytes"]
    # The arguments hold at least the shards of the parameters, optimizer state and batch (the TPU pads to tiles).
    sm = ShardedModel.build(cfg, mesh)
    shards = sum(
        int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
        for a in jax.tree.leaves(abstract_train_inputs(sm, make_optimizer(cfg.run)))
    )
    assert shards <= mem["argument"] < 4 * shards, (shards, mem)
    assert mem["total"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
    assert 0 < mem["peak"] <= mem["total"] and mem["generated_code"] > 0
    assert report["fits"] and host["total"] == 0  # nothing offloaded to the host


@needs_libtpu
def test_ragged_dispatch_runs_the_ragged_all_to_all_and_the_tpu_audit_is_clean():
    """dispatch=ragged resolves to jax.lax.ragged_all_to_all on a TPU target: it is in the compiled program, the
    lowered collectives equal the expected set exactly, and the compiled one passes the TPU rules (the compiler
    rewrites reduce-scatters over tp into all-reduces; the kinds and groups still match)."""
    cfg, mesh, report, lowered, compiled = tiny_on_v5p()
    assert report["audit_ok"], report["unexpected"]
    assert any(c["kind"] == "ragged-all-to-all" and c["axes"] == ["ep"] for c in report["collectives"])
    after = compiled.as_text()
    assert " ragged-all-to-all(" in after
    before, table = lowered.as_text(dialect="hlo"), assignment(cfg, mesh)
    # Read with XLA:CPU's rules, the same TPU program fails: the rewrites are the TPU's forms, not noise.
    assert not audit(before, after, cfg, table, step="train", platform="cpu")["ok"]
    # A stray all-gather over ep (expert weights gathered) is caught under the TPU rules too.
    lines = after.splitlines()
    entry = next(i for i, ln in enumerate(lines) if ln.startswith("ENTRY"))
    ep_groups = "{" + ",".join("{" + ",".join(map(str, g)) + "}" for g in _position_groups(table, "ep")) + "}"
    lines.insert(entry + 1, f"  %stray = f32[4,32]{{1,0}} all-gather(f32[4,16]{{1,0}} %p), channel_id=99, "
                 f"replica_groups={ep_groups}, dimensions={{1}}, use_global_device_ids=true")  # fmt: skip
    stray = audit(before, "\n".join(lines), cfg, table, step="train", platform="tpu")
    assert [u["why"] for u in stray["unexpected"] if u.get("name") == "stray"] == ["not in the expected set"]


def _position_groups(table, axis):
    pos = {d["id"]: d["position"] for d in table["devices"]}
    return [[pos[i] for i in g] for g in table["groups"][axis]]


@needs_libtpu
def test_the_mesh_sits_on_the_chips_and_jax_places_every_shard_as_the_assignment_says():
    cfg, mesh, *_ = tiny_on_v5p()
    table = assignment(cfg, mesh)
    chips = [tuple(d["chip"]["coords"]) for d in table["devices"]]
    assert sorted(chips) == sorted(np.ndindex(2, 2, 2))  # every chip of the 2x2x2 torus once
    names, shapes = param_table(storage_model(cfg))
    assert check_placement(cfg, mesh, names, shapes, table) == len(names) * 8


@needs_libtpu
def test_two_slices_put_the_pipeline_across_them_and_the_rest_inside_one():
    cfg = load_config(*TINY)
    target = parse_target("v5p:2x2x1", slices=2)
    mesh = setup_devices(cfg, target=target)
    table = assignment(cfg, mesh)
    where = {d["id"]: d["chip"]["slice"] for d in table["devices"]}
    assert sorted(set(where.values())) == [0, 1]
    assert all({where[i] for i in g} == {0, 1} for g in table["groups"]["pp"])  # the stages over DCN
    for axis in ("ep", "tp"):
        assert all(len({where[i] for i in g}) == 1 for g in table["groups"][axis])  # inside a slice (ICI)


@pytest.mark.parametrize(
    "text,message",
    [
        ("v5p:4x4", "--target='v5p:4x4': a v5p topology has 3 axes (v5p:AxBxC)"),
        ("v6e:4x4x4", "--target='v6e:4x4x4': a v6e topology has 2 axes (v6e:AxB)"),
        ("tpu", "--target='tpu': valid: cpu, or a TPU topology: v4:AxBxC, v5p:AxBxC, v5e:AxB, v6e:AxB"),
        ("v5p:0x4x4", "--target='v5p:0x4x4': every axis needs at least one chip"),
    ],
)
def test_a_target_is_spelled_as_a_tpu_topology(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_target(text)


def test_targets_count_chips_and_devices():
    assert parse_target("cpu") is None and parse_target(None) is None
    t = parse_target("v5p:16x16x16")
    assert (t.chips, t.devices, t.name) == (4096, 4096, "v5p:16x16x16")
    assert parse_target("v5p:4x4x8", slices=2).chips == 256
    assert parse_target("v4:8x8x8").devices == 1024  # v4: a compile-only device per TensorCore


def test_without_libtpu_a_tpu_target_names_the_extra(monkeypatch):
    monkeypatch.setattr(target_module, "libtpu_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"--target=v5p:2x2x2: needs libtpu, the TPU compiler: pip install -e"):
        target_module.target_devices(parse_target("v5p:2x2x2"))


def test_xla_cpu_past_its_device_limit_is_one_line_pointing_to_target(cli):
    args = ["compile", "--config", "configs/seed.yaml", "--layout", "meshes/seed-128.yaml", "--devices", "4096",
            "layout.pp=4", "layout.ep=64", "layout.dp=8", "run.batch=1024", "layout.microbatches=2"]  # fmt: skip
    out = cli(*args)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(
        f"moe-jax compile: error: --devices=4096: XLA:CPU compiles for at most {CPU_MAX_DEVICES}"
    )
    assert "--target v5p:AxBxC" in out.stderr
