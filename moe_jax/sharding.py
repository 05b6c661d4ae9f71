"""The one table of logical axis names -> mesh axes, the specs built from it, and the collectives the model names.

Layer code speaks logical names only (`'heads'`, `'experts'`, `'seq'`); this module alone turns them into mesh axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from moe_jax.config import ConfigError

MESH_AXES = ("pp", "dp", "ep", "tp")

# Every logical name the model uses, replicated ones included: an unmapped name would fail deep inside JAX.
RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "layers": "pp",  # the stacked layer axis: contiguous stages (circular repeats reorder the stack, see pipeline)
    "experts": "ep",  # expert ids: E / ep contiguous experts per ep rank
    "heads": "tp",  # attention heads: H / tp per tp rank
    "kv_heads": "tp",  # K/V heads: split when tp divides them, else whole on every tp rank (see SPLIT_IF_DIVISIBLE)
    "expert_mlp": "tp",  # an expert's hidden dimension: first matrix column-split, second row-split
    "mlp": "tp",  # a dense FFN's or the shared expert's hidden dimension, split the same way
    "embed": None,
    "vocab": None,
    "head_dim": None,
    "q_lora": None,  # latent attention's query rank (its projection and norm whole on every device)
    "kv_lora": None,  # latent attention's shared K/V latent (+ the RoPE key): whole on every device
    "sublayers": None,  # the dense layers inside one stacked unit (model.moe_every > 1)
    "prologue": None,  # the first model.dense_layers layers: before the pipeline, on every stage (design-notes)
    "router_experts": None,  # the router's output (all E scores): replicated
    # activations
    "batch": ("dp", "ep"),  # everything that is not an expert splits the batch over (dp, ep)
    "seq": "tp",  # sequence parallelism between blocks
    "act_embed": None,
    "microbatch": None,
}

# layout.expert_tp=1 (expert folding): the experts split over (ep, tp) jointly, each whole on its device. Attention,
# the shared expert and dense layers keep tp.
FOLDED_RULES: dict[str, str | tuple[str, ...] | None] = {**RULES, "experts": ("ep", "tp"), "expert_mlp": None}
# layout.vocab_split: the embedding's rows and the head's columns split over tp, or over tp and pp (tp-major: rank
# (t, p) holds block t pp + p), or whole (vocabulary-parallel, the default 'tp').
VOCAB_RULES: dict[str, dict[str, str | tuple[str, ...] | None]] = {
    "tp": {"vocab": "tp"},
    "tp_pp": {"vocab": ("tp", "pp")},
    "none": {},
}


def rules_for(layout) -> Mapping[str, str | tuple[str, ...] | None]:
    """The rules table a layout places its parameters by: RULES, or FOLDED_RULES with layout.expert_tp=1, with the
    vocabulary over layout.vocab_split's axes."""
    return rules_of(layout.folded, layout.vocab_split)


@functools.cache
def rules_of(folded: bool, vocab: str = "none") -> Mapping[str, str | tuple[str, ...] | None]:
    base = FOLDED_RULES if folded else RULES
    return {**base, **VOCAB_RULES[vocab]}


def expert_axes(layout) -> tuple[str, ...]:
    """The mesh axes a layout splits the experts over, which the dispatch all-to-all spans: (ep,) or (ep, tp)."""
    axes = rules_for(layout)["experts"]
    return (axes,) if isinstance(axes, str) else tuple(axes)


def resolve_exchange(exchange: str, platform: str | None = None) -> str:
    """layout.ragged_exchange resolved: 'auto' is the ragged all-to-all where the platform compiles it (not XLA:CPU),
    else 'padded'. `platform`: the mesh's devices' (a TPU target's are 'tpu'); default, JAX's default backend."""
    if exchange != "auto":
        return exchange
    return "padded" if (platform or jax.default_backend()) == "cpu" else "ragged"


# Names whose dimension is split only where the mesh axis divides it, and otherwise kept whole (replicated): K/V
# heads when tp > kv_heads. Megatron-Core and MaxText replicate them the same way; each tp rank then computes only the
# K/V head its query heads read (`Attention.kv_weights`).
SPLIT_IF_DIVISIBLE = frozenset({"kv_heads"})

# The axes a token can be split over; router statistics and the loss are summed over all of them.
TOKEN_AXES: tuple[str, ...] = ("dp", "ep", "tp")


def logical_to_mesh(
    names: Sequence[str | None],
    sizes: Mapping[str, int] | None = None,
    shape: Sequence[int] | None = None,
    rules: Mapping[str, str | tuple[str, ...] | None] = RULES,
) -> P:
    """('layers', 'experts', 'embed', 'mlp') -> P('pp', 'ep', None, 'tp').

    With the mesh's axis sizes, axes of size 1 are left out (P('pp', 'ep', ...) on a pp=1 mesh is P(None, 'ep', ...)):
    the same placement, but no value is then 'varying' over a one-device axis, so no collective over a single device
    can arise (XLA:CPU keeps such all-reduces in the compiled program)."""
    out = []
    for i, name in enumerate(names):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in moe_jax.sharding.RULES; known: {', '.join(rules)}")
        axis = _active(rules[name], sizes) if name is not None else None
        if name in SPLIT_IF_DIVISIBLE and axis is not None and sizes is not None and shape is not None:
            if shape[i] % math.prod(sizes[a] for a in ((axis,) if isinstance(axis, str) else axis)):
                axis = None
        out.append(axis)
    return P(*out)


def _active(axis: str | tuple[str, ...] | None, sizes: Mapping[str, int] | None):
    if axis is None or sizes is None:
        return axis
    if isinstance(axis, str):
        return axis if sizes[axis] > 1 else None
    kept = tuple(a for a in axis if sizes[a] > 1)
    return None if not kept else kept[0] if len(kept) == 1 else kept


def active_axes(axes: Sequence[str], sizes: Mapping[str, int]) -> tuple[str, ...]:
    """The axes of a collective that span more than one device."""
    return tuple(a for a in axes if sizes[a] > 1)


def state_specs(state, sizes: Mapping[str, int] | None = None, rules=RULES):
    """An nnx.State of Variables carrying `out_sharding` logical names -> the same tree, each Variable now holding
    its mesh PartitionSpec (the structure matches the state's, so the two map together leaf by leaf)."""

    def spec(v):
        names = v.get_metadata().get("out_sharding")
        return v.replace(logical_to_mesh(names, sizes, v.shape, rules) if names is not None else P())

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ZeRO-1 (layout.zero=1): the axes a weight's optimizer state is split over where the weight is replicated on them.
BATCH_AXES: tuple[str, ...] = ("dp", "ep")
# Stacked-layer dimensions (a layer index, not a weight dimension) are never the ZeRO split.
STACK_NAMES = frozenset({"layers", "sublayers", "prologue"})


def spec_axes(part) -> tuple[str, ...]:
    """One PartitionSpec entry -> its mesh axes."""
    return () if part is None else (part,) if isinstance(part, str) else tuple(part)


def zero_spec(spec: P, names: Sequence[str | None], shape: Sequence[int], sizes: Mapping[str, int], path: str = ""):
    """ZeRO-1: a weight's spec -> (the spec of its optimizer state and reduce-scattered gradient, the batch axes added,
    the dimension they split, or None where the weight is split over every batch axis already). The batch axes (dp,
    ep) the weight is replicated over are added to the first weight dimension (not a stacked-layer one) whose local
    size they divide, after the axes already there. A weight with no such dimension is refused in one line: padding it
    would change the stored shape, and checkpoints are layout-free."""
    used = {a for part in spec for a in spec_axes(part)}
    z = tuple(a for a in BATCH_AXES if a not in used and sizes[a] > 1)
    if not z:
        return spec, (), None
    n = math.prod(sizes[a] for a in z)
    parts = [*spec, *([None] * (len(shape) - len(spec)))]
    for i, (dim, part, name) in enumerate(zip(shape, parts, names, strict=True)):
        have = spec_axes(part)
        if name in STACK_NAMES or (dim // math.prod(sizes[a] for a in have)) % n:
            continue
        axes = (*have, *z)
        parts[i] = axes[0] if len(axes) == 1 else axes
        return P(*parts), z, i

    local = tuple(d // math.prod(sizes[a] for a in spec_axes(p)) for d, p in zip(shape, parts, strict=True))
    dims = tuple(d for d, name in zip(local, names, strict=True) if name not in STACK_NAMES)
    raise ConfigError(
        f"layout.zero=1: weight {path} (local shape {local}) has no weight dimension that {' x '.join(z)} = {n} "
        f"divides, so its optimizer state cannot be split over the batch axes (padding would change its stored "
        f"shape); valid: layout.zero=0, or {' x '.join(f'layout.{a}' for a in z)} dividing one of {dims}"
    )


def zero_specs(state, sizes: Mapping[str, int], rules=RULES):
    """An nnx.State of Variables carrying logical names -> the same tree of (ZeRO-1 spec, batch axes, dimension)
    triples (`zero_spec`), as Variables."""

    def one(path, v):
        names = v.get_metadata().get("out_sharding")
        spec = logical_to_mesh(names, sizes, v.shape, rules)
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        return v.replace(zero_spec(spec, names, v.shape, sizes, key))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_names(state):
    """An nnx.State -> the same tree of logical name tuples (for reports and the assignment check)."""
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
    tokens: tuple[str, ...] = ()
    token_shards: int = 1  # how many shards the tokens are split into (the product of the `tokens` axes' sizes)
    seq_parallel: bool = True  # training: tokens split over tp between blocks; serving: replicated over tp
    # The axes the experts are split over, which the dispatch all-to-all spans: ep, or (ep, tp) folded. Folded, each
    # expert is whole on its device: no tp gather before the experts and no tp sum after them.
    experts: str | tuple[str, ...] | None = None
    folded: bool = False
    # How ragged dispatch moves rows between expert shards: 'ragged' (jax.lax.ragged_all_to_all), 'padded' (every
    # expert's worst case) or 'emulated' (ragged_all_to_all's semantics from padded collectives).
    exchange: str = "padded"
    # The axes the vocabulary (embedding rows, head columns) is split over (layout.vocab_split), and the real
    # vocabulary size: the stored one is padded to a multiple of the split, the padding columns masked out.
    vocab: str | tuple[str, ...] | None = None
    vocab_size: int = 0

    @classmethod
    def sharded(cls, sizes: Mapping[str, int], rules=RULES, exchange: str = "auto", vocab_size: int = 0,
                platform: str | None = None) -> Axes:  # fmt: skip
        """Inside shard_map over a mesh with these axis sizes; one-device axes get no collective. `exchange`:
        layout.ragged_exchange, 'auto' resolved by the mesh's `platform` (XLA:CPU cannot compile ragged_all_to_all).
        `vocab_size`: model.vocab (the stored vocabulary may be padded)."""
        tokens = active_axes(TOKEN_AXES, sizes)
        return cls(
            tp=_active(rules["seq"], sizes),
            tokens=tokens,
            token_shards=math.prod(sizes[a] for a in tokens),
            experts=_active(rules["experts"], sizes),
            folded=rules["expert_mlp"] is None,
            exchange=resolve_exchange(exchange, platform),
            vocab=_active(rules["vocab"], sizes),
            vocab_size=vocab_size,
        )

    @classmethod
    def serving(cls, sizes: Mapping[str, int], rules=RULES, vocab_size: int = 0) -> Axes:
        """Prefill and decode: every tp rank holds the same tokens (one decode token cannot be split), so tp partial
        sums are all-reduced instead of reduce-scattered, and nothing is gathered. Folded experts then receive each
        token from every tp rank and compute it tp times over (each rank takes back its own copy's result)."""
        tokens = active_axes(("dp", "ep"), sizes)
        return cls(
            tp=_active(rules["seq"], sizes),
            tokens=tokens,
            token_shards=math.prod(sizes[a] for a in tokens),
            seq_parallel=False,
            experts=_active(rules["experts"], sizes),
            folded=rules["expert_mlp"] is None,
            vocab=_active(rules["vocab"], sizes),
            vocab_size=vocab_size,
        )

    # Sequence parallelism over tp: gather the sequence before a tp-split matmul, reduce-scatter the partial sums after.
    def gather_seq(self, x, axis: int):
        if self.tp is None or not self.seq_parallel:
            return x
        return lax.all_gather(x, self.tp, axis=axis, tiled=True)

    def scatter_seq(self, x, axis: int):
        if self.tp is None:
            return x
        if not self.seq_parallel:
            return lax.psum(x, self.tp)
        return lax.psum_scatter(x, self.tp, scatter_dimension=axis, tiled=True)

    # Expert parallelism: [E, C, D] per source shard <-> [E / n, n * C, D] per expert shard, n = ep (or ep x tp
    # folded).
    def to_experts(self, x_ECD):
        if self.experts is None:
            return x_ECD
        return lax.all_to_all(x_ECD, self.experts, split_axis=0, concat_axis=1, tiled=True)

    def from_experts(self, x_ECD):
        if self.experts is None:
            return x_ECD
        return lax.all_to_all(x_ECD, self.experts, split_axis=1, concat_axis=0, tiled=True)

    # The tp gather and sum around an expert split over tp (its hidden dimension); none when the experts are folded.
    def gather_for_experts(self, x, axis: int):
        return x if self.folded else self.gather_seq(x, axis)

    def scatter_from_experts(self, x, axis: int):
        return x if self.folded else self.scatter_seq(x, axis)

    def settle_folded(self, y):
        """Serving with folded experts: every tp rank sent its copy of each token to the same whole expert and took
        its own result back, equal on every rank but typed varying over tp; one max over tp (of equal values: exact)
        makes it the tp-invariant value the rest of serving carries."""
        if not self.folded or self.seq_parallel or self.tp is None:
            return y
        return lax.pmax(y, self.tp)

    def sum_heads(self, x):
        """Sums a statistic over the heads every tp rank holds a share of (QK-norm over the whole projection)."""
        return x if self.tp is None else lax.psum(x, self.tp)

    def tp_index(self):
        return 0 if self.tp is None else lax.axis_index(self.tp)

    # The vocabulary split (layout.vocab_split): each rank holds V / (tp [pp]) embedding rows and head columns.
    def vocab_start(self, n_local: int):
        """The first vocabulary id of this rank's rows (0 unsplit)."""
        return 0 if self.vocab is None else lax.axis_index(self.vocab) * n_local

    @property
    def vocab_pp(self) -> bool:
        """The vocabulary is split over pp too: every stage holds a share of the embedding and the head."""
        return self.vocab is not None and "pp" in spec_axes(self.vocab)

    def sum_vocab_stages(self, x):
        """The embedding split over pp as well: each stage's rows summed over the stages (after the tp sum)."""
        return lax.psum(x, "pp") if self.vocab_pp else x

    def vocab_max(self, x):
        return x if self.vocab is None else lax.pmax(x, self.vocab)

    def vocab_sum(self, x):
        return x if self.vocab is None else lax.psum(x, self.vocab)

    def loss_targets(self, targets):
        """Target ids [..., S / tp] as the loss reads them: with the vocabulary split, every rank scores every token of
        the sequence (one all-gather of int32 ids over tp, once per step, outside every loop and checkpoint)."""
        return targets if self.vocab is None else self.gather_seq(targets, targets.ndim - 1)

    def gather_vocab(self, x):
        """Serving's logits: each rank's vocabulary columns gathered whole (tp-invariant), the padding cut."""
        if self.vocab is None:
            return x
        x = lax.all_gather(x, self.vocab, axis=x.ndim - 1, tiled=True, to="invarying")
        return x[..., : self.vocab_size] if self.vocab_size else x

    def sum_tokens(self, x):
        """Sums a per-shard statistic over every axis the tokens are split over: the whole-batch value."""
        return x if not self.tokens else lax.psum(x, self.tokens)
