"""The parameters: their analytic count (total, per kind, active per token; tests check it against the initialised
tree) and their shards on a layout, from the abstract model and the one rules table."""

from __future__ import annotations

import functools
import math
from typing import Any

from moe_jax.config import Config, ModelConfig, storage_model
from moe_jax.model.transformer import param_table
from moe_jax.sharding import MESH_AXES, logical_to_mesh, rules_of, zero_spec

SEED_CLAIMED_PARAMS = 30_000_000_000  # the seed's "30B parameters"


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Per kind, summed over layers. With the seed's sizes: 4,428,694,528.

    attention: q, k, v (d x H K, d x G K twice; G the K/V heads), o (H K x d), biases and QK-norm weights; norms: two
    per layer and the final one; router, experts, shared: per MoE layer; dense: the dense layers' FFNs."""
    d, l, e, f = cfg.d_model, cfg.layers, cfg.experts, cfg.expert_hidden
    hk, gk = cfg.heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    mats = cfg.ffn_matrices
    moe, dense = cfg.moe_layers, cfg.layers - cfg.moe_layers
    qk_norm = {"none": 0, "head": 2 * cfg.head_dim, "projection": hk + gk}[cfg.qk_norm]
    attention = 2 * d * hk + 2 * d * gk + (hk + 2 * gk if cfg.qkv_bias else 0) + qk_norm
    if cfg.attention == "mla":
        attention = mla_attention_params(cfg)
    return {
        "embedding": cfg.vocab * d,
        "attention": l * attention,
        "norms": l * 2 * d + d,
        "router": moe * d * e,
        "experts": moe * e * mats * d * f,
        "shared": moe * (mats * d * cfg.shared_hidden + (d if cfg.shared_gate else 0)),
        "dense": dense * mats * d * cfg.dense_hidden,
        "head": 0 if cfg.tie_embeddings else d * cfg.vocab,
    }


def mla_attention_params(cfg: ModelConfig) -> int:
    """One layer's latent attention: queries (d x H (N + P), or d x r_q, its norm and r_q x H (N + P)), the latent
    and RoPE key (d x (R + P)), the latent's norm (R), its expansion (R x H (N + V)) and the output (H V x d)."""
    d, h, r_q, r = cfg.d_model, cfg.heads, cfg.q_lora_rank, cfg.kv_lora_rank
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q = d * r_q + r_q + r_q * h * qk if r_q else d * h * qk
    return (
        q
        + d * (r + cfg.qk_rope_head_dim)
        + r
        + r * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        + h * cfg.v_head_dim * d
    )


@functools.lru_cache(maxsize=4096)
def param_kind(path: str) -> str:
    """A parameter's kind (the keys of `param_counts`) from its path in the model tree."""
    parts = path.split("/")
    if parts[0] in ("embed", "head"):
        return "embedding" if parts[0] == "embed" else "head"
    for key, kind in (("attn", "attention"), ("router", "router"), ("shared", "shared"), ("mlp", "dense"),
                      ("moe", "experts")):  # fmt: skip
        if key in parts:
            return kind
    return "norms"  # attn_norm, ffn_norm, final_norm


def total_params(cfg: ModelConfig) -> int:
    return sum(param_counts(cfg).values())


def active_params_per_token(cfg: ModelConfig) -> int:
    """Parameters a token touches: everything but the routed experts it was not sent to (k of E per MoE layer).
    Embedding and head are counted (the convention of the published active counts: Mixtral's 12.9B, Qwen3's 3.3B)."""
    c = param_counts(cfg)
    return total_params(cfg) - c["experts"] + c["experts"] * cfg.top_k // cfg.experts


def param_formula(cfg: ModelConfig) -> str:
    """The count as a formula with the config's numbers in it, for the CLI and the seed audit (the seed's plain
    structure; other models get the sum by kind)."""
    plain = (
        cfg.n_kv_heads == cfg.heads
        and cfg.qk_norm == "none"
        and not cfg.qkv_bias
        and not cfg.shared_hidden
        and cfg.moe_layers == cfg.layers
        and not cfg.tie_embeddings
        and cfg.attention == "mha"
    )
    if not plain:
        c = param_counts(cfg)
        return " + ".join(f"{k} {v:,}" for k, v in c.items() if v) + f" = {total_params(cfg):,}"
    mats = cfg.ffn_matrices
    d, l, e, f, v = cfg.d_model, cfg.layers, cfg.experts, cfg.expert_hidden, cfg.vocab
    hk = cfg.heads * cfg.head_dim
    return (
        f"L x (E x {mats} x d x F + 4 x d x H*K + d x E + 2d) + 2 x V x d + d = "
        f"{l} x ({e} x {mats} x {d} x {f} + 4 x {d} x {hk} + {d} x {e} + {2 * d}) + 2 x {v} x {d} + {d} "
        f"= {total_params(cfg):,}"
    )


@functools.lru_cache(maxsize=64)
def _param_table(model_cfg) -> tuple[tuple[str, tuple[str, ...], tuple[int, ...]], ...]:
    names, shapes = param_table(model_cfg)
    return tuple((path, names[path], shapes[path]) for path in sorted(names))


def param_shards(cfg: Config) -> list[dict[str, Any]]:
    """Every parameter with the mesh axes it is split over (mesh order, size-1 axes left out), its local shape and
    its local element count, from the abstract model and the one rules table (nothing allocated); `zero`: the batch
    axes ZeRO-1 splits its optimizer state over, `zero_split` and `zero_local` its split and count then."""
    lay = cfg.layout
    return param_shards_for(storage_model(cfg), lay.shape, lay.zero, lay.folded, lay.vocab_split)


@functools.lru_cache(maxsize=4096)
def param_shards_for(
    model_cfg, shape_pdet: tuple[int, ...], zero: int, folded: bool, vocab: str
) -> list[dict[str, Any]]:
    sizes = dict(zip(MESH_AXES, shape_pdet, strict=True))
    rules = rules_of(folded, vocab)
    out = []
    for path, names, shape in _param_table(model_cfg):
        spec = logical_to_mesh(names, sizes, shape, rules)
        z = zero_spec(spec, names, shape, sizes, path)[1] if zero else ()
        used: list[str] = []
        local = []
        for dim, part in zip(shape, spec, strict=True):
            axes = () if part is None else (part,) if isinstance(part, str) else tuple(part)
            used += axes
            local.append(dim // math.prod(sizes[a] for a in axes))
        split = tuple(a for a in MESH_AXES if a in used)
        n = math.prod(local)
        out.append({"path": path, "split": split, "local_shape": tuple(local), "local": n,
                    "zero": z, "zero_split": tuple(a for a in MESH_AXES if a in used or a in z),
                    "zero_local": n // math.prod(sizes[a] for a in z)})  # fmt: skip
    return out
