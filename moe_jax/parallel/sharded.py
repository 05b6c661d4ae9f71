"""The model on a mesh: `ShardedModel` splits it into graph, parameters and other state with the mesh specs of each,
initialises it into its shards, moves trees between global layer order and this layout's storage order, and lays
out batches. The steps (parallel/step.py, parallel/one_f_one_b.py, serve/step.py) run on it."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax.config import Config, masked_vocab, padded_vocab, storage_model, uneven_units
from moe_jax.mesh import layer_storage_order
from moe_jax.model.transformer import Transformer, abstract_model, check_tokens
from moe_jax.sharding import Axes, logical_to_mesh, rules_for, state_specs, zero_specs


def batch_spec(sizes) -> P:
    """Tokens and targets [M, B / M, S]: microbatches whole on every device, rows over (dp, ep), sequence over tp."""
    return logical_to_mesh(("microbatch", "batch", "seq"), sizes)


@dataclasses.dataclass(frozen=True, eq=False)
class ShardedModel:
    """The model split into graph, parameters and other state, with the mesh specs of each.

    One instance per (config, mesh) in a process (`build` is cached), compared by identity: it keys the caches of the
    jitted steps built from it, so a second run of the same layout reuses the compiled programs."""

    cfg: Config
    mesh: Any
    graphdef: Any
    param_specs: Any
    rest_specs: Any
    abstract_params: Any
    abstract_rest: Any

    @classmethod
    def build(cls, cfg: Config, mesh) -> ShardedModel:
        return _build_sharded_model(cls, cfg, mesh)

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    @property
    def rules(self):
        """The logical -> mesh rules its parameters are placed by (folded experts or not)."""
        return rules_for(self.cfg.layout)

    @functools.cached_property
    def global_graphdef(self):
        """The graph of the model in global layer order, for trees from `to_global` (the stored graph counts the
        padding units of uneven stages; otherwise they are the same)."""
        if not self.cfg.layout.stage_layers and not masked_vocab(self.cfg):
            return self.graphdef
        return nnx.split(abstract_model(self.cfg), nnx.Param, ...)[0]

    @functools.cached_property
    def zero(self) -> tuple[tuple[P, tuple[str, ...], int | None], ...]:
        """Per parameter leaf (tree order): (its spec, the batch axes ZeRO-1 splits its optimizer state and gradient
        over, the dimension they split); with layout.zero=0, (spec, (), None) for every leaf."""
        specs = jax.tree.leaves(self.param_specs, is_leaf=lambda x: isinstance(x, P))
        if not self.cfg.layout.zero:
            return tuple((s, (), None) for s in specs)
        infos = jax.tree.leaves(
            zero_specs(self.abstract_params, self.sizes, self.rules), is_leaf=lambda x: isinstance(x, nnx.Variable)
        )
        return tuple((spec, info.get_value()[1], info.get_value()[2]) for spec, info in zip(specs, infos, strict=True))

    @functools.cached_property
    def grad_specs(self):
        """The gradients' specs as the step returns them (and AdamW's moments'): the parameters' own, or with
        layout.zero=1 each split over the batch axes its weight is replicated on."""
        if not self.cfg.layout.zero:
            return self.param_specs
        specs = jax.tree.leaves(
            zero_specs(self.abstract_params, self.sizes, self.rules), is_leaf=lambda x: isinstance(x, nnx.Variable)
        )
        tree = jax.tree.structure(self.param_specs, is_leaf=lambda x: isinstance(x, P))
        return jax.tree.unflatten(tree, [v.get_value()[0] for v in specs])

    def shardings(self, specs):
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs)

    def init(self, seed: int = 0):
        """Initialises parameters directly into their shards (each device computes only its own slices)."""
        return self._init_fn(jnp.uint32(seed))

    def init_rest(self, seed: int = 0):
        """The state that is not a parameter (the experts' routing bias) alone, for imported parameters: the
        parameters' initialisation is traced but unused, so XLA drops it and nothing of their size is made."""
        cfg = self.cfg

        def rest_fn(seed):
            return self.to_storage(init_state(cfg.model, seed)[1])

        return jax.jit(rest_fn, out_shardings=self.shardings(self.rest_specs))(jnp.uint32(seed))

    @functools.cached_property
    def _init_fn(self):
        """The jitted initialiser, compiled once per layout (the seed is an argument)."""
        cfg = self.cfg

        def init_fn(seed):
            params, rest = init_state(cfg.model, seed)
            return self.to_storage(params), self.to_storage(rest)

        out = (self.shardings(self.param_specs), self.shardings(self.rest_specs))
        return jax.jit(init_fn, out_shardings=out)

    def put(self, params, rest):
        """Host (params, rest) in global layer order -> sharded arrays in this layout's storage order."""
        return (
            jax.device_put(self.to_storage(params), self.shardings(self.param_specs)),
            jax.device_put(self.to_storage(rest), self.shardings(self.rest_specs)),
        )

    def layer_order(self, inverse: bool = False) -> np.ndarray:
        """Position in the stacked storage -> global layer id; inverse: global layer id -> storage position. With
        uneven stages a padding position takes a copy of its stage's last unit (never applied: its output is its
        input, so its gradient is zero), and the inverse reads the real positions only."""
        cfg = self.cfg
        order = np.array(layer_storage_order(cfg.model.units, cfg.layout.pp, cfg.layout.repeats, uneven_units(cfg)))
        if inverse:
            real = np.flatnonzero(order >= 0)
            return real[np.argsort(order[real])]
        for i in range(len(order)):
            if order[i] < 0:
                order[i] = order[i - 1]
        return order

    def _permute_layers(self, state, order):
        if not self.cfg.layout.stage_layers and (order == np.arange(len(order))).all():
            return state

        def permute(path, x):
            if not any(getattr(k, "key", None) in ("blocks", "dense_blocks") for k in path):
                return x
            if isinstance(x, jax.core.Tracer):
                return _take(x, order)
            if isinstance(x, jax.Array):  # at restore and at every save: compiled once per order
                return _jitted_take(tuple(int(i) for i in order))(x)
            return x[order]

        return jax.tree_util.tree_map_with_path(permute, state)

    def to_storage(self, state, moments: bool = False):
        """Global layer order -> the stacked storage order of this layout (each stage's chunks contiguous), the
        vocabulary padded to its stored size (`config.padded_vocab`). `moments`: the tree is optimizer state, whose
        embedding and head moments are sharded like the gradients (ZeRO-1 splits them further)."""
        return self._pad_vocab(self._permute_layers(state, self.layer_order()), padded_vocab(self.cfg), moments)

    def to_global(self, state):
        """The storage order of this layout -> global layer order (what one device and checkpoints use), the
        vocabulary's padding cut."""
        return self._pad_vocab(self._permute_layers(state, self.layer_order(inverse=True)), self.cfg.model.vocab)

    def _pad_vocab(self, state, size: int, moments: bool = False):
        """The embedding's rows and the head's columns (and their optimizer moments: any leaf under an 'embed' or
        'head' key) padded with zeros, or cut, to `size`. A no-op unless the vocabulary split needs padding. Cut, a
        sharded leaf comes out whole over the vocabulary (an uneven split cannot be stored), split as before
        elsewhere."""
        if not masked_vocab(self.cfg):
            return state

        def fix(path, x):
            keys = [getattr(k, "key", None) for k in path]
            dim = 0 if "embed" in keys else 1 if "head" in keys else None
            if dim is None or not hasattr(x, "shape") or x.ndim != 2 or x.shape[dim] == size:
                return x
            if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
                # On an Explicit mesh the vocabulary dimension is made whole before it changes size; cut, it stays
                # whole; padded, it is stored as the layout places it.
                spec = [*x.sharding.spec, *([None] * (x.ndim - len(x.sharding.spec)))]
                spec[dim] = None
                whole = NamedSharding(x.sharding.mesh, P(*spec))
                if size < x.shape[dim]:
                    sharding = whole
                else:
                    specs = self._vocab_specs[1 if moments else 0]
                    sharding = NamedSharding(self.mesh, specs["embed" if dim == 0 else "head"])

                return _jitted_resize(whole, dim, size, sharding)(x)  # compiled once per shape, not per save
            return _resize(x, dim, size)

        return jax.tree_util.tree_map_with_path(fix, state)

    @functools.cached_property
    def _vocab_specs(self) -> tuple[dict[str, P], dict[str, P]]:
        """The embedding's and the head's specs: as parameters, and as gradients and optimizer moments."""

        def find(specs):
            flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
            return {getattr(path[0], "key", None): s for path, s in flat if getattr(path[0], "key", None) in
                    ("embed", "head")}  # fmt: skip

        return find(self.param_specs), find(self.grad_specs)

    def make_batch(self, source, step: int):
        """The batch of `step` as global [M, B / M, S] arrays; each process builds only the rows its own devices hold
        (`source.rows`), so on a pod no host reads another host's data."""
        cfg = self.cfg
        mb, b, s = cfg.layout.microbatches, cfg.run.batch, cfg.run.seq_len
        rows_mb = b // mb
        sharding = NamedSharding(self.mesh, batch_spec(self.sizes))
        cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

        def rows(r0: int, r1: int):
            if (r0, r1) not in cache:
                parts = [source.rows(step, b, j * rows_mb + r0, j * rows_mb + r1) for j in range(mb)]
                tokens = check_tokens(np.stack([p[0] for p in parts]), cfg.model.vocab, "tokens")
                targets = check_tokens(np.stack([p[1] for p in parts]), cfg.model.vocab, "targets")
                cache[(r0, r1)] = (tokens, targets)
            return cache[(r0, r1)]

        def callback(which: int):
            def get(index):
                r = index[1]
                return rows(r.start or 0, rows_mb if r.stop is None else r.stop)[which][:, :, index[2]]

            return get

        shape = (mb, rows_mb, s)
        return tuple(jax.make_array_from_callback(shape, sharding, callback(i)) for i in (0, 1))

    def put_batch(self, tokens, targets):
        """Host [B, S] arrays -> global [M, B / M, S] arrays sharded like batch_spec(), after the vocabulary check.
        Microbatch j is rows j B/M .. (j+1) B/M whatever the layout, so the load-balancing loss (which is not linear
        in the batch) is the same for every layout with the same M."""
        v, mb = self.cfg.model.vocab, self.cfg.layout.microbatches
        sh = NamedSharding(self.mesh, batch_spec(self.sizes))

        def put(x, name):
            x = check_tokens(x, v, name)
            return jax.device_put(jnp.asarray(x.reshape(mb, x.shape[0] // mb, *x.shape[1:]), jnp.int32), sh)

        return put(tokens, "tokens"), put(targets, "targets")


@functools.lru_cache(maxsize=32)
def _build_sharded_model(cls, cfg: Config, mesh) -> ShardedModel:
    # Uneven stages: the stored stack is padded to pp x the largest stage (config.storage_model).
    graphdef, params, rest = nnx.split(abstract_model(storage_model(cfg)), nnx.Param, ...)
    sizes, rules = dict(mesh.shape), rules_for(cfg.layout)
    return cls(cfg, mesh, graphdef, state_specs(params, sizes, rules), state_specs(rest, sizes, rules), params, rest)


def sharded_axes(sm: ShardedModel) -> Axes:
    """The train step's `Axes` (inside its shard_map), from the layout's rules."""
    cfg = sm.cfg
    return Axes.sharded(sm.sizes, sm.rules, cfg.layout.ragged_exchange, masked_vocab(cfg), mesh_platform(sm.mesh))


def mesh_platform(mesh) -> str:
    """What the mesh's devices are: 'cpu', 'gpu', 'tpu' (a TPU target's compile-only devices too)."""
    return mesh.devices.flat[0].platform


def abstract_inputs(sm: ShardedModel):
    """ShapeDtypeStructs carrying their NamedShardings for params, rest, tokens and targets: nothing allocated."""

    def sds(specs, state):
        return jax.tree.map(
            lambda spec, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(sm.mesh, spec)), specs, state
        )

    cfg = sm.cfg
    mb = cfg.layout.microbatches
    batch = jax.ShapeDtypeStruct(
        (mb, cfg.run.batch // mb, cfg.run.seq_len), jnp.int32, sharding=NamedSharding(sm.mesh, batch_spec(sm.sizes))
    )
    return sds(sm.param_specs, sm.abstract_params), sds(sm.rest_specs, sm.abstract_rest), batch, batch


def init_state(model_cfg, seed):
    """(params, rest) of a freshly initialised model in global layer order; `seed` may be traced. nnx.Rngs(int)
    makes jax.random.key(int), so these are the streams of init_model(cfg, seed)."""
    _, params, rest = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(jax.random.key(seed))), nnx.Param, ...)
    return params, rest


@functools.lru_cache(maxsize=8)
def _one_device_init(model_cfg) -> Callable:
    return jax.jit(functools.partial(init_state, model_cfg))


def one_device_params(cfg: Config, seed: int = 0):
    """(params, rest) of the model in global layer order as host arrays, initialised on one device: what the
    one-device reference runs on and what `ShardedModel.put` shards. Compiled once per model config."""
    return to_host(_one_device_init(cfg.model)(jnp.uint32(seed)))


def to_host(tree):
    return jax.tree.map(np.array, tree)  # writable host copies


def _take(a, order):  # the same sharding out as in (on an Explicit mesh the gather must be told)
    return a.at[np.asarray(order)].get(out_sharding=jax.typeof(a).sharding)


@functools.lru_cache(maxsize=64)
def _jitted_take(order: tuple[int, ...]) -> Callable:
    return jax.jit(functools.partial(_take, order=order))


@functools.lru_cache(maxsize=64)
def _jitted_resize(whole: NamedSharding, dim: int, size: int, sharding: NamedSharding) -> Callable:
    def resize(a):
        return jax.reshard(_resize(jax.reshard(a, whole), dim, size), sharding)

    return jax.jit(resize, out_shardings=sharding)


def _resize(x, dim: int, size: int):
    """x padded with zeros, or cut, along `dim` to `size` (numpy or jax)."""
    if x.shape[dim] > size:
        return x[:size] if dim == 0 else x[:, :size]
    pad = [(0, 0)] * x.ndim
    pad[dim] = (0, size - x.shape[dim])
    return np.pad(x, pad) if isinstance(x, np.ndarray) else jnp.pad(x, pad)
