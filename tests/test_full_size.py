"""The seed's full-size model on 32, 128 and 512 fake devices, compile-only: one test per device count, each reading the
results of ONE process (tests/compile_checks.py: JAX starts its devices once and every program compiles once).

Checked there: each device's shards against the assignment and groups against mesh coordinates (128, 512); the
planner against the compiled train step, AdamW included, part by part (every memory part and the total within 5%,
bytes per collective kind exact, matmul FLOPs within 2%) for seed-128 at seq 10240 (through `moe-jax plan --check`,
which is also run with a part made wrong), seed-128 circular and seed-512 at seq 2048 (docs/planner-accuracy.md's
grid has the seed-128 and seed-512 points); the gradient step's collective audit with the all-to-all bytes of the
seed's formula (32, and ep 64 at 128); serving's decode at cache 10240 and prefill of 2048 audited and planned within
5%.
"""

import json
import os

import pytest
from conftest import run_script_with_devices

from moe_jax.layouts import load_pair
from moe_jax.load import load_config
from moe_jax.plan.model import serve_memory

pytestmark = pytest.mark.slow


def compile_checks(devices: int) -> dict:
    proc = run_script_with_devices(devices, os.path.join("tests", "compile_checks.py"), str(devices))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_seed_layout(out: dict, name: str, devices: int) -> None:
    """Every parameter's shards on every device equal the assignment; groups equal those from mesh coordinates; a
    corrupted device row is caught; the seed's stages hold their own layers and all 64 experts of them."""
    assert out["checked"] == 12 * devices
    assert out["groups"] and out["caught"]
    cfg = load_pair(name)
    per_ep = 64 // cfg.layout.ep
    for d in out["devices"]:
        s, e = d["coords"]["pp"], d["coords"]["ep"]
        assert d["layers"] == [4 * s, 4 * s + 1, 4 * s + 2, 4 * s + 3]
        assert d["experts"] == list(range(per_ep * e, per_ep * (e + 1)))
    # Every stage holds all 64 experts of its own layers (the seed's mapping gives each stage 16).
    for s in range(4):
        held = {x for d in out["devices"] if d["coords"]["pp"] == s for x in d["experts"]}
        assert held == set(range(64))


SEED_PARTS = ("saved_for_backward", "gradients", "head_copy_or_gradient", "pipeline_buffers")


def check_planner(row: dict, name: str, card_gib: int = 64, nonzero: tuple[str, ...] = SEED_PARTS) -> None:
    """The planner against the compiled train step (AdamW included), a point of docs/planner-accuracy.md's grid:
    every memory part within 5% of the compiled total (the compiled buffers named as plan.check.classify does), the
    total within 5%, matmul FLOPs within 2% of the program's dots, collective bytes per kind equal, the audit clean."""
    mem, fl = row["memory"], row["flops"]
    print(f"{name}: planned {mem['planned'] / 2**30:.3f} GiB, compiled {mem['compiled'] / 2**30:.3f} GiB "
          f"({mem['error']:+.1%}), FLOPs {fl['error']:+.2%}; " + ", ".join(
              f"{r['part']} {r['planned'] / 2**30:.3f}/{r['compiled'] / 2**30:.3f}" for r in row["parts"]))  # fmt: skip
    assert 0 < mem["compiled"] < card_gib * 2**30  # fits the card (the seed's 64 GB; the presets' H100-80GB)
    assert row["ok"], row["failures"]
    assert abs(mem["error"]) <= 0.05 and abs(fl["error"]) <= 0.02
    assert row["bytes_by_kind"]["planned"] == row["bytes_by_kind"]["compiled"]
    # The compiled side read from XLA's buffer assignment adds up to XLA's own total; the arguments are the fp32
    # parameters and AdamW's two moments (and its step counters; with ZeRO-1 each replicated weight's moments split
    # over the batch axes).
    compiled = {r["part"]: r["compiled"] for r in row["parts"]}
    planned = {r["part"]: r["planned"] for r in row["parts"]}
    assert sum(compiled.values()) == mem["compiled"]
    # What the arena's packing loses (the planner does not model it): under 1% for GPipe's temporaries (the seed's
    # layouts); 1F1B's, buffers of conditional branches, pack less tightly: 1.47% of Mixtral-64's total, 1.29%
    # OLMoE's, 0.52% Qwen1.5-MoE's, 0.18% Qwen3's (docs/results/presets_64.json), so under 2%.
    packing = 0.02 if "1f1b" in name else 0.01
    assert 0 <= compiled["arena_packing"] < packing * mem["compiled"]
    assert 0 <= compiled["optimizer_state"] - planned["optimizer_state"] <= 16
    for part in nonzero:
        assert compiled[part] > 0, part


def check_plan_check_cli(out: dict) -> None:
    """`moe-jax plan --check` on seed-128 at seq 10240 prints the parts and exits 0; with the planner's residuals
    doubled it exits 1 and names that part."""
    right, wrong = out["right"], out["wrong"]
    assert right["code"] == 0, right["stdout"][-2000:] + right["stderr"]
    for part in ("parameters", "optimizer_state", "gradients", "saved_for_backward", "layer_working_set", "total"):
        assert part in right["stdout"], part
    assert "plan and compiler agree within 5%" in right["stdout"]
    assert wrong["code"] == 1, wrong["stdout"][-2000:]
    assert "memory part saved_for_backward" in wrong["stderr"], wrong["stderr"]


def check_seed_audit(out: dict, devices: int) -> None:
    """The seed's gradient step (ep = devices / 2, tp 2): collectives equal the expected set, every replica group is
    a group of the assignment, and the all-to-all moves E x C x D x 2 bytes (fp16), C = ceil(k T / E x 1.25)."""
    assert out["ok"], out["unexpected"]
    assert out["in_table"]
    e, d, layers = 64, 1024, 16
    c = out["capacity"]
    tokens = 128 // (devices // 2) * 2048 // 2
    assert c == -(-2 * tokens * 5 // (64 * 4))
    a2a = [r for r in out["collectives"] if r["kind"] == "all-to-all"]
    assert a2a == [{"kind": "all-to-all", "axes": ["ep"], "bytes_per_device": e * c * d * 2,
                    "count_per_step": 2 * 3 * layers}]  # fmt: skip
    kinds = {(r["kind"], tuple(r["axes"])) for r in out["collectives"]}
    assert ("all-gather", ("ep",)) not in kinds and ("all-gather", ("dp",)) not in kinds


def check_serving(decode: dict, prefill_report: dict) -> None:
    """Decode at cache 10240 and a prefill of 2048 on seed-128: audited, and the planner within 5% (measured
    +1.9% and +2.6%)."""
    assert decode["audit_ok"], decode["unexpected"]
    assert prefill_report["audit_ok"], prefill_report["unexpected"]
    mem, prefill = decode["memory_per_device_bytes"], prefill_report["memory_per_device_bytes"]
    planned_prefill = serve_memory(
        load_config("configs/seed.yaml", "meshes/seed-128.yaml", ["run.seq_len=2048"]), "prefill"
    )
    err = planned_prefill["total"] / prefill["total"] - 1
    print(f"prefill of 2048: compiled {prefill['total'] / 2**30:.3f} GiB, planned "
          f"{planned_prefill['total'] / 2**30:.3f} ({err:+.1%})")  # fmt: skip
    assert abs(err) <= 0.05
    cfg = load_config("configs/seed.yaml", "meshes/seed-128.yaml", ["run.seq_len=10240"])
    planned = serve_memory(cfg, "decode")
    err = planned["total"] / mem["total"] - 1
    print(f"decode, batch 128, cache 10240: compiled {mem['total'] / 2**30:.3f} GiB, planned "
          f"{planned['total'] / 2**30:.3f} GiB ({err:+.1%}), KV cache {planned['kv_cache'] / 2**30:.3f} GiB")  # fmt: skip
    assert abs(err) <= 0.05
    assert planned["kv_cache"] == 2 * 4 * 8 * 10240 * 8 * 64 * 2  # layers x rows x positions x heads x dim, fp16


def test_seed_on_32_fake_devices():
    check_seed_audit(compile_checks(32)["audit_seed32"], 32)


def test_presets_on_64_fake_devices():
    """Mixtral-8x7B, Qwen3-30B-A3B, OLMoE-1B-7B and Qwen1.5-MoE-A2.7B at full size on their 64-device layouts
    (meshes/): placement exact for every parameter on every device; the planner agrees with the compiled train step
    part by part within 5%, FLOPs within 5%, collective bytes per kind equal, the audit clean. Mixtral and
    Qwen1.5-MoE compile here, and their compiled figures must equal the committed ones (docs/results/presets_64.json,
    scripts/compile_presets.py), which makes that file the current program's; Qwen3-MoE and OLMoE are compared with
    their committed compiled figures by the current planner."""
    from moe_jax.plan.check import compiled_from_row

    out = compile_checks(64)
    assert sum(row["live"] for row in out.values()) == 2
    for name, row in out.items():
        assert row["checked"] == row["parameters"] * 64, name
        if row["live"]:
            assert compiled_from_row(row) == compiled_from_row(row["committed"]), f"{name}: rerun compile_presets.py"
        pipelined = load_pair(name).layout.pp > 1  # OLMoE's layout has no pipeline: no stage buffers, no head copy
        # the presets run 1F1B: no head copy (its gradient accumulates in the tick loop's carry)
        check_planner(row, f"{name} (1f1b)" if load_pair(name).layout.schedule == "1f1b" else name, 80,
                      ("saved_for_backward", "gradients", "pipeline_buffers") if pipelined
                      else ("saved_for_backward", "gradients"))  # fmt: skip


def test_seed_on_128_fake_devices():
    out = compile_checks(128)
    check_seed_layout(out["placement_seed128"], "seed-128", 128)
    check_plan_check_cli(out["plan_check_cli"])
    check_planner(out["plan_check_cli"]["right"]["report"], "seed-128 at seq 10240 (plan --check --json)")
    check_planner(out["plan_seed128_v4"], "seed-128 circular (v 4) at seq 2048")
    check_seed_audit(out["audit_ep64"], 128)
    check_serving(out["decode_seed128_10240"], out["prefill_seed128_2048"])


def test_seed_on_512_fake_devices():
    out = compile_checks(512)
    check_seed_layout(out["placement_seed512"], "seed-512", 512)
    check_planner(out["plan_seed512"], "seed-512")


def test_deepseek_v3_on_2048_fake_devices():
    """DeepSeek-V3 on its report's layout (pp 16 with stages of 4 and 3 MoE layers, dp 2, ep 64), compiled on 2048 fake
    devices by scripts/compile_deepseek.py (about 40 s of compile, more than the suite can spend: its figures are
    committed in docs/results/deepseek_v3_2048.json). The current planner agrees with those compiled figures: every
    memory part and the total within 5% of the compiled total, matmul FLOPs within 2%, collective bytes per kind
    equal, the HLO audit was clean; the decode step compiled with the latent cache (576 values per token and layer)
    and the serving plan within 10% of it, the one planner check held to more than 5%, and why: the arguments (the
    weights and the latent cache, 24.93 GB) agree to the byte, but the planned decode working set (8.68 GB) is 29%
    under XLA:CPU's temporaries (12.23 GB), a gap in the serving model not yet explained (measured -9.7% in all; the
    seed's decode is within 5%). The memory is XLA:CPU's (bf16 stored as fp32); the layout does not fit an 80 GB card
    as moe_jax trains it today (docs/benchmarks.md)."""
    from moe_jax.plan.check import compare, compiled_from_row

    with open(os.path.join("docs", "results", "deepseek_v3_2048.json")) as f:
        committed = json.load(f)
    cfg = load_pair("deepseek-v3-2048")
    assert cfg.layout.devices == 2048 and cfg.layout.stage_layers == (4,) * 10 + (3,) * 6
    assert committed["placement_checked"] == committed["parameters"] * 2048  # every shard on every device
    row = compare(cfg, compiled_from_row(committed["train"]), 0.05)
    assert row["ok"], row["failures"]
    assert abs(row["memory"]["error"]) <= 0.05 and abs(row["flops"]["error"]) <= 0.02
    assert row["bytes_by_kind"]["planned"] == row["bytes_by_kind"]["compiled"] and row["audit_ok"]
    decode = committed["decode"]
    planned = serve_memory(cfg, "decode")
    assert planned["kv_cache"] == decode["planned"]["kv_cache"]
    assert abs(planned["total"] - decode["compiled"]["total"]) <= 0.10 * decode["compiled"]["total"]
    # the cache is in the compiled program: it is donated (aliased) and at least the planned latent cache's size
    assert decode["compiled"]["alias"] >= planned["kv_cache"] and decode["audit_ok"]
