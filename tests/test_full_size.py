"""The seed's full-size model on 32, 128 and 512 fake devices, compile-only: one test per device count, each reading the
results of ONE process (tests/compile_checks.py: JAX starts its devices once and every program compiles once).

Checked there: each device's shards against the assignment and groups against mesh coordinates (128, 512); the
planner against the compiled train step, AdamW included (memory within 10%, bytes per collective kind exact, matmul
FLOPs within 5%) for seed-128, seed-128 circular and seed-512; the gradient step's collective audit with the all-to-all
bytes of the seed's formula (32, and ep 64 at 128); serving's decode at cache 10240 and prefill of 2048 audited and
planned within 10%.
"""

import json
import os

import pytest
from conftest import run_script_with_devices

from moe_jax.config import load_config
from moe_jax.layouts import load_pair
from moe_jax.plan.hardware import get_hardware
from moe_jax.plan.model import memory, plan, serve_memory

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


def check_planner(report: dict, layout: str, overrides: list[str]) -> None:
    """The planner against the compiled train step (AdamW included)."""
    assert report["audit_ok"], report["unexpected"]
    cfg = load_config("configs/seed.yaml", layout, overrides)
    compiled = report["memory_per_device_bytes"]["total"]
    assert 0 < compiled < 64 * 2**30  # fits the seed's 64 GB card
    planned = memory(cfg)["total"]
    err = (planned - compiled) / compiled
    print(f"{layout} {overrides}: planned {planned / 2**30:.3f} GiB, compiled {compiled / 2**30:.3f} GiB ({err:+.1%})")
    assert abs(err) <= 0.10, (layout, overrides, err)
    # Bytes per collective kind: the planner's equal the compiler's (lowered HLO, loops counted) exactly.
    hlo_bytes: dict[str, int] = {}
    for r in report["collectives"]:
        hlo_bytes[r["kind"]] = hlo_bytes.get(r["kind"], 0) + r["bytes_per_device"] * r["count_per_step"]
    assert plan(cfg, get_hardware("seed"))["bytes_by_kind"] == hlo_bytes
    # Matmul FLOPs: the analytic count within 5% of the dots in the HLO (elementwise work is not modelled).
    assert abs(plan(cfg, get_hardware("seed"))["flops_per_step"] / report["flops"] - 1) < 0.05


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
    """Decode at cache 10240 and a prefill of 2048 on seed-128: audited, and the planner within 10%."""
    assert decode["audit_ok"], decode["unexpected"]
    assert prefill_report["audit_ok"], prefill_report["unexpected"]
    mem, prefill = decode["memory_per_device_bytes"], prefill_report["memory_per_device_bytes"]
    planned_prefill = serve_memory(
        load_config("configs/seed.yaml", "meshes/seed-128.yaml", ["run.seq_len=2048"]), "prefill"
    )
    err = planned_prefill["total"] / prefill["total"] - 1
    print(f"prefill of 2048: compiled {prefill['total'] / 2**30:.3f} GiB, planned "
          f"{planned_prefill['total'] / 2**30:.3f} ({err:+.1%})")  # fmt: skip
    assert abs(err) <= 0.10
    cfg = load_config("configs/seed.yaml", "meshes/seed-128.yaml", ["run.seq_len=10240"])
    planned = serve_memory(cfg, "decode")
    err = planned["total"] / mem["total"] - 1
    print(f"decode, batch 128, cache 10240: compiled {mem['total'] / 2**30:.3f} GiB, planned "
          f"{planned['total'] / 2**30:.3f} GiB ({err:+.1%}), KV cache {planned['kv_cache'] / 2**30:.3f} GiB")  # fmt: skip
    assert abs(err) <= 0.10
    assert planned["kv_cache"] == 2 * 4 * 8 * 10240 * 8 * 64 * 2  # layers x rows x positions x heads x dim, fp16


def test_seed_on_32_fake_devices():
    check_seed_audit(compile_checks(32)["audit_seed32"], 32)


def test_seed_on_128_fake_devices():
    out = compile_checks(128)
    check_seed_layout(out["placement_seed128"], "seed-128", 128)
    check_planner(out["train_seed128"], "meshes/seed-128.yaml", [])
    check_planner(out["train_seed128_v4"], "meshes/seed-128.yaml", ["layout.repeats=4"])
    check_seed_audit(out["audit_ep64"], 128)
    check_serving(out["decode_seed128_10240"], out["prefill_seed128_2048"])


def test_seed_on_512_fake_devices():
    out = compile_checks(512)
    check_seed_layout(out["placement_seed512"], "seed-512", 512)
    check_planner(out["train_seed512"], "meshes/seed-512.yaml", [])
