"""moe_jax: a JAX/SPMD reference implementation of a sharded Mixture-of-Experts transformer on a (pp, dp, ep, tp) mesh.

Shapes live in names: an activation's suffix lists its dimensions, and einsum strings use the same letters.

    B batch            S sequence          T tokens (flattened B x S, or a shard's)      D model width
    H attention heads  K head dim          Q query positions (attention)                 V vocabulary
    E experts          C expert capacity   F expert hidden                               R top-k route slot
    G dispatch groups  L layers            M microbatches

A `_local` in a name marks a shard's view inside `shard_map`.
"""

__version__ = "0.1.0"
