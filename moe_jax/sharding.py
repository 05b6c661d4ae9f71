"""The one table of logical axis names -> mesh axes, the specs built from it, and the collectives the model names.

Layer code speaks logical names only (`'heads'`, `'experts'`, `'seq'`); this module alone turns them into mesh axes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

MESH_AXES = ("pp", "dp", "ep", "tp")

# Every logical name the model uses, replicated ones included: an unmapped name would fail deep inside JAX.
RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "layers": "pp",  # the stacked layer axis: contiguous stages (circular repeats reorder the stack, see pipeline)
    "experts": "ep",  # expert ids: E / ep contiguous experts per ep rank
    "heads": "tp",  # attention heads: H / tp per tp rank
    "mlp": "tp",  # the expert hidden dimension: first matrix column-split, second row-split
    "embed": None,
    "vocab": None,
    "head_dim": None,
    "router_experts": None,  # the router's output (all E scores): replicated
    # activations
    "batch": ("dp", "ep"),  # everything that is not an expert splits the batch over (dp, ep)
    "seq": "tp",  # sequence parallelism between blocks
    "act_embed": None,
    "microbatch": None,
}

# The axes a token can be split over; router statistics and the loss are summed over all of them.
TOKEN_AXES: tuple[str, ...] = ("dp", "ep", "tp")


def logical_to_mesh(names: Sequence[str | None]) -> P:
    """('layers', 'experts', 'embed', 'mlp') -> P('pp', 'ep', None, 'tp')."""
    out = []
    for name in names:
        if name is None:
            out.append(None)
        elif name in RULES:
            out.append(RULES[name])
        else:
            raise KeyError(f"logical axis {name!r} has no rule in moe_jax.sharding.RULES; known: {', '.join(RULES)}")
    return P(*out)


def state_specs(state):
    """An nnx.State of Variables carrying `out_sharding` logical names -> the same tree of mesh PartitionSpecs."""
    from flax import nnx

    def spec(v):
        names = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
        return logical_to_mesh(names) if names is not None else P()

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_names(state):
    """An nnx.State -> the same tree of logical name tuples (for reports and the assignment check)."""
    from flax import nnx

    return jax.tree.map(
        lambda v: tuple(v.get_metadata().get("out_sharding") or ()),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


@dataclasses.dataclass(frozen=True)
class Axes:
    """The mesh axes the model's collectives run over, taken from RULES. `Axes()` (all None) is one device: every
    collective is then the identity, so the same module code runs unsharded and inside shard_map."""

    tp: str | None = None
    ep: str | None = None
    tokens: tuple[str, ...] = ()

    @classmethod
    def sharded(cls) -> Axes:
        return cls(tp=RULES["seq"], ep=RULES["experts"], tokens=TOKEN_AXES)

    # Sequence parallelism over tp: gather the sequence before a tp-split matmul, reduce-scatter the partial sums after.
    def gather_seq(self, x, axis: int):
        return x if self.tp is None else lax.all_gather(x, self.tp, axis=axis, tiled=True)

    def scatter_seq(self, x, axis: int):
        return x if self.tp is None else lax.psum_scatter(x, self.tp, scatter_dimension=axis, tiled=True)

    # Expert parallelism: [E, C, D] per source shard <-> [E / ep, ep * C, D] per expert shard.
    def to_experts(self, x_ECD):
        return x_ECD if self.ep is None else lax.all_to_all(x_ECD, self.ep, split_axis=0, concat_axis=1, tiled=True)

    def from_experts(self, x_ECD):
        return x_ECD if self.ep is None else lax.all_to_all(x_ECD, self.ep, split_axis=1, concat_axis=0, tiled=True)

    def sum_tokens(self, x):
        """Sums a per-shard statistic over every axis the tokens are split over: the whole-batch value."""
        return x if not self.tokens else lax.psum(x, self.tokens)
