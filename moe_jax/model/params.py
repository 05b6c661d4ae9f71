"""The analytic parameter count: total, per kind, and active per token. Tests check it against the initialised tree."""

from __future__ import annotations

from moe_jax.config import ModelConfig

SEED_CLAIMED_PARAMS = 30_000_000_000  # the seed's "30B parameters"


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Per kind, summed over layers. With the seed's sizes: 4,428,694,528."""
    d, l, e, f = cfg.d_model, cfg.layers, cfg.experts, cfg.expert_hidden
    hk = cfg.heads * cfg.head_dim
    mats = 3 if cfg.ffn == "swiglu" else 2
    return {
        "embedding": cfg.vocab * d,
        "attention": l * 4 * d * hk,  # q, k, v: d x H K each; o: H K x d
        "norms": l * 2 * d + d,  # two per block, one final
        "router": l * d * e,
        "experts": l * e * mats * d * f,
        "head": d * cfg.vocab,
    }


def total_params(cfg: ModelConfig) -> int:
    return sum(param_counts(cfg).values())


def active_params_per_token(cfg: ModelConfig) -> int:
    """Parameters a token touches: everything but the experts it was not routed to (k of E experts per layer)."""
    c = param_counts(cfg)
    return total_params(cfg) - c["experts"] + c["experts"] * cfg.top_k // cfg.experts


def param_formula(cfg: ModelConfig) -> str:
    """The count as a formula with the config's numbers in it, for the CLI and the seed audit."""
    mats = 3 if cfg.ffn == "swiglu" else 2
    d, l, e, f, v = cfg.d_model, cfg.layers, cfg.experts, cfg.expert_hidden, cfg.vocab
    hk = cfg.heads * cfg.head_dim
    return (
        f"L x (E x {mats} x d x F + 4 x d x H*K + d x E + 2d) + 2 x V x d + d = "
        f"{l} x ({e} x {mats} x {d} x {f} + 4 x {d} x {hk} + {d} x {e} + {2 * d}) + 2 x {v} x {d} + {d} "
        f"= {total_params(cfg):,}"
    )
