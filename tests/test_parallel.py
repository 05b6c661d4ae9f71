"""The shard_map step over (dp, ep, tp) on 8 fake devices equals one device; the HLO audit of the seed, compile-only.

Tolerances (moe_jax.verify.TOLERANCE): fp32 relative 1e-5, bf16 2e-2, relative to each leaf's largest element.
Dropless mode compares with the plain one-device model; capacity mode with one device cut into the same dispatch
groups as the shards (rows over dp x ep, sequence over tp), i.e. the same per-shard capacity rule.
"""

import json

import pytest

from moe_jax.hlo import _iota_groups, audit, group_axes, replica_groups
from moe_jax.load import load_config
from moe_jax.mesh import assignment, make_mesh
from moe_jax.parallel import sharded
from moe_jax.parallel.sharded import ShardedModel
from moe_jax.verify import verify

# (dp, ep, tp) layouts of 8 devices that the tiny config admits (4 heads, expert hidden 40, sequence 12, 8 experts).
LAYOUTS = {
    "ep8": (1, 8, 1),
    "ep4-tp2": (1, 4, 2),
    "dp2-ep2-tp2": (2, 2, 2),
    "ep2-tp4": (1, 2, 4),  # tp-heavy
    "dp2-tp4": (2, 1, 4),
    "dp4-ep2": (4, 2, 1),  # dp-heavy
    "dp8": (8, 1, 1),
    "dp2-ep4": (2, 4, 1),
}


def tiny(dp, ep, tp, *extra):
    return load_config("configs/tiny.yaml", None, [f"layout.dp={dp}", f"layout.ep={ep}", f"layout.tp={tp}", *extra])


def run_verify(cfg):
    result = verify(cfg, make_mesh(cfg.layout))
    assert result["ok"], result
    return result


# ep4-tp2 and dp2-ep2-tp2 are checked for every model family by scripts/verify_families.py (docs/families.md; the
# same code path with more options; dp2-ep2-tp2 in the suite on OLMoE, tests/test_families.py); the seed's tiny model
# keeps pure ep, pure dp, tp 4 and dp x ep here (dp2-tp4 and dp2-ep4, which combine no axes these and the families'
# cases do not, were dropped to keep the suite's time).
@pytest.mark.parametrize("name", ["ep8", "ep2-tp4", "dp4-ep2"])  # dp8's pure data parallelism: dp4-ep2's dp
def test_dropless_fp32_equals_one_device(name):
    """And the HLO audit of the very program that was checked: its collectives equal the expected set."""
    cfg = tiny(*LAYOUTS[name], "model.dispatch=dropless", "run.dtype=fp32")
    mesh = make_mesh(cfg.layout)
    result = verify(cfg, mesh, programs=True)
    assert result["ok"], result
    assert result["tolerance"] == 1e-5
    assert {"grad/experts", "grad/attention", "grad/router", "grad_norm", "lb_loss", "z_loss"} <= set(result["errors"])
    lowered, compiled = result["programs"]
    before, after = lowered.as_text(dialect="hlo"), compiled.as_text()
    table = assignment(cfg, mesh)
    audited = audit(before, after, cfg, table)
    assert audited["ok"], audited["unexpected"]
    if name == "ep8":
        check_the_audit_can_fail(cfg, before, after, table)
    if cfg.layout.vocab_parallel:  # ep2-tp4: the vocabulary of 97 over tp 4, stored as 100 (3 padding ids)
        check_no_vocabulary_sized_collective(cfg, before, after)


def check_no_vocabulary_sized_collective(cfg, before, after):
    """The vocabulary split over tp: no collective of the step moves an array with a vocabulary-sized dimension (no
    [tokens, V] logits, no whole embedding or head): the cross-entropy reduces [tokens] statistics over tp, and the
    embedding's and head's gradients are summed over (dp, ep) as [V / tp, D] slices."""
    import re

    from moe_jax.config import padded_vocab
    from moe_jax.hlo import collectives

    vocab = {cfg.model.vocab, padded_vocab(cfg)}
    assert padded_vocab(cfg) == 100 and cfg.layout.tp == 4
    moved = [c for text in (before, after) for c in collectives(text, cfg.layout.shape)]
    assert any(c.kind == "all-reduce" and "tp" in c.axes for c in moved)  # the cross-entropy's statistics
    for c in moved:
        dims = {int(d) for d in re.findall(r"\d+", c.shape.split("{")[0].split("[", 1)[-1])}
        assert not dims & vocab, (c.kind, c.axes, c.shape)


@pytest.mark.parametrize("name", ["ep2-tp4"])  # bf16 on ep4-tp2 and pp2-ep2-tp2: docs/families.md
def test_dropless_bf16_equals_one_device(name):
    assert run_verify(tiny(*LAYOUTS[name], "model.dispatch=dropless", "run.dtype=bf16"))["tolerance"] == 2e-2


@pytest.mark.parametrize(
    "layout",
    [
        ["layout.ep=4", "layout.tp=2", "model.dispatch=capacity"],  # the seed's dispatch, its per-shard capacity
        ["layout.pp=2", "layout.ep=2", "layout.tp=2", "layout.microbatches=2"],  # pipelined, dropless
    ],
    ids=["ep4-tp2 capacity", "pp2-ep2-tp2 dropless"],
)
def test_fp16_equals_one_device(layout):
    """fp16, the seed's own dtype, sharded against one device in fp16 (2e-2; measured up to 7e-3, the attention
    gradients): every gradient group, the loss and the router terms."""
    cfg = load_config("configs/tiny.yaml", None, [*layout, "run.dtype=fp16"])
    result = run_verify(cfg)
    assert result["tolerance"] == 2e-2 and result["dtype"] == "fp16"
    assert {"grad/experts", "grad/attention", "grad/router", "grad_norm"} <= set(result["errors"])


@pytest.mark.parametrize("name", ["ep4-tp2", "dp2-ep2-tp2"])  # one expert a device (ep8): the dropless case above
def test_capacity_mode_equals_per_shard_reference(name):
    cfg = tiny(*LAYOUTS[name], "model.dispatch=capacity", "model.capacity_factor=1.0", "run.dtype=fp32")
    result = run_verify(cfg)
    assert result["errors"]["dropped"] == 0.0
    assert result["dropped"] > 0, "capacity 1.0 on a random router must drop some tokens, or the test shows nothing"


@pytest.mark.parametrize("layout,exchange", [("cpu8-ep4-tp2", "auto"), ("cpu8-pp2-ep2-tp2", "emulated")])
def test_ragged_dispatch_equals_one_device_and_says_its_exchange_once(layout, exchange, capfd):
    """Ragged dispatch sharded equals one device's (itself equal to dropless: tests/test_model.py) in fp32, and the
    audit of the very program checked is clean. `auto` on XLA:CPU, which cannot compile ragged_all_to_all, is the
    padded exchange over ep with the row counts beside it (grouped matmuls over the filled rows), said once per
    process however many programs trace the layer. `emulated` runs the ragged exchange's own code (each shard gets
    exactly its routed rows, sorted by expert; layout.ragged_exchange) with ragged_all_to_all's semantics built from a
    padded all-to-all, and says nothing."""
    from moe_jax.model import moe

    moe._FALLBACK_SAID.clear()
    cfg = load_config("configs/tiny.yaml", f"meshes/{layout}.yaml",
                      ["model.dispatch=ragged", "run.dtype=fp32", f"layout.ragged_exchange={exchange}"])  # fmt: skip
    mesh = make_mesh(cfg.layout)
    result = verify(cfg, mesh, programs=True)
    assert result["ok"] and result["tolerance"] == 1e-5, result["errors"]
    assert result["dropped"] == 0
    lowered, compiled = result["programs"]
    audited = audit(lowered.as_text(dialect="hlo"), compiled.as_text(), cfg, assignment(cfg, mesh))
    assert audited["ok"], audited["unexpected"]
    rows = {(c["kind"], tuple(c["axes"]), c["bytes_per_device"]) for c in audited["collectives"]}
    n, p, d = 2, 4 * 6 * 2, 48  # ep shards; k T pairs per device (T = 4 rows x 6 positions), width
    # [n, min(k, E_loc) T, D] fp32 (E_loc = k here)
    assert (("all-to-all", ("ep",), n * p * d * 4) in rows) == (exchange == "emulated")
    lines = [line for line in capfd.readouterr().err.splitlines() if "padded all-to-all" in line]
    assert lines == ([] if exchange == "emulated" else [
        "moe_jax: ragged dispatch exchanges over ep with the padded all-to-all (the worst case, T rows per expert and "
        "source; the experts still compute only their rows): XLA:CPU cannot compile ragged_all_to_all"
    ])  # fmt: skip


def test_ragged_exchange_lowers_for_cuda_and_its_audit_is_clean(monkeypatch):
    """Where the backend compiles it (a GPU), ragged dispatch exchanges rows with jax.lax.ragged_all_to_all. No GPU
    here: the gradient step is traced as on one (the mesh's platform and the backend reported as 'gpu') and lowered
    for CUDA, which XLA:CPU can do without compiling (tests/test_tpu.py compiles it for a TPU topology). The lowered program's collectives equal the expected set exactly: two ragged
    all-to-alls per forward pass and two more in the backward (their transposes), over the ep groups, sized by their
    output buffers (n blocks of min(k, E_loc) T rows, and k T rows); the counts' and offsets' all-to-alls; no padded
    all-to-all of rows."""
    import jax

    from moe_jax.parallel.sharded import abstract_inputs
    from moe_jax.parallel.step import grad_step

    cfg = load_config("configs/tiny.yaml", "meshes/cpu8-ep4-tp2.yaml",
                      ["model.dispatch=ragged", "run.dtype=bf16", "model.attention_impl=blockwise"])  # fmt: skip
    mesh = make_mesh(cfg.layout)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(sharded, "mesh_platform", lambda mesh: "gpu")
    sm = ShardedModel.build(cfg, mesh)
    with jax.set_mesh(mesh):
        text = grad_step(sm).trace(*abstract_inputs(sm)).lower(lowering_platforms=("cuda",)).as_text(dialect="hlo")
    audited = audit(text, text, cfg, assignment(cfg, mesh))
    assert audited["ok"], audited["unexpected"]
    ragged = {(c["bytes_per_device"], c["count_per_step"]) for c in audited["collectives"]
              if c["kind"] == "ragged-all-to-all" and c["axes"] == ["ep"]}  # fmt: skip
    n, p, d, runs = 4, 4 * 6 * 2, 48, 4  # ep shards; k T pairs (T = 4 rows x 6 positions); MoE layer runs
    assert ragged == {(n * p * d * 2, 3 * runs), (p * d * 2, 3 * runs)}, ragged  # forward, recomputed, backward
    assert not [c for c in audited["collectives"] if c["kind"] == "all-to-all" and c["bytes_per_device"] > 4 * 8 * 4]


@pytest.mark.parametrize("config,layout", [("tiny-mixtral", "cpu8-ep4-tp2"), ("tiny-deepseek", "cpu8-pp2-ep2-tp2")])
def test_flash_attention_sharded_equals_one_device_and_blockwise(config, layout):
    """model.attention_impl=flash (blocks of 4 of the 12 positions: 6 causal block pairs) on a grouped-query family
    over ep x tp and on MLA with a dense first layer over pp x ep x tp: the sharded step equals one device (fp32 1e-5),
    its audit is clean (flash adds no collective), and the one-device step equals the blockwise one's (the same loss
    and gradients by another algorithm)."""
    import numpy as np

    from moe_jax.parallel.sharded import one_device_params, to_host
    from moe_jax.parallel.step import reference_grad_step
    from moe_jax.verify import compare, synthetic_batch

    flash = ["model.attention_impl=flash", "model.attention_block=4", "run.dtype=fp32"]
    cfg = load_config(f"configs/{config}.yaml", f"meshes/{layout}.yaml", flash)
    mesh = make_mesh(cfg.layout)
    result = verify(cfg, mesh, programs=True)
    assert result["ok"] and result["tolerance"] == 1e-5, result
    lowered, compiled = result["programs"]
    audited = audit(lowered.as_text(dialect="hlo"), compiled.as_text(), cfg, assignment(cfg, mesh))
    assert audited["ok"], audited["unexpected"]
    blockwise = load_config(f"configs/{config}.yaml", f"meshes/{layout}.yaml",
                            [*flash, "model.attention_impl=blockwise"])  # fmt: skip
    graphdef = ShardedModel.build(cfg, mesh).global_graphdef
    params, rest = one_device_params(cfg, 0)
    batch = synthetic_batch(cfg, 0)
    runs = [to_host(reference_grad_step(c, graphdef)(params, rest, *batch)) for c in (cfg, blockwise)]
    errors = compare(*runs)
    assert max(errors.values()) < 1e-5, errors
    assert float(np.asarray(runs[0][0][0])) == pytest.approx(result["reference_loss"])


def test_verify_cli_fails_on_a_perturbed_gradient(tmp_path, cli):
    j = tmp_path / "v.json"
    args = ["verify", "--config", "configs/tiny.yaml", "--layout", "meshes/cpu8-ep4-tp2.yaml", "--json", str(j)]
    ok = cli(*args)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(j.read_text())["ok"] is True
    bad = cli(*args, "--perturb", "0.01")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    out = json.loads(j.read_text())
    assert out["ok"] is False and out["failed"] == ["grad/experts"]


def check_the_audit_can_fail(cfg, before: str, after: str, table) -> None:
    """The ep8 program audited against a config without remat must fail (its forward collectives run once fewer),
    and a stray all-gather over ep (as if expert weights were gathered) inserted into it is caught."""
    wrong = tiny(1, 8, 1, "model.dispatch=dropless", "run.dtype=fp32", "layout.remat=none")
    bad = audit(before, after, wrong, table)
    assert not bad["ok"] and any(u["kind"] == "all-to-all" for u in bad["unexpected"])
    lines = after.splitlines()
    entry = next(i for i, ln in enumerate(lines) if ln.startswith("ENTRY"))
    lines.insert(entry + 1, "  %stray = f32[4,32]{1,0} all-gather(f32[4,4]{1,0} %p), channel_id=99, "
                 "replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={1}, use_global_device_ids=true")  # fmt: skip
    stray = audit(before, "\n".join(lines), cfg, table)
    assert [u["why"] for u in stray["unexpected"] if u.get("name") == "stray"] == ["not in the expected set"]


def test_replica_group_spellings():
    assert replica_groups("replica_groups={{0,1},{2,3}}, dimensions={0}", 4) == [[0, 1], [2, 3]]
    assert replica_groups("replica_groups={}, to_apply=%add", 4) == [[0, 1, 2, 3]]
    assert replica_groups("replica_groups=[2,2]<=[4], dimensions={0}", 4) == [[0, 1], [2, 3]]
    assert replica_groups("replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}", 4) == [[0, 2], [1, 3]]
    assert _iota_groups("[4,2]<=[2,2,2]T(1,0,2)") == [[0, 1], [4, 5], [2, 3], [6, 7]]
    assert replica_groups("source_target_pairs={{0,4},{4,0}}, channel_id=2", 8) == [[0, 4], [4, 0]]
    # (pp, dp, ep, tp) = (2, 1, 2, 2): {0,2} varies ep only, {0,1} tp only, {0,4} pp only.
    assert group_axes([[0, 2], [1, 3]], (2, 1, 2, 2)) == ("ep",)
    assert group_axes([[0, 1, 2, 3]], (2, 1, 2, 2)) == ("ep", "tp")
    assert group_axes([[0, 4]], (2, 1, 2, 2)) == ("pp",)


# ------------------------------------------------------------------------------------- ZeRO-1 and expert folding


def test_committed_zero1_and_folding_results_cover_the_cases_and_pass():
    """ZeRO-1's and expert folding's matrix (docs/layouts.md: one device, five AdamW steps against the same layout
    without the option, the train step's audit) and their full-size memory (docs/results/layouts_memory.json); a live
    ZeRO-1 train step and a live folded 1F1B one, resumed and audited, are tests/test_train.py's."""
    from conftest import ROOT

    from moe_jax.plan.model import memory
    from moe_jax.verify import matrix

    with open(f"{ROOT}/docs/results/layouts.json") as f:
        rows = {r["id"]: r for r in json.load(f)["cases"]}
    assert set(rows) == {c["id"] for c in matrix.layout_cases()}, "rerun scripts/verify_families.py --set layouts"
    decode = {k for k in rows if k.endswith(" decode")}  # a prefill and decode steps against the full forward
    assert all(r["ok"] and (k in decode or r["audit_ok"]) for k, r in rows.items()), [
        k for k, r in rows.items() if not r["ok"]
    ]
    # Folded: the experts' all-to-all spans (ep, tp) and nothing else exchanges expert rows (no tp gather or
    # reduce-scatter of them: the audit's expected set has none, and the audit is clean).
    for case_id, r in rows.items():
        if case_id.startswith("expert_tp1") and case_id not in decode:
            a2a = [axes for kind, axes in r["collectives"] if kind == "all-to-all"]
            assert a2a == [["ep", "tp"]] or (a2a == [["tp"]] and "pp4-tp2" in case_id), (case_id, a2a)
    # Full size (scripts/compile_layouts.py): the current planner within 5% of the compiler for every row, its bytes
    # per collective kind the HLO's; ZeRO-1 lowers the seed's and Mixtral's memory.
    with open(f"{ROOT}/docs/results/layouts_memory.json") as f:
        full = json.load(f)["rows"]
    assert {(r["name"], r["option"], str(r["value"])) for r in full} >= {
        ("seed-128", "zero", "0"), ("seed-128", "zero", "1"), ("seed-128", "expert_tp", "1"),
        ("mixtral-8x7b-64", "expert_tp", "tp"), ("mixtral-8x7b-64", "expert_tp", "1")}  # fmt: skip
    for r in full:
        cfg = load_config(r["model"], r["layout"], r["overrides"])  # as compiled
        planned = memory(cfg, backend="cpu")["total"]
        assert abs(planned / r["memory"]["compiled"] - 1) <= 0.05, (r["name"], r["option"], r["value"])
        assert r["bytes_by_kind"]["planned"] == r["bytes_by_kind"]["compiled"] and r["audit_ok"]
    zero = {(r["name"], r["value"]): r["memory"]["compiled"] for r in full if r["option"] == "zero"}
    for name in {n for n, _ in zero}:
        assert zero[(name, 1)] < zero[(name, 0)], name
    # The vocabulary split over tp: the state the embedding and head keep for the whole step (fp32 weights and AdamW
    # moments, V x D x (1 - 1 / tp) elements each, ZeRO-1's slice of the moments) shrinks by exactly its share in the
    # compiled parameters and optimizer state, and the compiled total by at least that. Their gradients are not
    # counted: whether a whole one is live at the peak is the scheduler's choice (Mixtral's unsplit 1F1B + ZeRO-1
    # step, since its gradient norm became per weight, reaches its peak with the head's gradient already
    # reduce-scattered: 524 MB fewer gradient bytes there, 42.27 GB in all where it was 42.64).
    vocab = {(r["name"], r["value"]): r for r in full if r["option"] == "vocab_split"}
    assert {n for n, _ in vocab} == {"seed-128", "mixtral-8x7b-64", "qwen3-30b-a3b-64"}
    for name in ("seed-128", "mixtral-8x7b-64"):
        whole, split = vocab[(name, "none")], vocab[(name, "tp")]
        share = edge_state_bytes(load_config(whole["model"], whole["layout"], whole["overrides"])) - edge_state_bytes(
            load_config(split["model"], split["layout"], split["overrides"])
        )

        def state(r):
            return sum(p["compiled"] for p in r["parts"] if p["part"] in ("parameters", "optimizer_state"))

        assert share > 0 and state(whole) - state(split) == share, (name, state(whole) - state(split), share)
        assert split["memory"]["compiled"] <= whole["memory"]["compiled"] - share, name
    # Over pp as well, each stage holds and computes a share of the embedding and head: less memory (not by their
    # whole share under GPipe, which holds the last stage's outputs summed to every stage, [M, B, S/tp, D] fp32) and,
    # where the head is a large part of the step, fewer FLOPs per device (the compiled count).
    for name in ("seed-128", "mixtral-8x7b-64", "qwen3-30b-a3b-64"):
        assert vocab[(name, "tp_pp")]["memory"]["compiled"] < vocab[(name, "tp")]["memory"]["compiled"], name
    for name in ("seed-128", "qwen3-30b-a3b-64"):
        assert vocab[(name, "tp_pp")]["flops"]["compiled"] < 0.9 * vocab[(name, "tp")]["flops"]["compiled"], name


def edge_state_bytes(cfg) -> int:
    """A device's bytes of the state the embedding and head keep through the step: fp32 weights and their AdamW
    moments (ZeRO-1's slice of them where it splits them)."""
    from moe_jax.model.params import param_shards

    return sum(4 * p["local"] + 8 * p["zero_local"] for p in param_shards(cfg) if p["path"] in ("embed", "head"))


def test_zero1_gradients_equal_one_device_and_leave_by_reduce_scatter():
    """ZeRO-1 on dp2-ep2-tp2 live (the matrix's case, docs/layouts.md, where it also trains against ZeRO-0): its own
    gradient step (gradients reduce-scattered over the batch axes to the shards that update them) against one
    device, fp32 1e-5, and the audit of the very program checked."""
    from moe_jax.verify import matrix

    cfg = matrix.config(matrix.case("zero1 dp2-ep2-tp2"))
    assert cfg.layout.zero == 1 and (cfg.layout.dp, cfg.layout.ep, cfg.layout.tp) == (2, 2, 2)
    mesh = make_mesh(cfg.layout)
    result = verify(cfg, mesh, programs=True)
    assert result["ok"] and result["tolerance"] == 1e-5, result["errors"]
    lowered, compiled = result.pop("programs")
    checked = audit(lowered.as_text(dialect="hlo"), compiled.as_text(), cfg, assignment(cfg, mesh))
    assert checked["ok"], checked["unexpected"]
    kinds = {(c["kind"], tuple(c["axes"])) for c in checked["collectives"]}
    assert ("reduce-scatter", ("dp", "ep")) in kinds, sorted(kinds)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["layout.zero=2"], r"layout.zero=2: valid: 0 \(optimizer state like the weights\), 1"),
        (["layout.zero=1", "model.d_model=50"],
         r"layout.zero=1: weight blocks/attn_norm/scale \(local shape \(4, 50\)\) has no weight dimension that ep = 4 "
         r"divides.*valid: layout.zero=0, or layout.ep dividing one of \(50,\)"),
        (["layout.expert_tp=2"], r"layout.expert_tp='2': valid: tp, 1"),
        (["layout.expert_tp=1", "model.experts=4"],
         r"layout.expert_tp='1': folds the experts over layout.ep x layout.tp = 4 x 2 = 8 devices, which must divide "
         r"model.experts=4; valid: layout.expert_tp=tp, or ep x tp in 1, 2, 4"),
        # folded, the shared expert is still split over tp (only the routed experts are whole)
        (["layout.expert_tp=1", "model.shared_hidden=41"], r"layout.tp=2: must divide model.shared_hidden=41"),
        (["model.expert_hidden=41"], r"layout.tp=2: must divide model.expert_hidden=41"),
        (["layout.vocab_split=pp"], r"layout.vocab_split='pp': valid: tp, tp_pp, none"),
    ],
)  # fmt: skip
def test_bad_zero_or_folding_input_is_one_line(overrides, match):
    from moe_jax.config import ConfigError

    with pytest.raises(ConfigError, match=match) as e:
        load_config("configs/tiny.yaml", "meshes/cpu8-ep4-tp2.yaml", overrides)
    assert "\n" not in str(e.value)


def test_folded_experts_need_not_split_their_hidden_over_tp():
    """The one rule folding lifts: whole experts take an expert width that tp does not divide (41 over tp 2)."""
    cfg = load_config("configs/tiny.yaml", "meshes/cpu8-ep4-tp2.yaml", ["layout.expert_tp=1", "model.expert_hidden=41"])
    assert cfg.layout.folded and cfg.model.expert_hidden == 41
