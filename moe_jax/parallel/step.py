"""The sharded train step: `jax.jit` of `jax.value_and_grad` of one `jax.shard_map` over the whole mesh, check_vma on.

Inside the shard_map every device runs the same Flax module code as one device does, on its shard, and every
collective is named: all-gather / reduce-scatter over tp (sequence parallelism, in `Axes`), all-to-all over ep (expert
dispatch and combine), psum of router statistics and of the loss over the token axes. Gradient sums of replicated
weights are not written: they are the transposes of one `pcast` to varying per weight at the top of the body, so
autodiff places exactly one sum per weight per step, outside every loop.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax.config import Config, masked_vocab, padded_vocab, storage_model, uneven_units
from moe_jax.mesh import layer_storage_order
from moe_jax.model.layers import compute_dtype
from moe_jax.model.transformer import (
    Stack,
    Transformer,
    abstract_model,
    aux_losses,
    check_tokens,
    run_prologue,
)
from moe_jax.parallel.schedule import Schedule
from moe_jax.sharding import (
    MESH_AXES,
    TOKEN_AXES,
    Axes,
    active_axes,
    logical_to_mesh,
    rules_for,
    spec_axes,
    state_specs,
    zero_specs,
)


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

        def take(a):  # the same sharding out as in (on an Explicit mesh the gather must be told)
            return a.at[order].get(out_sharding=jax.typeof(a).sharding)

        def permute(path, x):
            if not any(getattr(k, "key", None) in ("blocks", "dense_blocks") for k in path):
                return x
            if isinstance(x, jax.core.Tracer):
                return take(x)
            if isinstance(x, jax.Array):  # happens once, at restore or save
                return jax.jit(take)(x)
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

                def resize(a):
                    return jax.reshard(_resize(jax.reshard(a, whole), dim, size), sharding)

                return jax.jit(resize, out_shardings=sharding)(x)
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
    return Axes.sharded(sm.sizes, sm.rules, cfg.layout.ragged_exchange, masked_vocab(cfg))


def _to_varying(tree, specs, sizes):
    """pcast every leaf to varying over the mesh axes its spec does not use (once, outside all loops)."""

    def cast(x, spec):
        missing = _missing_axes(spec, sizes)
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree, specs)


def tick_input(t, stage, recv, buf, x_MBSD, pp: int, v: int, mb: int):
    """What stage `stage` works on at tick t of the schedule (see parallel/schedule.py), in SPMD form.

    Returns (valid, microbatch j, repeat r, buffer, input): stage 0 takes microbatch j's embedding on the first repeat
    and, circular, the last stage's output of the previous repeat from the wrap-around buffer (filed here as it
    arrives); every other stage takes what the previous stage sent. Bubble ticks are not valid."""
    k = t - stage
    valid = (k >= 0) & (k < v * mb)
    kc = jnp.clip(k, 0, v * mb - 1)
    j, r = kc % mb, kc // mb
    if v > 1:  # stage 0 files what the last stage sent at the end of the previous tick
        k_last = t - pp
        j_last = jnp.clip(k_last, 0, v * mb - 1) % mb
        keep = (stage == 0) & (k_last >= 0) & (k_last < v * mb)
        buf = buf.at[j_last].set(jnp.where(keep, recv, buf[j_last]))
        first = jnp.where(r == 0, x_MBSD[j], buf[j])
    else:
        first = x_MBSD[j]
    return valid, j, r, buf, jnp.where(stage == 0, first, recv)


def ring(pp: int, repeats: int) -> list[tuple[int, int]]:
    """Stage s sends to s + 1; circular schedules also close the ring (last -> first)."""
    return [(s, (s + 1) % pp) for s in range(pp if repeats > 1 else pp - 1)]


def loss_fn(sm: ShardedModel) -> Callable:
    """(params, rest, tokens, targets) -> (loss, metrics): one shard_map over the mesh running the pipeline schedule.

    tokens / targets are [M, B / M, S] (microbatch-major, `put_batch` lays them out), sharded over (dp, ep) and tp.
    With pp = 1 the schedule is a plain loop over microbatches.
    """
    body = _loss_body(sm)
    sizes = sm.sizes

    def cast_then_body(params, rest, tokens_local, targets_local):
        return body(_to_varying(params, sm.param_specs, sizes), rest, tokens_local, targets_local)

    return jax.shard_map(
        cast_then_body,
        mesh=sm.mesh,
        in_specs=(sm.param_specs, sm.rest_specs, batch_spec(sizes), batch_spec(sizes)),
        out_specs=(P(), metric_specs(sizes)),
        check_vma=True,
    )


def _zero_grads_fn(sm: ShardedModel) -> Callable:
    """ZeRO-1 (layout.zero=1), GPipe: (params, rest, tokens, targets, scale) -> ((loss, metrics), gradients of scale x
    loss), the gradients reduce-scattered over the batch axes (`reduce_grads`). The gradient is taken inside the
    shard_map, of the body's loss in the varying parameters, so each sum over devices is named here."""
    body = _loss_body(sm)
    sizes = sm.sizes

    def f(params, rest, tokens_local, targets_local, scale):
        def scaled(p):
            loss, metrics = body(p, rest, tokens_local, targets_local)
            return loss * scale, (loss, metrics)

        (_, out), grads = jax.value_and_grad(scaled, has_aux=True)(_to_varying(params, sm.param_specs, sizes))
        return out, reduce_grads(sm, grads)

    return jax.shard_map(
        f,
        mesh=sm.mesh,
        in_specs=(sm.param_specs, sm.rest_specs, batch_spec(sizes), batch_spec(sizes), P()),
        out_specs=((P(), metric_specs(sizes)), sm.grad_specs),
        check_vma=True,
    )


def reduce_grads(sm: ShardedModel, grads):
    """Inside the shard_map: each weight's local gradient (varying over every axis) summed over the axes the weight is
    replicated on. ZeRO-1: reduce-scattered over its batch axes first (each device keeps its slice of the sum,
    `ShardedModel.zero`), then all-reduced over the rest on that slice; otherwise one all-reduce."""
    sizes = sm.sizes
    leaves, tree = jax.tree.flatten(grads)
    out = []
    for g, (spec, z, dim) in zip(leaves, sm.zero, strict=True):
        if z:
            g = lax.psum_scatter(g, z, scatter_dimension=dim, tiled=True)
        rest = tuple(a for a in _missing_axes(spec, sizes) if a not in z)
        out.append(lax.psum(g, rest) if rest else g)
    return jax.tree.unflatten(tree, out)


def _missing_axes(spec, sizes) -> tuple[str, ...]:
    """The active mesh axes a spec does not split over (its leaf is replicated on them)."""
    used = {a for part in spec for a in spec_axes(part)}
    return tuple(a for a in active_axes(MESH_AXES, sizes) if a not in used)


def stage_unit(stack: Stack, x, i, axes: Axes, dtype, n_units):
    """Unit i of a stage's stack on x: (output, router statistics). Uneven stages (`n_units`, this stage's real units;
    None for equal stages): a padding unit passes its input on and counts nothing."""
    y, stats = stack.unit(x, i, axes, dtype, (1, 1))
    if n_units is None:
        return y, stats
    real = i < n_units
    return jnp.where(real, y, x), jax.tree.map(lambda a: jnp.where(real, a, jnp.zeros_like(a)), stats)


def _loss_body(sm: ShardedModel) -> Callable:
    """The shard_map body of `loss_fn`, on parameters already varying over every mesh axis."""
    cfg = sm.cfg
    m, lay = cfg.model, cfg.layout
    dtype = compute_dtype(cfg.run.dtype)
    n_tokens = cfg.run.batch * cfg.run.seq_len
    sizes = sm.sizes
    axes = sharded_axes(sm)
    stored = storage_model(cfg).units
    sched = Schedule(lay.pp, lay.microbatches, lay.repeats, stored, lay.remat)
    pp, v, mb = lay.pp, lay.repeats, lay.microbatches
    uneven = uneven_units(cfg)
    all_tokens = active_axes((*TOKEN_AXES, "pp"), sizes)
    pp_axes = active_axes(("pp",), sizes)
    remat_layer = "layer" if lay.remat == "layer" else "none"
    perm = ring(pp, v)

    def psum(x, over):
        return lax.psum(x, over) if over else x

    def body(params, rest, tokens_local, targets_local):
        b_loc, s_loc = cfg.run.batch // (mb * lay.dp * lay.ep), cfg.run.seq_len // lay.tp
        assert tokens_local.shape == (mb, b_loc, s_loc), (tokens_local.shape, (mb, b_loc, s_loc))
        model = nnx.merge(sm.graphdef, params, rest, copy=True)
        stack = Stack(model)  # this stage's [v x Lc] units, its chunks in order
        stage = lax.axis_index("pp") if pp_axes else 0
        # Every stage embeds and runs the dense first layers (cheap, replicated over pp); only stage 0 uses them.
        x_MBSD = model.embed_tokens(tokens_local, axes)
        if axes.vocab_pp:  # the embedding was summed over the stages: the same on each. Typed varying here, once,
            # so its gradient is summed over the stages once, not at every tick that reads it
            x_MBSD = lax.pcast(x_MBSD, ("pp",), to="varying")
        if m.dense_layers:
            x_MBSD = lax.map(lambda x: run_prologue(model, x, axes, dtype, remat_layer), x_MBSD)
        l_c = stored // (pp * v)
        n_units = jnp.asarray(uneven, jnp.int32)[stage] if uneven else None  # this stage's real units

        # Unit i of the stage's stack is picked inside the (checkpointed) unit, so what a checkpoint saves for the
        # backward pass is the activation and the index, never a per-tick copy of the stage's weights.
        def layer(x, i):
            return stage_unit(stack, x, i, axes, dtype, n_units)

        if remat_layer == "layer":
            layer = jax.checkpoint(layer)

        def apply_chunk(x, r):
            return lax.scan(layer, x, r * l_c + jnp.arange(l_c))

        if lay.remat == "tick":
            apply_chunk = jax.checkpoint(apply_chunk)

        zero_act = x_MBSD[0] * 0.0  # carries the activations' varying type (every active axis)
        zero_stat = jnp.zeros((), jnp.float32)
        zero_tpe = jnp.zeros((v, l_c, m.experts), jnp.float32)
        if pp_axes:
            zero_stat, zero_tpe = (
                lax.pcast(zero_stat, pp_axes, to="varying"),
                lax.pcast(zero_tpe, pp_axes, to="varying"),
            )

        def tick(carry, t):
            recv, buf, out, acc = carry
            valid, j, r, buf, x_in = tick_input(t, stage, recv, buf, x_MBSD, pp, v, mb)
            y, stats = apply_chunk(x_in, r)
            is_out = valid & (stage == pp - 1) & (r == v - 1)
            out = out.at[j].set(jnp.where(is_out, y, out[j]))
            w = valid.astype(jnp.float32)
            acc = {
                "lb_loss": acc["lb_loss"] + w * jnp.sum(stats["lb_loss"]),
                "z_loss": acc["z_loss"] + w * jnp.sum(stats["z_loss"]),
                "dropped": acc["dropped"] + w * jnp.sum(stats["dropped"]),
                "routed": acc["routed"] + w * jnp.sum(stats["routed"]),
                "tokens_per_expert": acc["tokens_per_expert"].at[r].add(w * stats["tokens_per_expert"]),
            }
            send = lax.ppermute(y, "pp", perm) if pp_axes else y
            return (send, buf, out, acc), None

        acc0 = {k: zero_stat for k in ("lb_loss", "z_loss", "dropped", "routed")} | {"tokens_per_expert": zero_tpe}
        buf0 = jnp.broadcast_to(zero_act, (mb if v > 1 else 1, *zero_act.shape))
        out0 = jnp.broadcast_to(zero_act, (mb, *zero_act.shape))
        (_, _, out, acc), _ = lax.scan(tick, (zero_act, buf0, out0, acc0), jnp.arange(sched.ticks))

        # Head and loss on the last stage's outputs (every stage computes; the others' share is masked out), one
        # microbatch at a time and rematerialised: only one microbatch's [B, S, V] logits are ever alive. The
        # vocabulary split over pp too: every stage computes its share of the head on the last stage's outputs,
        # summed over the stages to every stage first (the other stages hold zeros).
        last = (stage == pp - 1) if pp_axes else True
        if axes.vocab_pp:  # (typed varying again at once: the gradient's sum over the stages, once)
            out = lax.pcast(lax.psum(out, "pp"), ("pp",), to="varying")

        @jax.checkpoint
        def microbatch_ce(ce, xs):
            x, y = xs
            return ce + model.loss_sum(x, y, dtype, axes), None

        ce_local, _ = lax.scan(
            microbatch_ce, jnp.zeros((), jnp.float32) * zero_act[0, 0, 0], (out, axes.loss_targets(targets_local))
        )
        ce = psum(jnp.where(last, ce_local, 0.0), all_tokens) / n_tokens
        totals = psum(jnp.stack([acc["lb_loss"], acc["z_loss"], acc["dropped"], acc["routed"]]), pp_axes)
        lb, z = totals[0] / (m.moe_layers * mb), totals[1] / (m.moe_layers * mb)  # per MoE layer and microbatch
        aux = aux_losses(m, {"lb_loss": lb, "z_loss": z})
        metrics = {
            "ce": ce,
            **aux,
            "dropped": totals[2],
            "routed": totals[3],
            "tokens_per_expert": acc["tokens_per_expert"].reshape(v * l_c, m.experts),
        }
        return ce + aux["router_loss"], metrics

    return body


def metric_specs(sizes) -> dict[str, P]:
    """The step's metrics: scalars replicated, the per-layer expert counts split over pp like the layers."""
    return {k: P() for k in ("ce", "lb_loss", "z_loss", "router_loss", "dropped", "routed")} | {
        "tokens_per_expert": logical_to_mesh(("layers", None), sizes)
    }


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


def lower_step(sm: ShardedModel):
    """The train step lowered for the mesh from abstract inputs (compile with `.compile()`)."""
    with jax.set_mesh(sm.mesh):
        return grad_step(sm).lower(*abstract_inputs(sm))


def value_and_grad_fn(sm: ShardedModel) -> Callable:
    """(params, rest, tokens, targets, scale) -> ((loss, metrics), gradients of scale x loss), not jitted. GPipe:
    autodiff of `loss_fn`'s scan. 1F1B: the schedule computes its own gradients (parallel/one_f_one_b.py), and the
    loss scale seeds its cotangents (fp16 needs the scale inside the backward pass, not applied after it)."""
    if sm.cfg.layout.schedule == "1f1b":
        from moe_jax.parallel.one_f_one_b import grads_fn

        return grads_fn(sm)
    if sm.cfg.layout.zero:
        return _zero_grads_fn(sm)
    sharded_loss = loss_fn(sm)

    def scaled_loss(params, rest, tokens, targets, scale):
        loss, metrics = sharded_loss(params, rest, tokens, targets)
        return loss * scale, (loss, metrics)

    def f(params, rest, tokens, targets, scale):
        (_, (loss, metrics)), grads = jax.value_and_grad(scaled_loss, has_aux=True)(
            params, rest, tokens, targets, scale
        )
        return (loss, metrics), grads

    return f


@functools.lru_cache(maxsize=32)
def grad_step(sm: ShardedModel) -> Callable:
    """(params, rest, tokens, targets) -> ((loss, metrics), grads), jitted, grads sharded like the parameters: GPipe's
    jit(value_and_grad(shard_mapped loss)), or the 1F1B schedule's own gradients."""
    if sm.cfg.layout.schedule == "1f1b" or sm.cfg.layout.zero:
        f = value_and_grad_fn(sm)
        return jax.jit(lambda params, rest, tokens, targets: f(params, rest, tokens, targets, jnp.float32(1.0)))
    return jax.jit(jax.value_and_grad(loss_fn(sm), has_aux=True))


# ------------------------------------------------------------------------------------------- the one-device reference


def reference_grad_step(cfg: Config, graphdef) -> Callable:
    """The same loss on one device, no shard_map: the plain model in dropless mode (grouping cannot change a dropless
    result), and in capacity mode the batch cut into the same dispatch groups as the sharded run (rows over dp x ep,
    sequence over tp), so every group has the same capacity rule. Layouts that agree on these share one program."""
    lay = cfg.layout
    groups = (lay.dp * lay.ep, lay.tp) if cfg.model.dispatch == "capacity" else (1, 1)
    # Rematerialised per layer whatever the layout's policy: the same values, and the memory of one host.
    return _reference_grad_step(cfg.model, cfg.run.dtype, groups, "layer", lay.microbatches, graphdef)


@functools.lru_cache(maxsize=32)
def _reference_grad_step(model_cfg, dtype_name: str, groups, remat: str, microbatches: int, graphdef) -> Callable:
    from moe_jax.model.transformer import loss_fn as one_device_loss

    dtype = compute_dtype(dtype_name)

    def f(params, rest, tokens, targets):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return one_device_loss(model, tokens, targets, dtype, groups, remat, microbatches)

    # Called with host (numpy) arrays, so everything runs on the default device alone.
    return jax.jit(jax.value_and_grad(f, has_aux=True))


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


def _resize(x, dim: int, size: int):
    """x padded with zeros, or cut, along `dim` to `size` (numpy or jax)."""
    if x.shape[dim] > size:
        return x[:size] if dim == 0 else x[:, :size]
    pad = [(0, 0)] * x.ndim
    pad[dim] = (0, size - x.shape[dim])
    return np.pad(x, pad) if isinstance(x, np.ndarray) else jnp.pad(x, pad)
