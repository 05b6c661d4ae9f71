"""Serving on 8 fake devices: N decode steps after a prefill give the logits of one full-sequence forward (fp32
relative 1e-5, dropless); the seed's decode step at batch 128 and sequence 10240 compiles on seed-128 and the planner's
memory is within 10%; sampling; generate's bad input."""

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_cli, run_with_devices
from flax import nnx

from moe_jax.config import ConfigError, load_config
from moe_jax.mesh import make_mesh
from moe_jax.parallel.step import to_host
from moe_jax.plan.model import serve_memory
from moe_jax.serve.generate import check_lengths, sample
from moe_jax.serve.step import ServeModel

FP32_RTOL = 1e-5


@pytest.mark.parametrize(
    "layout",
    [
        ["layout.dp=1", "layout.ep=4", "layout.tp=2"],
        ["layout.dp=2", "layout.ep=2", "layout.tp=2"],
        ["layout.pp=2", "layout.ep=2", "layout.tp=2", "layout.microbatches=2"],
        ["layout.pp=2", "layout.ep=2", "layout.tp=2", "layout.microbatches=4", "layout.repeats=2", "model.layers=8"],
        ["layout.pp=4", "layout.ep=1", "layout.tp=2", "layout.microbatches=4"],
    ],
    ids=["ep4-tp2", "dp2-ep2-tp2", "pp2-ep2-tp2", "pp2-circular", "pp4-tp2"],
)
def test_decode_after_prefill_equals_full_forward(layout):
    cfg = load_config("configs/tiny.yaml", None, ["model.dispatch=dropless", "run.dtype=fp32", *layout])
    mesh = make_mesh(cfg.layout)
    srv = ServeModel.build(cfg, mesh, max_len=16)
    params, rest = srv.sm.init(0)
    ck, cv = srv.init_cache()
    prompt, n = 5, 6
    full = np.random.default_rng(0).integers(0, cfg.model.vocab, (cfg.run.batch, prompt + n)).astype(np.int32)
    step = srv.step_fn()
    outs = []
    with jax.set_mesh(mesh):
        lg, ck, cv = step(params, rest, ck, cv, srv.put_tokens(full[:, :prompt]), jnp.int32(0))
        outs.append(srv.logits_to_host(lg))
        for i in range(n - 1):
            tok = srv.put_tokens(full[:, prompt + i : prompt + i + 1])
            lg, ck, cv = step(params, rest, ck, cv, tok, jnp.int32(prompt + i))
            outs.append(srv.logits_to_host(lg))
    got = np.stack(outs, 1)  # positions prompt - 1 .. prompt + n - 2
    model = nnx.merge(srv.sm.graphdef, srv.sm.to_global(to_host(params)), srv.sm.to_global(to_host(rest)))
    ref, _ = jax.jit(lambda m, t: m(t))(model, jnp.asarray(full))
    want = np.asarray(ref)[:, prompt - 1 : prompt + n - 1]
    np.testing.assert_allclose(got, want, rtol=FP32_RTOL, atol=FP32_RTOL * np.abs(want).max())


SEED_DECODE = textwrap.dedent(
    """
    import json
    from moe_jax.compile import compile_report
    from moe_jax.config import load_config
    from moe_jax.mesh import make_mesh
    cfg = load_config("configs/seed.yaml", "meshes/seed-128.yaml", ["run.seq_len=10240"])
    decode, _, _ = compile_report(cfg, make_mesh(cfg.layout), "decode")
    cfg = load_config("configs/seed.yaml", "meshes/seed-128.yaml", ["run.seq_len=2048"])
    prefill, _, _ = compile_report(cfg, make_mesh(cfg.layout), "prefill")
    print(json.dumps([decode["memory_per_device_bytes"], prefill["memory_per_device_bytes"]]))
    """
)


def test_seed_decode_at_10240_compiles_and_the_planner_is_within_10_percent():
    mem, prefill = json.loads(run_with_devices(128, SEED_DECODE).stdout.splitlines()[-1])
    planned_prefill = serve_memory(
        load_config("configs/seed.yaml", "meshes/seed-128.yaml", ["run.seq_len=2048"]), "prefill"
    )
    err = planned_prefill["total"] / prefill["total"] - 1
    print(
        f"prefill of 2048: compiled {prefill['total'] / 2**30:.3f} GiB, planned {planned_prefill['total'] / 2**30:.3f} ({err:+.1%})"
    )
    assert abs(err) <= 0.10
    cfg = load_config("configs/seed.yaml", "meshes/seed-128.yaml", ["run.seq_len=10240"])
    planned = serve_memory(cfg, "decode")
    err = planned["total"] / mem["total"] - 1
    print(f"decode, batch 128, cache 10240: compiled {mem['total'] / 2**30:.3f} GiB, planned "
          f"{planned['total'] / 2**30:.3f} GiB ({err:+.1%}), KV cache {planned['kv_cache'] / 2**30:.3f} GiB")  # fmt: skip
    assert abs(err) <= 0.10
    assert planned["kv_cache"] == 2 * 4 * 8 * 10240 * 8 * 64 * 2  # layers x rows x positions x heads x dim, fp16


def test_sampling():
    rng = np.random.default_rng(0)
    logits = np.array([[0.0, 3.0, 1.0, 2.0]] * 200)
    assert (sample(logits, rng) == 1).all()  # greedy
    top2 = sample(logits, rng, temperature=1.0, top_k=2)
    assert set(top2.tolist()) == {1, 3}  # only the two largest, both drawn
    with pytest.raises(ConfigError, match=r"--top-k=9: valid 1..4"):
        sample(logits, rng, temperature=1.0, top_k=9)
    with pytest.raises(ConfigError, match=r"prompt length 10 \+ --max-new 8 = 18: longer than the maximum sequence 16"):
        check_lengths(10, 8, 16)


def test_generate_cli_and_its_bad_input(tmp_path):
    ok = run_cli("generate", "--prompt-tokens", "1,5,9", "--max-new", "4")
    assert ok.returncode == 0, ok.stderr
    assert "[1, 5, 9] -> [" in ok.stdout and "weights:" in ok.stdout
    again = run_cli("generate", "--prompt-tokens", "1,5,9", "--max-new", "4")
    assert again.stdout.split("prefill")[0] == ok.stdout.split("prefill")[0]  # greedy is deterministic

    long = run_cli("generate", "--prompt-tokens", "1,2", "--max-new", "20000")
    assert long.returncode == 2 and long.stderr.count("\n") == 1
    assert "prompt length 2 + --max-new 20000 = 20002: longer than the maximum sequence 10240" in long.stderr
    odd = run_cli("generate", "--prompt-tokens", "1,2", "--batch", "3")
    assert odd.returncode == 2 and "--batch=3: must be a positive multiple of" in odd.stderr

    ck = tmp_path / "ck"
    trained = run_cli("train", "--config", "configs/tiny.yaml", "--layout", "meshes/cpu8-pp2-ep2-tp2.yaml", "--steps",
                      "1", "--checkpoint-dir", str(ck), "model.expert_hidden=80")  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    other = run_cli("generate", "--prompt-tokens", "1,2", "--checkpoint", str(ck))
    assert other.returncode == 2 and other.stderr.count("\n") == 1
    assert (
        "was written for another model" in other.stderr
        and "['params']['blocks']['moe']['w_in'].value has shape (4, 8, 48, 80) there, (4, 8, 48, 40) here"
        in other.stderr
    )
