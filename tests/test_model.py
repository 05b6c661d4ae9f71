"""The model on one device against naive references: MoE outputs and gradients, capacity drops, causality, the
parameter count, the router losses, fp16 at long sequences, and bad token ids.

Tolerances: fp32 relative 1e-5 (relative to each leaf's largest element, see conftest.assert_tree_close).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_tree_close
from flax import nnx

from moe_jax.config import ConfigError
from moe_jax.load import load_config
from moe_jax.model.moe import MoE, Routing, capacity, plan_dispatch, route, router_stats
from moe_jax.model.params import active_params_per_token, param_counts, total_params
from moe_jax.model.reference import naive_moe, naive_router_losses, overflow_mask
from moe_jax.model.transformer import (
    ONE_DEVICE,
    abstract_model,
    check_tokens,
    cross_entropy,
    from_groups,
    init_model,
    loss_fn,
    run_blocks,
    to_groups,
)
from moe_jax.sharding import Axes

FP32_RTOL = 1e-5


def tiny(*overrides):
    return load_config("configs/tiny.yaml", None, list(overrides))


def naive_route(x_TD, w_DE, k):
    """softmax then argsort, written without the model's code."""
    probs = jax.nn.softmax(x_TD @ w_DE, axis=-1)
    experts = jnp.argsort(-probs, axis=-1)[:, :k]
    gates = jnp.take_along_axis(probs, experts, axis=-1)
    return experts, gates / gates.sum(-1, keepdims=True)


def moe_and_reference(cfg, x_GTD):
    """The model's MoE and the naive loop over experts, each a jitted function of (weights, x); the reference's
    keep mask comes from the independent host-side count (`overflow_mask`) on the naive routing."""
    moe = MoE(cfg.model, out_std=0.02, rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(moe)
    e, k = cfg.model.experts, cfg.model.top_k
    cap = capacity(cfg.model, x_GTD.shape[1])

    @jax.jit
    def model_fn(state, x):
        return nnx.merge(graphdef, state)(x, ONE_DEVICE, jnp.float32)

    @jax.jit
    def reference_fn(state, x, keep_GTR):
        m = nnx.merge(graphdef, state)
        w_gate = None if m.w_gate is None else m.w_gate[...]
        ys = []
        for g in range(x.shape[0]):
            experts, gates = naive_route(x[g], m.router[...], k)
            ys.append(naive_moe(x[g], experts, gates, keep_GTR[g], m.w_in[...], w_gate, m.w_out[...]))
        return jnp.stack(ys)

    def keep_mask(state, x):
        experts = [np.asarray(naive_route(x[g], state["router"][...], k)[0]) for g in range(x.shape[0])]
        return np.stack([overflow_mask(ex, e, cap) for ex in experts])

    return state, model_fn, reference_fn, keep_mask


@pytest.mark.parametrize(
    "groups,ffn,dispatch",
    [(1, "gelu", "dropless"), (3, "swiglu", "dropless"), (1, "gelu", "ragged"), (3, "swiglu", "ragged")],
)
def test_dropless_moe_equals_naive_loop_outputs_and_gradients(ffn, groups, dispatch):
    """Dropless buffers, and ragged dispatch (pairs sorted by expert, grouped matmuls: `lax.ragged_dot`), both equal
    the naive loop over experts, so each other (fp32). Ragged's capacity factor is ignored: 0.5 changes nothing."""
    cfg = tiny(f"model.dispatch={dispatch}", f"model.ffn={ffn}", "model.capacity_factor=0.5")
    x = jax.random.normal(jax.random.key(0), (groups, 37, cfg.model.d_model))
    state, model_fn, reference_fn, keep_mask = moe_and_reference(cfg, x)
    keep = keep_mask(state, x)
    y, stats = model_fn(state, x)
    y_ref = reference_fn(state, x, keep)
    assert keep.all() and float(stats["dropped"]) == 0.0
    assert_tree_close(y, y_ref, FP32_RTOL, "output")

    cot = jax.random.normal(jax.random.key(1), y.shape)
    g_model = jax.jit(jax.grad(lambda s, x: jnp.sum(model_fn(s, x)[0] * cot), argnums=(0, 1)))(state, x)
    g_ref = jax.jit(jax.grad(lambda s, x: jnp.sum(reference_fn(s, x, keep) * cot), argnums=(0, 1)))(state, x)
    assert_tree_close(g_model, g_ref, FP32_RTOL, "grad")
    # The router gets a gradient through the gates: the test would pass vacuously if it were zero.
    assert float(jnp.max(jnp.abs(g_model[0]["router"][...]))) > 0


@pytest.mark.parametrize("kv,vk,scale", [(4, 12, None), (2, 7, 0.3)])  # MHA; GQA with values narrower than keys
def test_attention_implementations_equal_the_blockwise_reference(kv, vk, scale):  # and a scale of their own (MLA's)
    """jax.nn.dot_product_attention (xla: the one implementation this CPU runs besides ours), block skipping (key
    blocks the causal mask hides are not scored) and flash (key blocks too, an online softmax and its own VJP) equal
    the blockwise reference at a sequence of 4 blocks (of 8 rows here: the code path of 512-row blocks at 2048, at a
    cost a test can pay), outputs and gradients in fp32 (1e-5 of each leaf's largest; flash measured 5e-7); cudnn is
    refused in one line where there is no GPU."""
    from moe_jax.model.layers import attend, causal_attention, flash_attention

    r = np.random.default_rng(0)
    q, k = (jnp.asarray(r.normal(size=(2, 32, n, 12)), jnp.float32) for n in (4, kv))
    v = jnp.asarray(r.normal(size=(2, 32, kv, vk)), jnp.float32)
    cot = jnp.asarray(r.normal(size=(2, 32, 4, vk)), jnp.float32)
    blockwise = functools.partial(causal_attention, block=8, scale=scale)

    def out_and_grads(f):  # one program per implementation: the output and its vjp
        @jax.jit
        def run(q, k, v):
            out, vjp = jax.vjp(f, q, k, v)
            return out, vjp(cot)

        return run(q, k, v)

    want = out_and_grads(blockwise)
    for name, f in (("xla", lambda q, k, v: attend(q, k, v, "xla", scale=scale)),
                    ("skip", lambda q, k, v: blockwise(q, k, v, skip=True)),
                    ("flash", lambda q, k, v: flash_attention(q, k, v, block=8, scale=scale)),
                    ("flash in one block", lambda q, k, v: attend(q, k, v, "flash", scale=scale, block=64))):  # fmt: skip
        assert_tree_close(out_and_grads(f), want, FP32_RTOL, name)
    with pytest.raises(ConfigError) as e:
        attend(q, k, v, "cudnn")
    assert str(e.value) == ("model.attention_impl='cudnn': cuDNN fused attention needs a GPU; this process runs on cpu; "
                            "valid here: auto, xla, blockwise, flash")  # fmt: skip


def test_flash_attention_memory_is_linear_in_the_sequence():
    """Flash's gradient compiled alone at seed-128's per-device shapes (one sequence, 8 heads of 64, fp16): its
    temporaries grow no faster than the sequence from 8192 to 16384 positions (a score-sized term would quadruple them;
    at 16384 the causal mask alone would be 2 GiB), and the scan runs exactly the n(n+1)/2 causal block pairs."""
    from moe_jax.hlo import while_trip_counts
    from moe_jax.model.layers import flash_attention

    temps, trips = {}, {}
    for s in (8192, 16384):
        x = jax.ShapeDtypeStruct((1, s, 8, 64), jnp.float16)
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(flash_attention(q, k, v).astype(jnp.float32)), (0, 1, 2)))
        lowered = grad.lower(x, x, x)
        temps[s] = lowered.compile().memory_analysis().temp_size_in_bytes
        trips[s] = sorted(set(while_trip_counts(lowered.as_text(dialect="hlo"))))
    assert temps[16384] <= 2.1 * temps[8192], temps
    assert temps[16384] < 8 * 16384 * 16384 / 8, temps  # an eighth of the mask's bytes
    assert trips == {8192: [16 * 17 // 2], 16384: [32 * 33 // 2]}, trips


def test_capacity_mode_drops_exactly_the_overflow_and_matches_reference():
    cfg = tiny("model.dispatch=capacity", "model.capacity_factor=1.0")
    # A router biased towards expert 0 so that it overflows.
    x = jax.random.normal(jax.random.key(5), (2, 40, cfg.model.d_model)) + 0.5
    state, model_fn, reference_fn, keep_mask = moe_and_reference(cfg, x)
    state["router"][...] = state["router"][...].at[:, 0].add(0.3)
    cap = capacity(cfg.model, 40)
    assert cap == 10  # ceil(2 x 40 / 8 x 1.0)

    r = route(x, state["router"][...], None, cfg.model)
    plan = jax.vmap(plan_dispatch, in_axes=(0, None, None))(r.experts_GTR, cfg.model.experts, cap)
    y, stats = model_fn(state, x)
    keep = keep_mask(state, x)
    y_ref = reference_fn(state, x, keep)
    assert np.array_equal(np.asarray(plan.keep_TR), keep)
    assert (~keep).sum() > 5, "the test must see drops"
    assert float(stats["dropped"]) == (~keep).sum()
    assert_tree_close(y, y_ref, FP32_RTOL, "output")
    cot = jax.random.normal(jax.random.key(1), y.shape)
    g_model = jax.jit(jax.grad(lambda s: jnp.sum(model_fn(s, x)[0] * cot)))(state)
    g_ref = jax.jit(jax.grad(lambda s: jnp.sum(reference_fn(s, x, keep) * cot)))(state)
    assert_tree_close(g_model, g_ref, FP32_RTOL, "grad")


def test_dispatch_priority_top1_before_top2_then_token_order():
    # Expert 0 with capacity 2: token 2's top-1 beats tokens 0 and 1's top-2 choices.
    experts = jnp.array([[1, 0], [2, 0], [0, 1]])
    plan = plan_dispatch(experts, num_experts=3, cap=2)
    assert np.asarray(plan.keep_TR).tolist() == [[True, True], [True, False], [True, True]]
    assert np.array_equal(np.asarray(plan.keep_TR), overflow_mask(np.asarray(experts), 3, 2))


def test_groups_round_trip_with_prime_sizes():
    x = jax.random.normal(jax.random.key(0), (6, 35, 7))
    g = to_groups(x, (3, 5))
    assert g.shape == (15, 14, 7)
    # group index = batch block x 5 + sequence block: group 7 is rows 2:4, positions 14:21.
    assert np.array_equal(np.asarray(g[7]), np.asarray(x[2:4, 14:21].reshape(14, 7)))
    assert np.array_equal(np.asarray(from_groups(g, x.shape, (3, 5))), np.asarray(x))


def test_causality_dropless():
    """The output at position t has zero gradient with respect to every input after t."""
    cfg = tiny("model.dispatch=dropless")
    model = init_model(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 12, cfg.model.d_model))

    def logits_per_position(x):
        h, _ = run_blocks(model, x, ONE_DEVICE, jnp.float32)
        return jnp.sum(model.logits(h, jnp.float32), axis=(0, 2))  # [S]

    jac_SBSD = np.asarray(jax.jit(jax.jacrev(logits_per_position))(x))  # d out[t] / d x[b, s, :]
    for t in range(x.shape[1]):
        assert np.all(jac_SBSD[t, :, t + 1 :] == 0.0), f"position {t} depends on later positions"
        assert np.abs(jac_SBSD[t, :, : t + 1]).max() > 0


def test_param_count_tiny_equals_tree():
    for ffn in ("gelu", "swiglu"):
        cfg = tiny(f"model.ffn={ffn}")
        _, params, _ = nnx.split(init_model(cfg), nnx.Param, ...)
        assert sum(p.size for p in jax.tree.leaves(params)) == total_params(cfg.model)


def test_param_count_seed_equals_abstract_tree():
    cfg = load_config("configs/seed.yaml")
    _, params, _ = nnx.split(abstract_model(cfg), nnx.Param, ...)
    leaves = jax.tree.leaves(params)
    assert all(isinstance(p, jax.ShapeDtypeStruct) for p in leaves)  # nothing allocated
    assert sum(int(np.prod(p.shape)) for p in leaves) == total_params(cfg.model) == 4_428_694_528
    counts = param_counts(cfg.model)
    assert counts["experts"] == 16 * 64 * 2 * 1024 * 2048
    # Active per token: everything but 62 of 64 experts in every layer.
    assert active_params_per_token(cfg.model) == total_params(cfg.model) - counts["experts"] * 62 // 64


def _stats_for(experts_TR, logits_TE, e):
    t, k = experts_TR.shape
    probs = jax.nn.softmax(logits_TE, axis=-1)
    r = Routing(experts_TR[None], jnp.ones((1, t, k)) / k, probs[None], logits_TE[None])
    return router_stats(r, jnp.ones((1, t, k), bool), e, Axes())


def test_load_balancing_loss_minimum_and_skew():
    e, t = 8, 64
    uniform_experts = jnp.stack([jnp.arange(t) % e, (jnp.arange(t) + 1) % e], axis=1)
    stats = _stats_for(uniform_experts, jnp.zeros((t, e)), e)
    assert float(stats["lb_loss"]) == pytest.approx(1.0, rel=1e-6)  # the stated minimum
    assert float(stats["z_loss"]) == pytest.approx(float(np.log(e) ** 2), rel=1e-6)

    skew_logits = jnp.zeros((t, e)).at[:, 0].set(3.0).at[:, 1].set(2.0)
    skew_experts = jnp.tile(jnp.array([[0, 1]]), (t, 1))
    skew = _stats_for(skew_experts, skew_logits, e)
    lb_ref, z_ref = naive_router_losses(skew_logits, skew_experts, e)
    assert float(skew["lb_loss"]) > 1.5
    assert float(skew["lb_loss"]) == pytest.approx(lb_ref, rel=1e-6)
    assert float(skew["z_loss"]) == pytest.approx(z_ref, rel=1e-6)
    assert np.asarray(skew["tokens_per_expert"]).tolist() == [t, t] + [0] * (e - 2)


def test_loss_is_cross_entropy_plus_weighted_router_terms():
    cfg = tiny()
    model = init_model(cfg)
    tok = jax.random.randint(jax.random.key(0), (3, 12), 0, cfg.model.vocab)
    tgt = jnp.roll(tok, -1, axis=1)
    loss, m = nnx.jit(loss_fn)(model, tok, tgt)
    logits, _ = nnx.jit(lambda m, t: m(t))(model, tok)
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    ce = -np.mean(np.take_along_axis(np.asarray(logp), np.asarray(tgt)[..., None], axis=-1))
    assert float(m["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(cross_entropy(logits, tgt)) == pytest.approx(ce * tgt.size, rel=1e-5)
    want = ce + cfg.model.lb_loss_weight * float(m["lb_loss"]) + cfg.model.z_loss_weight * float(m["z_loss"])
    assert float(loss) == pytest.approx(want, rel=1e-5)


def test_fp16_forward_at_sequence_10240_equals_fp32():
    """The seed's dtype at its longest sequence: the fp16 forward's logits at every one of 10240 positions within 2e-2
    of the fp32 forward's (relative to the largest logit; measured 6e-4, the same in every quarter of the sequence:
    RoPE angles, the norms and the attention softmax keep their precision at late positions). Two layers: the second
    sees the first's fp16 output. Every expert takes every token (top_k = experts, capacity dispatch with room for all
    T), so no routing choice can flip between the dtypes: with top-2, a few positions whose two best experts are
    within fp16's rounding pick differently, and their outputs differ by up to 0.16, which is routing, not
    precision."""
    cfg = tiny("model.dispatch=capacity", "model.top_k=8", "run.seq_len=10240", "model.layers=2")
    model = init_model(cfg)
    tok = jax.random.randint(jax.random.key(0), (1, 10240), 0, cfg.model.vocab)
    forward = jax.jit(lambda m, t, dtype: m(t, ONE_DEVICE, dtype), static_argnums=2)
    (l16, s16), (l32, s32) = forward(model, tok, jnp.float16), forward(model, tok, jnp.float32)
    assert float(np.sum(s16["dropped"])) == float(np.sum(s32["dropped"])) == 0.0
    l16, l32 = np.asarray(l16, np.float64), np.asarray(l32, np.float64)
    assert np.isfinite(l16).all() and np.isfinite(np.asarray(s16["lb_loss"])).all()
    err_S = np.max(np.abs(l16 - l32), axis=-1)[0] / np.max(np.abs(l32))
    assert err_S.max() <= 2e-2, (err_S.argmax(), err_S.max())
    assert err_S.max() > 0  # fp16 computed something in fp16


def test_compute_dtype_policy_keeps_params_fp32_and_router_fp32():
    cfg = tiny("run.dtype=bf16")
    model = init_model(cfg)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    logits, stats = model(jnp.zeros((2, 12), jnp.int32), ONE_DEVICE, jnp.bfloat16)
    assert logits.dtype == jnp.float32 and stats["lb_loss"].dtype == jnp.float32


@pytest.mark.parametrize(
    "tokens,match",
    [
        (np.array([[0, 5, 97]]), r"token id 97 is outside the vocabulary; valid ids: 0\.\.96"),
        (np.array([[-1, 5]]), r"token id -1 is outside the vocabulary"),
        (np.array([[0.5, 1.0]]), r"dtype float64 is not an integer type"),
    ],
)
def test_bad_token_ids_are_refused_where_data_enters(tokens, match):
    with pytest.raises(ConfigError, match=match) as e:
        check_tokens(tokens, 97)
    assert "\n" not in str(e.value)


def test_expert_bias_changes_choice_not_gates():
    cfg = tiny("model.expert_bias=true")
    x = jax.random.normal(jax.random.key(0), (1, 20, cfg.model.d_model))
    w = jax.random.normal(jax.random.key(1), (cfg.model.d_model, cfg.model.experts))
    plain = route(x, w, None, cfg.model)
    bias = jnp.zeros(cfg.model.experts).at[7].set(10.0)
    biased = route(x, w, bias, cfg.model)
    assert (np.asarray(biased.experts_GTR)[..., 0] == 7).all()
    np.testing.assert_allclose(np.asarray(biased.probs_GTE), np.asarray(plain.probs_GTE))
    # Not the gates: they are the unbiased probabilities of the chosen experts, renormalised over the k (numpy, from
    # the plain routing's probabilities), so expert 7's gate is its own probability share, not one forced by the bias.
    probs = np.asarray(plain.probs_GTE, np.float64)
    chosen = np.take_along_axis(probs, np.asarray(biased.experts_GTR), axis=-1)
    want = chosen / chosen.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(biased.gates_GTR), want, rtol=1e-6)
    assert cfg.model.norm_topk and np.all(want[..., 0] < 1.0)
    # and the bias moved the choice away from the plain one (else the test shows nothing)
    assert (np.asarray(plain.experts_GTR)[..., 0] != 7).any()


def test_config_round_trips_through_yaml(tmp_path):
    """A config written as YAML (its dataclasses as dicts) loads back equal, field for field, with every section
    changed from the defaults it is read over."""
    import yaml

    cfg = tiny("model.experts=6", "run.lr=0.003", "layout.ep=2", "layout.tp=2", "layout.microbatches=2")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    assert load_config(str(path)) == cfg
    assert load_config(str(path)) != tiny()
