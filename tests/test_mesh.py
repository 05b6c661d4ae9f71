"""The mesh and the exact device assignment, checked against JAX's own placement and against mesh coordinates."""

import json
import os

import jax
import numpy as np
import pytest

from moe_jax.config import storage_model
from moe_jax.layouts import committed_layouts, golden_layouts, golden_path, load_pair
from moe_jax.load import load_config
from moe_jax.mesh import GRAD_REDUCE_AXES, assignment, check_placement, layer_storage_order, make_mesh, stage_layers
from moe_jax.model.transformer import param_table
from moe_jax.sharding import MESH_AXES

CPU8 = [n for n in committed_layouts() if n.startswith("cpu8")]


def test_every_layout_has_its_golden_assignment():
    assert {"seed-128", "seed-512", "seed-32"} <= set(committed_layouts())
    # all but DeepSeek-V3's 2048 devices (a 10.7 MB table: its placement is checked by scripts/compile_deepseek.py)
    assert set(committed_layouts()) - set(golden_layouts()) == {"deepseek-v3-2048"}
    assert all(os.path.isfile(golden_path(n)) for n in golden_layouts())
    assert set(CPU8) == {
        "cpu8-pp2-ep2-tp2",
        "cpu8-ep8",
        "cpu8-ep4-tp2",
        "cpu8-pp2-ep4",
        "cpu8-pp4-tp2",
        "cpu8-dp2-ep2-tp2",
    }


@pytest.mark.parametrize("name", golden_layouts())
def test_golden_assignment_regenerates_identically(name):
    """Regenerates meshes/<name>.json (scripts/gen_meshes.py writes them) and compares every field."""
    with open(golden_path(name)) as f:
        golden = json.load(f)
    assert json.loads(json.dumps(assignment(load_pair(name)))) == golden


def independent_groups(mesh, *axes: str) -> list[list[int]]:
    """Groups from mesh coordinates alone: devices that agree on every coordinate but `axes`'."""
    keep = [i for i, a in enumerate(MESH_AXES) if a not in axes]
    buckets: dict[tuple, list[int]] = {}
    for idx in np.ndindex(mesh.devices.shape):
        buckets.setdefault(tuple(idx[i] for i in keep), []).append(mesh.devices[idx].id)
    return sorted(sorted(g) for g in buckets.values())


def check_groups(cfg, mesh, table):
    for axis in MESH_AXES:
        assert sorted(table["groups"][axis]) == independent_groups(mesh, axis), axis
    # Each device appears in exactly one group of each kind, and the gradient groups are products of axis groups.
    for kind, entry in table["grad_reduce_by_kind"].items():
        assert tuple(entry["axes"]) == GRAD_REDUCE_AXES[kind]
        assert sorted(i for g in entry["groups"] for i in g) == sorted(d.id for d in mesh.devices.flat)
        size = int(np.prod([mesh.shape[a] for a in entry["axes"]]))
        assert all(len(g) == size for g in entry["groups"])


@pytest.mark.parametrize("name", CPU8)
def test_cpu8_layout_matches_jax_placement_and_mesh_groups(name):
    cfg = load_pair(name)
    mesh = make_mesh(cfg.layout)
    table = assignment(cfg, mesh)
    names, shapes = param_table(storage_model(cfg))  # as stored: the vocabulary padded over tp
    assert check_placement(cfg, mesh, names, shapes, table) == len(names) * 8
    check_groups(cfg, mesh, table)
    # The table read from real devices equals the planned one (one process, ids in row-major order).
    assert table == assignment(cfg)
    # Every kind of parameter is covered.
    kinds = {p.split("/")[-1] for p in names}
    assert {"wq", "wk", "wv", "wo", "router", "w_in", "w_out", "scale", "embed", "head"} <= kinds


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: d.update(experts=[e + 1 for e in d["experts"]]),
        lambda d: d.update(heads=d["heads"][:-1]),
        lambda d: d.update(expert_hidden=[0, d["expert_hidden"][1] + 1]),
        lambda d: d.update(units=[x + 2 for x in d["units"]]),
    ],
)
def test_placement_check_fails_on_a_single_wrong_row(corrupt):
    cfg = load_pair("cpu8-pp2-ep2-tp2")
    mesh = make_mesh(cfg.layout)
    table = assignment(cfg, mesh)
    corrupt(table["devices"][5])
    names, shapes = param_table(storage_model(cfg))  # as stored: the vocabulary padded over tp
    with pytest.raises(AssertionError, match=r"on device 5 "):
        check_placement(cfg, mesh, names, shapes, table)


@pytest.mark.parametrize("name", ["cpu8-ep4-tp2", "cpu8-pp2-ep2-tp2"])
def test_folded_experts_are_whole_on_one_device_each_and_placed_as_jax_places_them(name):
    """layout.expert_tp=1: device (ep e, tp t) holds the (e tp + t)-th block of E / (ep tp) experts, each whole (its
    hidden unsplit); the blocks of one stage and replica cover every expert once; JAX's placement of every parameter
    equals the table's; the all-to-all group is (ep, tp); a row naming the neighbour's experts is caught."""
    cfg = load_config("configs/tiny.yaml", f"meshes/{name}.yaml", ["layout.expert_tp=1"])
    mesh = make_mesh(cfg.layout)
    table = assignment(cfg, mesh)
    names, shapes = param_table(storage_model(cfg))  # as stored: the vocabulary padded over tp
    assert check_placement(cfg, mesh, names, shapes, table) == len(names) * 8
    lay, e = cfg.layout, cfg.model.experts
    for d in table["devices"]:
        c = d["coords"]
        block = c["ep"] * lay.tp + c["tp"]
        assert d["experts"] == list(range(block * e // (lay.ep * lay.tp), (block + 1) * e // (lay.ep * lay.tp)))
        assert d["expert_hidden"] == [0, cfg.model.expert_hidden]
    for s in range(lay.pp):
        held = sorted(x for d in table["devices"] if d["coords"]["pp"] == s for x in d["experts"])
        assert held == list(range(e))
    assert sorted(table["groups"]["expert_all_to_all"]) == independent_groups(mesh, "ep", "tp")
    table["devices"][3]["experts"] = table["devices"][2]["experts"]
    with pytest.raises(AssertionError, match=r"on device 3 "):
        check_placement(cfg, mesh, names, shapes, table)


def test_circular_layout_stores_each_stages_chunks_contiguously():
    # 8 layers, pp 2, v 2: chunks of 2 layers; stage 0 holds chunks 0 and 2 = layers 0,1,4,5.
    assert stage_layers(8, 2, 2, 0) == [0, 1, 4, 5] and stage_layers(8, 2, 2, 1) == [2, 3, 6, 7]
    assert layer_storage_order(8, 2, 2) == [0, 1, 4, 5, 2, 3, 6, 7]
    assert layer_storage_order(8, 2, 1) == list(range(8))
    cfg = load_config("configs/tiny.yaml", "meshes/cpu8-pp2-ep2-tp2.yaml", ["model.layers=8", "layout.repeats=2"])
    mesh = make_mesh(cfg.layout)
    names, shapes = param_table(storage_model(cfg))  # as stored: the vocabulary padded over tp
    assert check_placement(cfg, mesh, names, shapes) == len(names) * 8


def test_mesh_axis_order_puts_tp_on_neighbours():
    cfg = load_pair("cpu8-dp2-ep2-tp2")
    mesh = make_mesh(cfg.layout)
    assert mesh.axis_names == ("pp", "dp", "ep", "tp")
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert ids.reshape(-1).tolist() == [d.id for d in sorted(jax.devices(), key=lambda d: d.id)]
    assert assignment(cfg, mesh)["groups"]["tp"][0] == [0, 1]


def test_cli_mesh_writes_json_and_png(tmp_path, cli):
    j, p = tmp_path / "a.json", tmp_path / "a.png"
    proc = cli(
        "mesh",
        "--config",
        "configs/tiny.yaml",
        "--layout",
        "meshes/cpu8-pp2-ep2-tp2.yaml",
        "--json",
        str(j),
        "--png",
        str(p),
    )
    assert proc.returncode == 0, proc.stderr
    assert "placement check: 12 parameters x 8 devices = 96 shards" in proc.stdout
    assert "stage pp=1: layers 2-3" in proc.stdout
    assert json.loads(j.read_text()) == json.loads(open(golden_path("cpu8-pp2-ep2-tp2")).read())
    assert os.path.getsize(p) > 10_000


def test_cli_mesh_device_count_mismatch_is_one_line(cli):
    proc = cli("mesh", "--devices", "64")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "devices=64: layout pp x dp x ep x tp = 4 x 1 x 16 x 2 = 128 devices" in proc.stderr
