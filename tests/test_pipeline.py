"""Pipeline parallelism over pp on 8 fake devices equals the unpipelined one-device model; schedules and their HLO.

Tolerance: fp32 relative 1e-5 (moe_jax.parallel.verify.TOLERANCE), relative to each leaf's largest element. The router
terms are per global microbatch in both runs (rows j B/M .. (j+1) B/M), dropless dispatch.
"""

import json

import pytest

from moe_jax.config import ConfigError, load_config
from moe_jax.hlo import audit, collectives, while_trip_counts
from moe_jax.mesh import assignment, make_mesh
from moe_jax.parallel.schedule import Schedule
from moe_jax.parallel.step import ShardedModel, lower_step
from moe_jax.parallel.verify import verify

# (pp, dp, ep, tp), microbatches, repeats, layers: m = pp, 2 pp and 4 pp, v = 1 and 2, pp 2, 4 and 8, with ep, tp
# and dp.
# ((2, 1, 2, 2), 2, 1, 4) is the demo's own layout and check (tests/test_cli.py runs the demo, which exits 1 unless
# every error is within 1e-5), so it is not repeated here; ((2, 1, 2, 2), 4, 2, 4) and ((4, 1, 1, 2), 4, 1, 4) are
# checked for every model family (docs/families.md; in the suite on Mixtral and Qwen3, tests/test_families.py), and
# the former's remat policies below.
CASES = [
    ((2, 1, 4, 1), 2, 2, 4),
    ((4, 1, 1, 2), 8, 2, 8),
    ((4, 1, 2, 1), 8, 1, 4),
    ((8, 1, 1, 1), 16, 2, 16),
    ((2, 2, 1, 2), 4, 1, 4),  # with dp
]


def pipelined(shape, m, v, layers, *extra):
    pp, dp, ep, tp = shape
    return load_config(
        "configs/tiny.yaml",
        None,
        [f"layout.pp={pp}", f"layout.dp={dp}", f"layout.ep={ep}", f"layout.tp={tp}", f"layout.microbatches={m}",
         f"layout.repeats={v}", f"model.layers={layers}", "model.dispatch=dropless", "run.dtype=fp32", *extra],
    )  # fmt: skip


@pytest.mark.parametrize("shape,m,v,layers", CASES, ids=lambda x: str(x))
def test_pipeline_equals_one_device(shape, m, v, layers):
    cfg = pipelined(shape, m, v, layers)
    result = verify(cfg, make_mesh(cfg.layout))
    assert result["ok"], result
    assert result["tolerance"] == 1e-5


@pytest.mark.parametrize("remat", ["tick"])  # 'none' is plain autodiff of the same scan, the least likely to differ
def test_pipeline_remat_policies_equal_one_device(remat):
    cfg = pipelined((2, 1, 2, 2), 4, 2, 8, f"layout.remat={remat}")
    assert verify(cfg, make_mesh(cfg.layout))["ok"]


def test_capacity_mode_pipelined_equals_per_shard_reference():
    cfg = pipelined((2, 1, 2, 2), 2, 1, 4, "model.dispatch=capacity", "model.capacity_factor=1.0")
    result = verify(cfg, make_mesh(cfg.layout))
    assert result["ok"] and result["dropped"] > 0


def test_utilisation():
    assert Schedule(4, 8, 1).utilization == pytest.approx(8 / 11)
    assert Schedule(4, 8, 4).utilization == pytest.approx(32 / 35)
    assert (Schedule(4, 8, 1).ticks, Schedule(4, 8, 4).ticks) == (11, 35)
    # Every stage does v M useful ticks, and each (microbatch, repeat) exactly once.
    s = Schedule(4, 8, 2)
    for stage in range(4):
        work = [s.work(stage, t) for t in range(s.ticks)]
        assert sorted(w for w in work if w) == [(j, r) for j in range(8) for r in range(2)]


@pytest.mark.parametrize("shape,m,v,layers", [((2, 1, 2, 2), 2, 1, 4), ((4, 1, 1, 2), 8, 2, 8)])
def test_ticks_equal_scan_trip_count_and_permutes_follow_the_ring(shape, m, v, layers):
    cfg = pipelined(shape, m, v, layers)
    mesh = make_mesh(cfg.layout)
    lowered = lower_step(ShardedModel.build(cfg, mesh))
    before, after = lowered.as_text(dialect="hlo"), lowered.compile().as_text()
    sched = Schedule(shape[0], m, v, layers)
    assert sched.ticks in while_trip_counts(after)
    table = assignment(cfg, mesh)
    result = audit(before, after, cfg, table)
    assert result["ok"], result["unexpected"]
    permutes = [c for c in collectives(after, cfg.layout.shape) if c.kind == "collective-permute"]
    assert all(c.axes == ("pp",) for c in permutes)
    assert sum(c.count_per_step for c in permutes) == 2 * sched.ticks  # forward and backward, every tick
    pairs = {tuple(p) for c in permutes for p in c.groups}
    pp_groups = table["groups"]["pp"]
    want = {(g[s], g[(s + 1) % len(g)]) for g in pp_groups for s in range(len(g) if v > 1 else len(g) - 1)}
    assert pairs == want | {(b, a) for a, b in want}


def test_schedule_cli(tmp_path, cli):
    j, p = tmp_path / "s.json", tmp_path / "s.png"
    proc = cli("schedule", "--pp", "4", "--microbatches", "8", "--repeats", "4", "--json", str(j), "--png", str(p))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(j.read_text())
    assert out["ticks"] == 35 and out["utilization"] == pytest.approx(32 / 35)
    assert "utilisation 32/35 = 91.4%" in proc.stdout
    assert p.stat().st_size > 10_000


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["layout.pp=4", "layout.repeats=2", "layout.microbatches=6", "model.layers=8", "run.batch=24"],
         r"layout.microbatches=6: a circular schedule"),
        (["layout.pp=4", "layout.repeats=2"], r"layout.pp=4: layout.pp x layout.repeats = 4 x 2 must divide"),
        (["layout.pp=2", "layout.ep=4", "layout.microbatches=8"],
         r"run.batch=16: must be divisible by layout.dp x layout.ep x layout.microbatches = 1 x 4 x 8 = 32"),
    ],
)  # fmt: skip
def test_bad_pipeline_input_is_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config("configs/tiny.yaml", None, ["layout.ep=1", *overrides])
    assert "\n" not in str(e.value)


def test_schedule_cli_bad_input(cli):
    proc = cli("schedule", "--pp", "4", "--microbatches", "6", "--repeats", "2")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "microbatches=6: a circular schedule (repeats=2) needs a multiple of pp=4" in proc.stderr
