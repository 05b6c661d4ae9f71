"""The sharded train step: `jax.jit` of `jax.value_and_grad` of one `jax.shard_map` over the whole mesh, check_vma on.

Inside the shard_map every device runs the same Flax module code as one device does, on its shard, and every
collective is named: all-gather / reduce-scatter over tp (sequence parallelism, in `Axes`), all-to-all over ep (expert
dispatch and combine), psum of router statistics and of the loss over the token axes. Gradient sums of replicated
weights are not written: they are the transposes of one `pcast` to varying per weight at the top of the body, so
autodiff places exactly one sum per weight per step, outside every loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax.config import Config, ConfigError
from moe_jax.model.layers import compute_dtype
from moe_jax.model.transformer import Transformer, abstract_model, aux_losses, check_tokens, cross_entropy, run_blocks
from moe_jax.sharding import MESH_AXES, TOKEN_AXES, Axes, active_axes, logical_to_mesh, state_specs


def batch_spec(sizes) -> P:
    """Tokens and targets [B, S]: batch over (dp, ep), sequence over tp."""
    return logical_to_mesh(("batch", "seq"), sizes)


@dataclasses.dataclass(frozen=True)
class ShardedModel:
    """The model split into graph, parameters and other state, with the mesh specs of each."""

    cfg: Config
    mesh: Any
    graphdef: Any
    param_specs: Any
    rest_specs: Any
    abstract_params: Any
    abstract_rest: Any

    @classmethod
    def build(cls, cfg: Config, mesh) -> ShardedModel:
        if cfg.layout.pp > 1 or cfg.layout.microbatches > 1:
            raise ConfigError(
                f"layout.pp={cfg.layout.pp}, layout.microbatches={cfg.layout.microbatches}: the sharded step runs "
                "pp = 1 and one microbatch so far; the pipeline schedule is not built yet"
            )
        graphdef, params, rest = nnx.split(abstract_model(cfg), nnx.Param, ...)
        sizes = dict(mesh.shape)
        return cls(cfg, mesh, graphdef, state_specs(params, sizes), state_specs(rest, sizes), params, rest)

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    def shardings(self, specs):
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs, is_leaf=lambda x: isinstance(x, P))

    def init(self, seed: int = 0):
        """Initialises parameters directly into their shards (each device computes only its own slices)."""
        cfg = self.cfg

        def init_fn():
            _, params, rest = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(seed)), nnx.Param, ...)
            return params, rest

        out = (self.shardings(self.param_specs), self.shardings(self.rest_specs))
        return jax.jit(init_fn, out_shardings=out)()

    def put_batch(self, tokens, targets):
        """Host arrays -> global arrays sharded like batch_spec(), after the vocabulary check."""
        v = self.cfg.model.vocab
        sh = NamedSharding(self.mesh, batch_spec(self.sizes))
        return (
            jax.device_put(jnp.asarray(check_tokens(tokens, v, "tokens"), jnp.int32), sh),
            jax.device_put(jnp.asarray(check_tokens(targets, v, "targets"), jnp.int32), sh),
        )


def _to_varying(tree, specs, sizes):
    """pcast every leaf to varying over the mesh axes its spec does not use (once, outside all loops)."""

    def cast(x, spec):
        used = {a for part in spec if part is not None for a in ((part,) if isinstance(part, str) else part)}
        missing = tuple(a for a in active_axes(MESH_AXES, sizes) if a not in used)
        return lax.pcast(x, missing, to="varying") if missing else x

    # specs is a prefix of tree: each spec leaf sits where tree has a Variable holding one array.
    return jax.tree.map(
        lambda spec, var: jax.tree.map(lambda x: cast(x, spec), var), specs, tree, is_leaf=lambda x: isinstance(x, P)
    )


def loss_fn(sm: ShardedModel) -> Callable:
    """(params, rest, tokens, targets) -> (loss, metrics), one shard_map over the mesh (pp = 1 here)."""
    cfg = sm.cfg
    dtype = compute_dtype(cfg.run.dtype)
    n_tokens = cfg.run.batch * cfg.run.seq_len
    sizes = sm.sizes
    axes = Axes.sharded(sizes)
    remat = cfg.layout.remat
    all_tokens = active_axes((*TOKEN_AXES, "pp"), sizes)
    pp = active_axes(("pp",), sizes)

    def psum(x, over):
        return lax.psum(x, over) if over else x

    def body(params, rest, tokens_local, targets_local):
        b, s = cfg.run.batch // (cfg.layout.dp * cfg.layout.ep), cfg.run.seq_len // cfg.layout.tp
        assert tokens_local.shape == (b, s), (tokens_local.shape, (b, s))
        params = _to_varying(params, sm.param_specs, sizes)
        model = nnx.merge(sm.graphdef, params, rest, copy=True)
        x_local = model.embed_tokens(tokens_local)
        x_local, stats = run_blocks(model.blocks, x_local, axes, dtype, (1, 1), "layer" if remat != "none" else "none")
        ce = psum(cross_entropy(model.logits(x_local, dtype), targets_local), all_tokens) / n_tokens
        # Router statistics are whole-batch already (summed over the token axes inside the MoE); layers are split
        # over pp, so the mean over layers sums over pp.
        layers = cfg.model.layers
        lb = psum(jnp.sum(stats["lb_loss"]), pp) / layers
        z = psum(jnp.sum(stats["z_loss"]), pp) / layers
        aux = aux_losses(cfg.model, {"lb_loss": lb, "z_loss": z})
        metrics = {
            "ce": ce,
            **aux,
            "dropped": psum(jnp.sum(stats["dropped"]), pp),
            "routed": psum(jnp.sum(stats["routed"]), pp),
            "tokens_per_expert": stats["tokens_per_expert"],
        }
        return ce + aux["router_loss"], metrics

    metric_specs = {
        "ce": P(),
        "lb_loss": P(),
        "z_loss": P(),
        "router_loss": P(),
        "dropped": P(),
        "routed": P(),
        "tokens_per_expert": logical_to_mesh(("layers", None), sizes),
    }
    return jax.shard_map(
        body,
        mesh=sm.mesh,
        in_specs=(sm.param_specs, sm.rest_specs, batch_spec(sizes), batch_spec(sizes)),
        out_specs=(P(), metric_specs),
        check_vma=True,
    )


def abstract_inputs(sm: ShardedModel):
    """ShapeDtypeStructs carrying their NamedShardings for params, rest, tokens and targets: nothing allocated."""

    def sds(specs, state):
        return jax.tree.map(
            lambda spec, var: jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(sm.mesh, spec)), var
            ),
            specs,
            state,
            is_leaf=lambda x: isinstance(x, P),
        )

    cfg = sm.cfg
    batch = jax.ShapeDtypeStruct(
        (cfg.run.batch, cfg.run.seq_len), jnp.int32, sharding=NamedSharding(sm.mesh, batch_spec(sm.sizes))
    )
    return sds(sm.param_specs, sm.abstract_params), sds(sm.rest_specs, sm.abstract_rest), batch, batch


def lower_step(sm: ShardedModel):
    """The train step lowered for the mesh from abstract inputs (compile with `.compile()`)."""
    with jax.set_mesh(sm.mesh):
        return grad_step(sm).lower(*abstract_inputs(sm))


def grad_step(sm: ShardedModel) -> Callable:
    """jit(value_and_grad(shard_mapped loss)): ((loss, metrics), grads), grads sharded like the parameters."""
    return jax.jit(jax.value_and_grad(loss_fn(sm), has_aux=True))


# ------------------------------------------------------------------------------------------- the one-device reference


def reference_grad_step(cfg: Config, graphdef) -> Callable:
    """The same loss on one device, no shard_map. In capacity mode the batch is cut into the same dispatch groups as
    the sharded run (rows over dp x ep, sequence over tp), so every group has the same capacity rule."""
    from moe_jax.model.transformer import loss_fn as one_device_loss

    lay = cfg.layout
    groups = (lay.dp * lay.ep, lay.tp)
    dtype = compute_dtype(cfg.run.dtype)
    remat = "layer" if lay.remat != "none" else "none"

    def f(params, rest, tokens, targets):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return one_device_loss(model, tokens, targets, dtype, groups, remat)

    # Called with host (numpy) arrays, so everything runs on the default device alone.
    return jax.jit(jax.value_and_grad(f, has_aux=True))


def to_host(tree):
    return jax.tree.map(np.array, tree)  # writable host copies
