"""The model families (Mixtral, Qwen3-MoE, OLMoE, Qwen1.5-MoE): presets' parameter counts against the published
figures, the options' one-device semantics against plain references, and every tiny family sharded on 8 fake devices
against one device (loss, router terms, every gradient), prefill + decode against the full forward, and the audit.

Tolerances (moe_jax.parallel.verify.TOLERANCE, relative to each leaf's largest element): fp32 1e-5, bf16 2e-2.
The full-size presets compile on 64 fake devices in tests/test_full_size.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.config import load_config
from moe_jax.hlo import audit
from moe_jax.mesh import assignment, make_mesh
from moe_jax.model.layers import Attention, rms_norm_heads
from moe_jax.model.moe import route
from moe_jax.model.params import active_params_per_token, total_params
from moe_jax.model.transformer import abstract_model
from moe_jax.parallel.verify import verify
from moe_jax.sharding import Axes

FAMILIES = ("mixtral", "qwen3", "olmoe", "qwen1.5-moe")

# Published totals and active parameters per token, in billions, with the precision they are published to.
PUBLISHED = {
    "mixtral-8x7b": (46.7, 12.9),  # Mistral AI, "Mixtral of experts" (arXiv:2401.04088)
    "qwen3-30b-a3b": (30.5, 3.3),  # the Qwen3-30B-A3B model card
    "olmoe-1b-7b": (6.9, 1.3),  # the OLMoE-1B-7B-0924 model card, arXiv:2409.02060
    "qwen1.5-moe-a2.7b": (14.3, 2.7),  # the Qwen1.5-MoE-A2.7B model card
}

# The layouts every tiny family is checked on (8 fake devices): the list.
LAYOUTS = {
    "ep4-tp2": ["layout.ep=4", "layout.tp=2"],
    "dp2-ep2-tp2": ["layout.dp=2", "layout.ep=2", "layout.tp=2"],
    "pp2-ep2-tp2": ["layout.pp=2", "layout.ep=2", "layout.tp=2", "layout.microbatches=2"],
    "pp2-circular": ["layout.pp=2", "layout.ep=2", "layout.tp=2", "layout.microbatches=4", "layout.repeats=2"],
    "pp4-tp2": ["layout.pp=4", "layout.ep=1", "layout.tp=2", "layout.microbatches=4"],
}

# Structure the presets do not have (DeepSeek's and Switch's), on tiny families: dense first layers under pp with
# sigmoid scores, grouped top-k, a routed scale, the aux-free bias and an ungated shared expert; MoE every second
# layer under circular pp.
DENSE_FIRST = [
    "model.layers=5", "model.dense_layers=1", "model.dense_hidden=36", "model.router_score=sigmoid",
    "model.expert_groups=4", "model.group_top_k=2", "model.routed_scale=2.5", "model.expert_bias=true",
    "model.shared_gate=false",
]  # fmt: skip
INTERLEAVED = ["model.layers=8", "model.moe_every=2", "model.dense_hidden=36"]


def tiny(family, *overrides):
    return load_config(f"configs/tiny-{family}.yaml", None, ["layout.pp=1", "layout.dp=1", *overrides])


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_preset_parameter_counts_equal_tree_and_published(preset):
    """The analytic count equals the abstract tree's exactly, and the published figures at their precision
    (Qwen3's active 3.35B is published as 3.3B: its card truncates, as Qwen3-235B-A22B's 22.19B reads 22B)."""
    cfg = load_config(f"configs/models/{preset}.yaml")
    _, params, _ = nnx.split(abstract_model(cfg), nnx.Param, ...)
    tree = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    assert tree == total_params(cfg.model)
    total, active = PUBLISHED[preset]
    assert round(tree / 1e9, 1) == total
    got_active = active_params_per_token(cfg.model) / 1e9
    if preset == "qwen3-30b-a3b":
        assert math.floor(got_active * 10) / 10 == active
    else:
        assert round(got_active, 1) == active


def test_router_options_match_a_plain_reference():
    """Sigmoid scores, grouped top-k (a group's score: its two best), no renormalisation, a routed scale: experts
    and gates as written out plainly in numpy."""
    cfg = tiny("qwen1.5-moe", "model.router_score=sigmoid", "model.expert_groups=4", "model.group_top_k=2",
               "model.norm_topk=false", "model.routed_scale=2.5").model  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (1, 30, cfg.d_model))
    w = jax.random.normal(jax.random.key(1), (cfg.d_model, cfg.experts)) * 0.3
    r = route(x, w, None, cfg)
    logits = np.asarray(x[0], np.float64) @ np.asarray(w, np.float64)
    scores = 1 / (1 + np.exp(-logits))
    per = cfg.experts // cfg.expert_groups
    for t in range(30):
        group_score = [np.sort(scores[t, g * per : (g + 1) * per])[-2:].sum() for g in range(cfg.expert_groups)]
        groups = np.argsort(group_score)[::-1][: cfg.group_top_k]
        allowed = [e for g in groups for e in range(g * per, (g + 1) * per)]
        best = sorted(allowed, key=lambda e: -scores[t, e])[: cfg.top_k]
        assert list(np.asarray(r.experts_GTR)[0, t]) == best
        np.testing.assert_allclose(np.asarray(r.gates_GTR)[0, t], 2.5 * scores[t, best], rtol=1e-5)
    # Renormalised softmax (Mixtral, Qwen3): the gates of the chosen experts sum to routed_scale.
    soft = tiny("mixtral", "model.routed_scale=1.5").model
    r2 = route(x, w[:, : soft.experts], None, soft)
    np.testing.assert_allclose(np.asarray(r2.gates_GTR).sum(-1), 1.5, rtol=1e-5)


def test_grouped_query_attention_is_attention_with_repeated_kv_heads():
    """kv_heads = 2 of 4: the same output as multi-head attention whose K and V weights repeat each K/V head for
    the 2 query heads that read it; the KV cache holds 2 heads."""
    gqa_cfg = tiny("mixtral").model
    mha_cfg = tiny("mixtral", "model.kv_heads=4").model
    gqa = Attention(gqa_cfg, 0.02, rngs=nnx.Rngs(0))
    mha = Attention(mha_cfg, 0.02, rngs=nnx.Rngs(1))
    mha.wq[...], mha.wo[...] = gqa.wq[...], gqa.wo[...]
    mha.wk[...] = jnp.repeat(gqa.wk[...], 2, axis=1)
    mha.wv[...] = jnp.repeat(gqa.wv[...], 2, axis=1)
    x = jax.random.normal(jax.random.key(2), (2, 12, gqa_cfg.d_model))
    np.testing.assert_allclose(gqa(x, Axes(), jnp.float32), mha(x, Axes(), jnp.float32), rtol=1e-5, atol=1e-6)
    assert gqa.wk.shape == (48, 2, 12)


def test_qk_norm_over_the_projection_spans_every_head():
    """OLMoE's QK-norm: RMS over all heads x head_dim of a token, one weight per element; per head (Qwen3): RMS
    over head_dim."""
    x = np.asarray(jax.random.normal(jax.random.key(3), (2, 5, 4, 6)), np.float64)
    scale = np.asarray(jax.random.normal(jax.random.key(4), (4, 6)), np.float64)
    got = rms_norm_heads(jnp.asarray(x, jnp.float32), jnp.asarray(scale, jnp.float32), 1e-6, 4, Axes())
    flat = x.reshape(2, 5, 24)
    want = (flat / np.sqrt(np.mean(flat**2, -1, keepdims=True) + 1e-6)).reshape(x.shape) * scale
    np.testing.assert_allclose(got, want, rtol=1e-5)
    per_head = rms_norm_heads(jnp.asarray(x, jnp.float32), jnp.asarray(scale[0], jnp.float32), 1e-6, 4, None)
    np.testing.assert_allclose(per_head, x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * scale[0], rtol=1e-5)


def run_verify(cfg):
    """Sharded against one device, then the HLO audit of the very program checked (its collectives equal the expected
    set: QK-norm statistics over tp, the shared expert's and the dense layers' tp gathers and reduce-scatters, the
    gradient sums derived from the parameter tree), with no second compile."""
    mesh = make_mesh(cfg.layout)
    result = verify(cfg, mesh, programs=True)
    assert result["ok"], (result["failed"], result["errors"])
    lowered, compiled = result.pop("programs")
    checked = audit(lowered.as_text(dialect="hlo"), compiled.as_text(), cfg, assignment(cfg, mesh))
    assert checked["ok"], checked["unexpected"]
    return result


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_family_fp32_equals_one_device(family, layout):
    """Loss, router terms and every gradient group (attention with its biases and QK-norms, the shared expert)."""
    result = run_verify(tiny(family, *LAYOUTS[layout]))
    assert result["tolerance"] == 1e-5
    groups = {"grad/attention", "grad/experts", "grad/router", "grad/norms", "lb_loss", "z_loss", "grad_norm"}
    if family == "qwen1.5-moe":
        groups.add("grad/shared")
    assert groups <= set(result["errors"])


@pytest.mark.parametrize(("family", "layout"), [("mixtral", "ep4-tp2"), ("qwen1.5-moe", "pp2-ep2-tp2")])
def test_family_bf16_equals_one_device(family, layout):
    assert run_verify(tiny(family, *LAYOUTS[layout], "run.dtype=bf16"))["tolerance"] == 2e-2


def test_dense_first_layers_under_pp_equal_one_device():
    """One dense first layer, run by stage 0 (held by every stage), then 4 MoE units over 2 stages; sigmoid scores,
    grouped top-k, a routed scale and the aux-free bias."""
    cfg = tiny("qwen1.5-moe", *LAYOUTS["pp2-ep2-tp2"], *DENSE_FIRST)
    result = run_verify(cfg)
    assert "grad/dense" in result["errors"]
    stages = {d["coords"]["pp"]: d["layers"] for d in assignment(cfg)["devices"]}
    assert stages == {0: [0, 1, 2], 1: [3, 4]}


def test_moe_every_second_layer_under_circular_pp_equals_one_device():
    cfg = tiny("mixtral", *LAYOUTS["pp2-circular"], *INTERLEAVED)
    result = run_verify(cfg)
    assert "grad/dense" in result["errors"]
    stages = {d["coords"]["pp"]: d["layers"] for d in assignment(cfg)["devices"]}
    assert stages == {0: [0, 1, 4, 5], 1: [2, 3, 6, 7]}  # unit (dense, MoE) c on stage c mod 2


def decode_equals_forward(cfg):
    from moe_jax.parallel.step import to_host
    from moe_jax.serve.step import ServeModel

    mesh = make_mesh(cfg.layout)
    srv = ServeModel.build(cfg, mesh, max_len=16)
    params, rest = srv.sm.init(0)
    ck, cv = srv.init_cache()
    prompt, n = 5, 4
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
    got = np.stack(outs, 1)
    model = nnx.merge(srv.sm.graphdef, srv.sm.to_global(to_host(params)), srv.sm.to_global(to_host(rest)))
    ref, _ = jax.jit(lambda m, t: m(t))(model, jnp.asarray(full))
    want = np.asarray(ref)[:, prompt - 1 : prompt + n - 1]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    return ck


@pytest.mark.parametrize(
    ("family", "extra"),
    [("mixtral", []), ("qwen3", []), ("olmoe", []), ("qwen1.5-moe", []), ("qwen1.5-moe", DENSE_FIRST),
     ("mixtral", ["layout.microbatches=4", "layout.repeats=2", *INTERLEAVED])],
    ids=["mixtral", "qwen3", "olmoe", "qwen1.5-moe", "dense-first", "interleaved-circular"],
)  # fmt: skip
def test_family_decode_after_prefill_equals_full_forward(family, extra):
    """pp 2 x ep 2 x tp 2, fp32 1e-5. The KV cache holds each device's K/V heads: Qwen3's one K/V head, whole on
    both tp ranks, is cached by each (the cache's head axis is tp wide); Mixtral's 2 are split."""
    cfg = tiny(family, *LAYOUTS["pp2-ep2-tp2"], *extra)
    ck = decode_equals_forward(cfg)
    heads = ck["blocks"].shape[-2]
    assert heads == {"mixtral": 2, "qwen3": 2, "olmoe": 4, "qwen1.5-moe": 4}[family]
    assert ck["blocks"].sharding.shard_shape(ck["blocks"].shape)[-2] == heads // 2
    if "model.dense_layers=1" in extra:
        assert ck["prologue"].shape[0] == 1


@pytest.mark.parametrize(
    ("family", "extra"),
    [("olmoe", []), ("qwen3", ["model.qk_norm=projection"])],
    ids=["olmoe-projection-norm-over-tp4", "qwen3-projection-norm-kv-whole-on-tp4"],
)
def test_tp4_equals_one_device(family, extra):
    """tp 4: OLMoE's QK-norm statistics summed over 4 ranks; Qwen3's one K/V head whole on 4 ranks with the norm
    over the projection (every K/V head projected, the rank's picked after the norm)."""
    run_verify(tiny(family, "layout.ep=2", "layout.tp=4", *extra))
