"""Serving on 8 fake devices: N decode steps after a prefill give the logits of one full-sequence forward (fp32
relative 1e-5, dropless); the seed's decode step at batch 128 and sequence 10240 compiles on seed-128 and the planner's
memory is within 5% (tests/test_full_size.py); sampling; generate's bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

from moe_jax.compile import lower
from moe_jax.config import ConfigError
from moe_jax.hlo import audit
from moe_jax.load import load_config
from moe_jax.mesh import assignment, make_mesh
from moe_jax.parallel.sharded import ShardedModel
from moe_jax.serve.generate import check_lengths, sample
from moe_jax.train.checkpoint import Checkpoints
from moe_jax.train.step import init_train_state, make_optimizer
from moe_jax.verify.matrix import decode_against_forward

FP32_RTOL = 1e-5


@pytest.mark.parametrize(
    "layout",
    [
        ["layout.dp=2", "layout.ep=2", "layout.tp=2"],
        ["layout.pp=2", "layout.ep=2", "layout.tp=2", "layout.microbatches=4", "layout.repeats=2", "model.layers=8"],
    ],
    ids=["dp2-ep2-tp2", "pp2-circular"],  # pp4-tp2, pp2-ep2-tp2, ep8, ep2-tp4: the families, test_hf.py
)
def test_decode_after_prefill_equals_full_forward(layout):
    cfg = load_config("configs/tiny.yaml", None, ["model.dispatch=dropless", "run.dtype=fp32", *layout])
    prompt, n = 5, 6
    d = decode_against_forward(cfg, prompt, n)  # logits of positions prompt - 1 .. prompt + n - 2, both ways
    np.testing.assert_allclose(d["got"], d["want"], rtol=FP32_RTOL, atol=FP32_RTOL * np.abs(d["want"]).max())
    mesh, srv, step, full = d["mesh"], d["srv"], d["step"], d["tokens"]
    params, rest, ck, cv = d["params"], d["rest"], d["ck"], d["cv"]

    # The same two compiled programs (prefill of 5 tokens, decode of 1) run exactly the expected collectives.
    table = assignment(cfg, mesh)
    for new_tokens, step_kind in ((prompt, "prefill"), (1, "decode")):
        with jax.set_mesh(mesh):
            lowered = step.lower(params, rest, ck, cv, srv.put_tokens(full[:, :new_tokens]), jnp.int32(0))
        before, after = lowered.as_text(dialect="hlo"), lowered.compile().as_text()
        as_run = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seq_len=new_tokens))  # a prefill's length
        result = audit(before, after, as_run, table, step=step_kind)
        assert result["ok"], (step_kind, result["unexpected"])


def test_serving_audit_fails_on_a_stray_collective_or_a_wrong_step():
    cfg = load_config("configs/tiny.yaml", None, ["layout.ep=4", "layout.tp=2", "run.seq_len=4"])
    mesh = make_mesh(cfg.layout)
    lowered = lower(cfg, mesh, "decode")  # one token against a cache of run.seq_len = 4 positions
    before, after, table = lowered.as_text(dialect="hlo"), lowered.compile().as_text(), assignment(cfg, mesh)
    assert audit(before, after, cfg, table, step="decode")["ok"]
    # Audited as a prefill of 4 tokens, the decode program's collectives carry a quarter of the expected bytes.
    wrong = audit(before, after, cfg, table, step="prefill")
    assert not wrong["ok"] and {u["kind"] for u in wrong["unexpected"]} >= {"all-to-all", "all-reduce"}
    # A stray all-gather over ep (as if expert weights were gathered) in the compiled program is caught.
    lines = after.splitlines()
    entry = next(i for i, ln in enumerate(lines) if ln.startswith("ENTRY"))
    lines.insert(entry + 1, "  %stray = f32[4,32]{1,0} all-gather(f32[4,8]{1,0} %p), channel_id=99, "
                 "replica_groups={{0,2,4,6},{1,3,5,7}}, dimensions={1}, use_global_device_ids=true")  # fmt: skip
    stray = audit(before, "\n".join(lines), cfg, table, step="decode")
    assert [u["why"] for u in stray["unexpected"] if u.get("name") == "stray"] == ["not in the expected set"]


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


def test_generate_cli_and_its_bad_input(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)  # no demo checkpoint here: fresh weights
    ok = cli("generate", "--prompt-tokens", "1,5,9", "--max-new", "4")
    assert ok.returncode == 0, ok.stderr
    assert "[1, 5, 9] -> [" in ok.stdout and "weights:" in ok.stdout
    again = cli("generate", "--prompt-tokens", "1,5,9", "--max-new", "4")
    assert again.stdout.split("prefill")[0] == ok.stdout.split("prefill")[0]  # greedy is deterministic

    long = cli("generate", "--prompt-tokens", "1,2", "--max-new", "20000")
    assert long.returncode == 2 and long.stderr.count("\n") == 1
    assert "prompt length 2 + --max-new 20000 = 20002: longer than the maximum sequence 10240" in long.stderr
    odd = cli("generate", "--prompt-tokens", "1,2", "--batch", "3")
    assert odd.returncode == 2 and "--batch=3: must be a positive multiple of" in odd.stderr

    ck = tmp_path / "ck"  # a checkpoint of another model (what it holds, not how it was trained, is the point)
    cfg = load_config(f"{ROOT}/configs/tiny.yaml", f"{ROOT}/meshes/cpu8-pp2-ep2-tp2.yaml", ["model.expert_hidden=80"])
    sm = ShardedModel.build(cfg, make_mesh(cfg.layout))
    Checkpoints(str(ck)).save(sm, cfg, init_train_state(sm, make_optimizer(cfg.run))._replace(step=1))
    # without --config generate takes the checkpoint's own model (test_hf.py); with one, they must agree
    other = cli("generate", "--prompt-tokens", "1,2", "--checkpoint", str(ck), "--config", f"{ROOT}/configs/tiny.yaml")
    assert other.returncode == 2 and other.stderr.count("\n") == 1
    assert (
        "was written for another model" in other.stderr
        and "['params']['blocks']['moe']['w_in'].value has shape (4, 8, 48, 80) there, (4, 8, 48, 40) here"
        in other.stderr
    )
