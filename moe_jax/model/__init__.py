"""The MoE transformer in Flax NNX, its parameter count, and the naive references the tests compare it with."""

from flax import nnx

# Parameters carry logical names only; shardings are applied by jit out_shardings (never eagerly, which would create
# Variables on a mesh and fail inside manual shard_map regions).
nnx.use_eager_sharding(False)
