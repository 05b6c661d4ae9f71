"""The Hugging Face families moe_jax reads and writes: config.json <-> ModelConfig, and ONE tensor table per family.

A table maps each of our parameter paths, relative to a layer stack for the per-layer ones, to a Hugging Face tensor
name and a shape rule "HF dims -> our dims" written in letters (D width, H heads, G K/V heads, K head dim, E experts,
F a hidden width, V vocabulary; "1" a dimension of size 1). Letters in one HF dimension are merged row-major ("HK":
heads x head_dim), the order on the right is ours, and a letter on the right that the HF side lacks is indexed by the
name ({e}: one tensor per expert, stacked). So a new family is a table and two config functions, not a new loader.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from moe_jax.config import ConfigError, ModelConfig

# Rows of the whole model (no layer index).
GLOBAL = {
    "embed": ("model.embed_tokens.weight", "V,D -> VD"),
    "final_norm/scale": ("model.norm.weight", "D -> D"),
    "head": ("lm_head.weight", "V,D -> DV"),
}

# Rows of one layer, under "model.layers.{L}.". Linear weights are [out, in] there, [in, out] here.
ATTENTION = {
    "attn_norm/scale": ("input_layernorm.weight", "D -> D"),
    "ffn_norm/scale": ("post_attention_layernorm.weight", "D -> D"),
    "attn/wq": ("self_attn.q_proj.weight", "HK,D -> DHK"),
    "attn/wk": ("self_attn.k_proj.weight", "GK,D -> DGK"),
    "attn/wv": ("self_attn.v_proj.weight", "GK,D -> DGK"),
    "attn/wo": ("self_attn.o_proj.weight", "D,HK -> HKD"),
}
QKV_BIAS = {
    "attn/bq": ("self_attn.q_proj.bias", "HK -> HK"),
    "attn/bk": ("self_attn.k_proj.bias", "GK -> GK"),
    "attn/bv": ("self_attn.v_proj.bias", "GK -> GK"),
}
QK_NORM_PER_HEAD = {  # Qwen3: a weight of head_dim, shared by the heads
    "attn/q_norm": ("self_attn.q_norm.weight", "K -> K"),
    "attn/k_norm": ("self_attn.k_norm.weight", "K -> K"),
}
QK_NORM_OVER_PROJECTION = {  # OLMoE: a weight of heads x head_dim
    "attn/q_norm": ("self_attn.q_norm.weight", "HK -> HK"),
    "attn/k_norm": ("self_attn.k_norm.weight", "GK -> GK"),
}
DENSE_FFN = {  # a dense layer's SwiGLU FFN (gate_proj is SiLU's input, up_proj the other factor)
    "mlp/w_gate": ("mlp.gate_proj.weight", "F,D -> DF"),
    "mlp/w_in": ("mlp.up_proj.weight", "F,D -> DF"),
    "mlp/w_out": ("mlp.down_proj.weight", "D,F -> FD"),
}
SHARED_EXPERT = {  # Qwen2-MoE: the shared expert and the sigmoid gate on its output
    "shared/w_gate": ("mlp.shared_expert.gate_proj.weight", "F,D -> DF"),
    "shared/w_in": ("mlp.shared_expert.up_proj.weight", "F,D -> DF"),
    "shared/w_out": ("mlp.shared_expert.down_proj.weight", "D,F -> FD"),
    "shared/output_gate": ("mlp.shared_expert_gate.weight", "1,D -> D"),
}


LATENT_ATTENTION = {  # DeepSeek-V2/V3's multi-head latent attention (R: a rank; K: the per-head width of that row)
    "attn_norm/scale": ("input_layernorm.weight", "D -> D"),
    "ffn_norm/scale": ("post_attention_layernorm.weight", "D -> D"),
    "attn/wq": ("self_attn.q_proj.weight", "HK,D -> DHK"),
    "attn/wq_a": ("self_attn.q_a_proj.weight", "R,D -> DR"),
    "attn/q_a_norm/scale": ("self_attn.q_a_layernorm.weight", "R -> R"),
    "attn/wq_b": ("self_attn.q_b_proj.weight", "HK,R -> RHK"),
    "attn/wkv_a": ("self_attn.kv_a_proj_with_mqa.weight", "R,D -> DR"),
    "attn/kv_a_norm/scale": ("self_attn.kv_a_layernorm.weight", "R -> R"),
    "attn/wkv_b": ("self_attn.kv_b_proj.weight", "HK,R -> RHK"),
    "attn/wo": ("self_attn.o_proj.weight", "D,HK -> HKD"),
}
DEEPSEEK_SHARED = {  # n_shared_experts x moe_intermediate_size as one SwiGLU FFN, ungated
    "shared/w_gate": ("mlp.shared_experts.gate_proj.weight", "F,D -> DF"),
    "shared/w_in": ("mlp.shared_experts.up_proj.weight", "F,D -> DF"),
    "shared/w_out": ("mlp.shared_experts.down_proj.weight", "D,F -> FD"),
}
DEEPSEEK_BIAS = {"moe/bias": ("mlp.gate.e_score_correction_bias", "E -> E")}  # V3's aux-free bias (a buffer)


def experts(block: str, gate: str, up: str, down: str) -> dict[str, tuple[str, str]]:
    """The router and the routed SwiGLU experts, one HF tensor per expert."""
    return {
        "moe/router": (f"{block}.gate.weight", "E,D -> DE"),
        "moe/w_gate": (f"{block}.experts.{{e}}.{gate}.weight", "F,D -> EDF"),
        "moe/w_in": (f"{block}.experts.{{e}}.{up}.weight", "F,D -> EDF"),
        "moe/w_out": (f"{block}.experts.{{e}}.{down}.weight", "D,F -> EFD"),
    }


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the transformers class config.json names
    layer: dict[str, tuple[str, str]]  # per-layer rows
    model_fields: Callable[[dict[str, Any], str], dict[str, Any]]  # config.json -> ModelConfig fields
    hf_fields: Callable[[ModelConfig], dict[str, Any]]  # ModelConfig -> the family's config.json fields
    rest: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # per-layer state that is no Param
    extra_layers_ok: bool = False  # tensors of layers past num_hidden_layers are the MTP module: left unread


def _get(hf: dict[str, Any], key: str, where: str, default: Any = ...) -> Any:
    """hf[key]; `key` may be "a|b": the first present (transformers 5 renamed some fields: Qwen3-MoE's num_experts
    is saved as num_local_experts)."""
    for k in key.split("|"):
        if k in hf and hf[k] is not None:
            return hf[k]
    if default is ...:
        raise ConfigError(f"{where}: {key.split('|')[0]} missing; the model's config.json must give it")
    return default


def _int(hf: dict[str, Any], key: str, where: str, default: Any = ...) -> int:
    """`_get`, an integer: a whole number in the file (7, or 7.0), or one line naming the key and its value."""
    value = _get(hf, key, where, default)
    if value is default and default is not ...:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        name = next((k for k in key.split("|") if k in hf), key.split("|")[0])
        raise ConfigError(f"{where}: {name}={value!r}: expected an integer")
    return int(value)


def _refuse(hf: dict[str, Any], key: str, where: str, allowed: tuple, why: str) -> None:
    value = hf.get(key)
    if value not in allowed:
        raise ConfigError(f"{where}: {key}={value!r}: {why}")


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    """rope_theta, top-level (transformers 4) or in rope_parameters (5); only unscaled RoPE."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = value.get("rope_type", value.get("type", "default")) if isinstance(value, dict) else value
        if kind not in ("default", None):
            raise ConfigError(f"{where}: {name}.rope_type={kind!r}: only unscaled RoPE ('default') is supported")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _common(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """The fields every family spells the same way."""
    _refuse(hf, "hidden_act", where, ("silu",), "only SwiGLU (silu) FFNs are supported")
    heads = _int(hf, "num_attention_heads", where)
    d = _int(hf, "hidden_size", where)
    out = {
        "vocab": _int(hf, "vocab_size", where),
        "d_model": d,
        "layers": _int(hf, "num_hidden_layers", where),
        "heads": heads,
        "kv_heads": _int(hf, "num_key_value_heads", where, heads),
        "head_dim": _int(hf, "head_dim", where, d // heads),
        "ffn": "swiglu",
        "rope_theta": _rope_theta(hf, where),
        "norm_eps": float(_get(hf, "rms_norm_eps", where)),
        "init_std": float(_get(hf, "initializer_range", where, 0.02)),
        "max_seq_len": _int(hf, "max_position_embeddings", where),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "expert_bias": False,
        "router_score": "softmax",
        "expert_groups": 1,
        "group_top_k": 1,
        "routed_scale": 1.0,
        "qk_norm": "none",
        "qkv_bias": False,
        "shared_hidden": 0,
        "shared_gate": False,
        "dense_layers": 0,
        "moe_every": 1,
        "dense_hidden": 0,
    }
    if "router_aux_loss_coef" in hf:
        out["lb_loss_weight"] = float(hf["router_aux_loss_coef"])
    return out


def _hf_common(m: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": m.vocab,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "rope_theta": m.rope_theta,
        "rms_norm_eps": m.norm_eps,
        "initializer_range": m.init_std,
        "max_position_embeddings": m.max_seq_len,
        "tie_word_embeddings": m.tie_embeddings,
        "router_aux_loss_coef": m.lb_loss_weight,
        "num_experts_per_tok": m.top_k,
        "attention_dropout": 0.0,
    }


def _qwen_dense_layers(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """Qwen's layer kinds: layer i is dense when i is in mlp_only_layers or (i + 1) % decoder_sparse_step != 0."""
    step = _int(hf, "decoder_sparse_step", where, 1) or 1
    only = sorted(int(i) for i in hf.get("mlp_only_layers") or [])
    if step == 1 and only == list(range(len(only))):
        out = {"dense_layers": len(only)}
    elif not only:
        out = {"moe_every": step}
    else:
        raise ConfigError(
            f"{where}: mlp_only_layers={only} with decoder_sparse_step={step}: moe_jax runs dense layers first "
            "(mlp_only_layers = 0..k-1 with decoder_sparse_step 1) or every n-th layer MoE (no mlp_only_layers)"
        )
    if len(only) or step > 1:
        out["dense_hidden"] = _int(hf, "intermediate_size", where)
    return out


def _hf_qwen_dense_layers(m: ModelConfig) -> dict[str, Any]:
    out = {"decoder_sparse_step": m.moe_every, "mlp_only_layers": list(range(m.dense_layers))}
    if m.dense_hidden:
        out["intermediate_size"] = m.dense_hidden
    return out


def _no_sliding_window(hf: dict[str, Any], where: str) -> None:
    if hf.get("use_sliding_window") or (hf.get("sliding_window") and "use_sliding_window" not in hf):
        raise ConfigError(f"{where}: sliding_window={hf.get('sliding_window')!r}: sliding-window attention is not "
                          "supported (full causal attention only)")  # fmt: skip


def _mixtral(hf: dict[str, Any], where: str) -> dict[str, Any]:
    _no_sliding_window(hf, where)
    return dict(_common(hf, where), experts=_int(hf, "num_local_experts", where),
                top_k=_int(hf, "num_experts_per_tok", where), expert_hidden=_int(hf, "intermediate_size", where),
                norm_topk=True)  # fmt: skip


def _hf_mixtral(m: ModelConfig) -> dict[str, Any]:
    return dict(_hf_common(m), num_local_experts=m.experts, intermediate_size=m.expert_hidden, sliding_window=None,
                router_jitter_noise=0.0)  # fmt: skip


def _qwen3_moe(hf: dict[str, Any], where: str) -> dict[str, Any]:
    _no_sliding_window(hf, where)
    _refuse(hf, "attention_bias", where, (False, None), "a bias on the attention projections is not supported")
    out = dict(_common(hf, where), experts=_int(hf, "num_experts|num_local_experts", where),
               top_k=_int(hf, "num_experts_per_tok", where),
               expert_hidden=_int(hf, "moe_intermediate_size", where),
               norm_topk=bool(_get(hf, "norm_topk_prob", where, False)), qk_norm="head")  # fmt: skip
    return dict(out, **_qwen_dense_layers(hf, where))


def _hf_qwen3_moe(m: ModelConfig) -> dict[str, Any]:
    return dict(_hf_common(m), num_experts=m.experts, moe_intermediate_size=m.expert_hidden,
                norm_topk_prob=m.norm_topk, attention_bias=False, use_sliding_window=False, sliding_window=None,
                **_hf_qwen_dense_layers(m))  # fmt: skip


def _olmoe(hf: dict[str, Any], where: str) -> dict[str, Any]:
    _refuse(hf, "clip_qkv", where, (None,), "clipping q, k and v is not supported")
    _refuse(hf, "attention_bias", where, (False, None), "a bias on the attention projections is not supported")
    out = dict(_common(hf, where), experts=_int(hf, "num_experts|num_local_experts", where),
               top_k=_int(hf, "num_experts_per_tok", where),
               expert_hidden=_int(hf, "intermediate_size", where),
               norm_topk=bool(_get(hf, "norm_topk_prob", where, False)), qk_norm="projection")  # fmt: skip
    if "router_z_loss_coef" in hf:
        out["z_loss_weight"] = float(hf["router_z_loss_coef"])
    return out


def _hf_olmoe(m: ModelConfig) -> dict[str, Any]:
    return dict(_hf_common(m), num_experts=m.experts, intermediate_size=m.expert_hidden, norm_topk_prob=m.norm_topk,
                router_z_loss_coef=m.z_loss_weight, clip_qkv=None, attention_bias=False)  # fmt: skip


def _qwen2_moe(hf: dict[str, Any], where: str) -> dict[str, Any]:
    _no_sliding_window(hf, where)
    shared = _int(hf, "shared_expert_intermediate_size", where, 0) or 0
    out = dict(_common(hf, where), experts=_int(hf, "num_experts|num_local_experts", where),
               top_k=_int(hf, "num_experts_per_tok", where),
               expert_hidden=_int(hf, "moe_intermediate_size", where),
               norm_topk=bool(_get(hf, "norm_topk_prob", where, False)), qkv_bias=True, shared_hidden=shared,
               shared_gate=bool(shared))  # fmt: skip
    return dict(out, **_qwen_dense_layers(hf, where))


def _hf_qwen2_moe(m: ModelConfig) -> dict[str, Any]:
    return dict(_hf_common(m), num_experts=m.experts, moe_intermediate_size=m.expert_hidden,
                shared_expert_intermediate_size=m.shared_hidden, norm_topk_prob=m.norm_topk, use_sliding_window=False,
                sliding_window=None, qkv_bias=True, **_hf_qwen_dense_layers(m))  # fmt: skip


def _deepseek(hf: dict[str, Any], where: str, v3: bool) -> dict[str, Any]:
    """DeepSeek-V2 / V3: MLA, dense first layers, routed + shared experts; V3 sigmoid scores, grouped top-k and the
    aux-free bias. What moe_jax does not build is refused by name."""
    _refuse(hf, "attention_bias", where, (False, None), "a bias on the attention projections is not supported")
    _refuse(hf, "mlp_bias", where, (False, None), "biases in the FFNs are not supported")
    if v3:
        _refuse(hf, "rope_interleave", where, (True, None), "only DeepSeek's interleaved RoPE layout is built")
    heads = _int(hf, "num_attention_heads", where)
    kv = _int(hf, "num_key_value_heads", where, heads)
    if kv != heads:
        raise ConfigError(f"{where}: num_key_value_heads={kv}: latent attention has one K/V head per query head "
                          f"(num_attention_heads={heads})")  # fmt: skip
    if (_int(hf, "moe_layer_freq", where, 1) or 1) != 1:
        raise ConfigError(f"{where}: moe_layer_freq={hf['moe_layer_freq']!r}: only every layer after "
                          "first_k_dense_replace MoE (1) is supported")  # fmt: skip
    common = _common(hf, where)
    for key in ("head_dim", "kv_heads"):
        common.pop(key)
    groups = _int(hf, "n_group", where, 1) or 1
    out = dict(
        common,
        attention="mla",
        q_lora_rank=(_int(hf, "q_lora_rank", where, 0) or 0),
        kv_lora_rank=_int(hf, "kv_lora_rank", where),
        qk_nope_head_dim=_int(hf, "qk_nope_head_dim", where),
        qk_rope_head_dim=_int(hf, "qk_rope_head_dim", where),
        v_head_dim=_int(hf, "v_head_dim", where),
        experts=_int(hf, "n_routed_experts|num_local_experts|num_experts", where),
        top_k=_int(hf, "num_experts_per_tok", where),
        expert_hidden=_int(hf, "moe_intermediate_size", where),
        shared_hidden=(_int(hf, "n_shared_experts", where, 0) or 0) * _int(hf, "moe_intermediate_size", where),
        dense_layers=(_int(hf, "first_k_dense_replace", where, 0) or 0),
        routed_scale=float(hf.get("routed_scaling_factor") or 1.0),
    )
    if out["dense_layers"]:
        out["dense_hidden"] = _int(hf, "intermediate_size", where)
    if v3:  # sigmoid scores, the best topk_group of n_group groups (scored by their two best), the aux-free bias
        out.update(router_score="sigmoid", expert_groups=groups, group_top_k=(_int(hf, "topk_group", where, 1) or 1),
                   norm_topk=bool(hf.get("norm_topk_prob", True)), expert_bias=True)  # fmt: skip
    else:  # softmax scores, never renormalised; grouped top-k is V2's other rule, not V3's: refused unless trivial
        method = hf.get("topk_method") or "greedy"
        top_group = _int(hf, "topk_group", where, groups) or groups
        if method not in ("greedy", "group_limited_greedy") or (method != "greedy" and top_group < groups):
            raise ConfigError(f"{where}: topk_method={method!r} (n_group={groups}, topk_group={top_group}): only "
                              "'greedy' routing is built for DeepSeek-V2 (group-limited greedy with topk_group < "
                              "n_group is not)")  # fmt: skip
        out.update(norm_topk=False)
    if "aux_loss_alpha" in hf:
        out["lb_loss_weight"] = float(hf["aux_loss_alpha"])
    return out


def _hf_deepseek(m: ModelConfig, v3: bool) -> dict[str, Any]:
    out = _hf_common(m)
    out.pop("head_dim")
    out.update(n_routed_experts=m.experts, moe_intermediate_size=m.expert_hidden,
               n_shared_experts=m.shared_hidden // m.expert_hidden, first_k_dense_replace=m.dense_layers,
               routed_scaling_factor=m.routed_scale, q_lora_rank=m.q_lora_rank or None, kv_lora_rank=m.kv_lora_rank,
               qk_nope_head_dim=m.qk_nope_head_dim, qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim,
               attention_bias=False, mlp_bias=False, aux_loss_alpha=m.lb_loss_weight)  # fmt: skip
    if m.dense_hidden:
        out["intermediate_size"] = m.dense_hidden
    if v3:
        out.update(n_group=m.expert_groups, topk_group=m.group_top_k, norm_topk_prob=m.norm_topk,
                   rope_interleave=True)  # fmt: skip
    else:
        out.update(topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False)
    return out


def _check_deepseek_model(m: ModelConfig, v3: bool) -> None:
    """What a DeepSeek family can express of a ModelConfig (for export)."""
    want = {"attention": "mla", "ffn": "swiglu", "moe_every": 1, "shared_gate": False, "tie_embeddings": False}
    want.update({"router_score": "sigmoid", "expert_bias": True} if v3 else
                {"router_score": "softmax", "norm_topk": False, "expert_groups": 1})  # fmt: skip
    for field, value in want.items():
        if getattr(m, field) != value:
            raise ConfigError(f"export-hf: model.{field}={getattr(m, field)!r}: the deepseek_v{3 if v3 else 2} "
                              f"family needs {value!r}")  # fmt: skip
    if m.shared_hidden % m.expert_hidden:
        raise ConfigError(f"export-hf: model.shared_hidden={m.shared_hidden}: DeepSeek's shared experts are "
                          f"n x moe_intermediate_size={m.expert_hidden}")  # fmt: skip


def _hf_deepseek_v2(m: ModelConfig) -> dict[str, Any]:
    _check_deepseek_model(m, False)
    return _hf_deepseek(m, False)


def _hf_deepseek_v3(m: ModelConfig) -> dict[str, Any]:
    _check_deepseek_model(m, True)
    return _hf_deepseek(m, True)


DEEPSEEK_LAYER = {**LATENT_ATTENTION, **experts("mlp", "gate_proj", "up_proj", "down_proj"), **DEEPSEEK_SHARED,
                  **DENSE_FFN}  # fmt: skip

FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        "mixtral", "MixtralForCausalLM", {**ATTENTION, **experts("block_sparse_moe", "w1", "w3", "w2")},
        _mixtral, _hf_mixtral,
    ),
    "qwen3_moe": Family(
        "qwen3_moe", "Qwen3MoeForCausalLM",
        {**ATTENTION, **QK_NORM_PER_HEAD, **experts("mlp", "gate_proj", "up_proj", "down_proj"), **DENSE_FFN},
        _qwen3_moe, _hf_qwen3_moe,
    ),
    "olmoe": Family(
        "olmoe", "OlmoeForCausalLM",
        {**ATTENTION, **QK_NORM_OVER_PROJECTION, **experts("mlp", "gate_proj", "up_proj", "down_proj")},
        _olmoe, _hf_olmoe,
    ),
    "qwen2_moe": Family(
        "qwen2_moe", "Qwen2MoeForCausalLM",
        {**ATTENTION, **QKV_BIAS, **experts("mlp", "gate_proj", "up_proj", "down_proj"), **SHARED_EXPERT,
         **DENSE_FFN},
        _qwen2_moe, _hf_qwen2_moe,
    ),
    "deepseek_v2": Family(
        "deepseek_v2", "DeepseekV2ForCausalLM", DEEPSEEK_LAYER,
        lambda hf, where: _deepseek(hf, where, False), _hf_deepseek_v2, extra_layers_ok=True,
    ),
    "deepseek_v3": Family(
        "deepseek_v3", "DeepseekV3ForCausalLM", DEEPSEEK_LAYER,
        lambda hf, where: _deepseek(hf, where, True), _hf_deepseek_v3, rest=DEEPSEEK_BIAS, extra_layers_ok=True,
    ),
}  # fmt: skip


def family_of(hf: dict[str, Any], where: str) -> Family:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"{where}: model_type={model_type!r}: not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def model_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """config.json -> the ModelConfig fields it fixes (the others keep their defaults)."""
    try:
        return family_of(hf, where).model_fields(hf, where)
    except ConfigError:
        raise
    except (TypeError, ValueError, AttributeError) as e:  # a value of the wrong type the checks above did not name
        raise ConfigError(f"{where}: a value of the wrong type ({e})") from None


# Where a config.json spells a model field (the checks of config.py name the model's field; the user wrote these).
HF_KEYS = {
    "vocab": "vocab_size", "d_model": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "top_k": "num_experts_per_tok",
    "experts": "num_local_experts|num_experts|n_routed_experts", "max_seq_len": "max_position_embeddings",
    "expert_hidden": "moe_intermediate_size|intermediate_size", "dense_layers": "first_k_dense_replace",
    "expert_groups": "n_group", "group_top_k": "topk_group", "kv_lora_rank": "kv_lora_rank",
    "q_lora_rank": "q_lora_rank", "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
}  # fmt: skip


def hf_key(hf: dict[str, Any], field: str) -> str | None:
    """The config.json key that set ModelConfig `field`, where the file has it."""
    return next((k for k in HF_KEYS.get(field, "").split("|") if k and k in hf), None)


def supported_by(m: ModelConfig, family: Family) -> str | None:
    """Why `m` lacks tensors `family` has (a Mixtral model written as OLMoE would lack its q/k norms), or None. The
    other direction (tensors the family has no row for) is refused while writing."""
    needs = {
        "olmoe": (("qk_norm", "projection", "q/k norms over the projection"),),
        "qwen3_moe": (("qk_norm", "head", "per-head q/k norms"),),
        "qwen2_moe": (("qkv_bias", True, "q/k/v biases"),),
        "deepseek_v2": (("attention", "mla", "multi-head latent attention"),),
        "deepseek_v3": (("attention", "mla", "multi-head latent attention"), ("router_score", "sigmoid",
                                                                             "sigmoid routing with its bias")),
    }  # fmt: skip
    for field, value, what in needs.get(family.model_type, ()):
        if getattr(m, field) != value:
            return (f"{family.model_type} models have {what} (model.{field}={value!r}), this one has "
                    f"model.{field}={getattr(m, field)!r}")  # fmt: skip
    if family.model_type == "qwen2_moe" and not m.shared_hidden:
        return "qwen2_moe models have a shared expert, this one has none (model.shared_hidden=0)"
    return None


def family_for_model(m: ModelConfig) -> Family:
    """The family whose architecture this ModelConfig is (for exporting a model that was not imported)."""
    if m.attention == "mla":
        return FAMILIES["deepseek_v3" if m.router_score == "sigmoid" else "deepseek_v2"]
    if m.ffn != "swiglu" or m.router_score != "softmax" or m.expert_groups > 1 or m.routed_scale != 1.0:
        raise ConfigError(
            "export-hf: this model has no Hugging Face family here (families need SwiGLU experts and plain softmax "
            f"routing; model.ffn={m.ffn!r}, model.router_score={m.router_score!r})"
        )
    if m.qkv_bias or m.shared_hidden:
        return FAMILIES["qwen2_moe"]
    if m.qk_norm == "projection":
        return FAMILIES["olmoe"]
    if m.qk_norm == "head" or not m.norm_topk or m.dense_layers or m.moe_every > 1:
        return FAMILIES["qwen3_moe"]
    return FAMILIES["mixtral"]


def hf_config(m: ModelConfig, family: Family, dtype: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json for `m` as `family`: the fields of `base` (the imported config.json, keeping its token ids and
    anything else moe_jax does not model) overwritten by the model's."""
    out = {k: v for k, v in (base or {}).items() if k not in ("rope_parameters", "rope_scaling", "torch_dtype")}
    out.update(family.hf_fields(m))
    out.update(model_type=family.model_type, architectures=[family.architecture], dtype=dtype)
    return out
