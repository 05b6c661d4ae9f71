"""The collectives one sharded train step must run, from the config alone: kind, mesh axes, bytes per device (what one
device puts in) and count per step. The HLO audit compares the compiled program with this list, and the planner
prices the same list, so the planner's communication bytes are the compiler's.

Per MoE layer run, with T = (B / (M dp ep)) x (S / tp) tokens per device and microbatch and C its expert capacity:
    attention  all-gather over tp of [B/(dp ep), S/tp, D]; reduce-scatter over tp of [B/(dp ep), S, D]
    experts    all-to-all over ep of [E, C, D] (dispatch) and [E/ep, ep C, D] (combine): E C D x dtype bytes each;
               all-gather over tp of [E/ep, ep C, D]; reduce-scatter over tp of [E/ep, tp ep C, D]
               folded (layout.expert_tp=1): the all-to-alls over (ep, tp), E C D x dtype bytes each, and no tp
               collective of expert rows
    router     one all-reduce over the token axes of 2E + 2 fp32 (counts, probability sums, z, drops)
All-gathers carry the compute dtype; the reduce-scatters carry fp32 partial sums (a one-device matmul accumulates in
fp32 and rounds once; see model/layers.py). In the backward pass each becomes the other, with the dtypes swapped.
Forward collectives run once more under remat, when the forward is recomputed; the all-to-alls run forward,
recomputed and backward (r = 3, r = 2 without remat). The router all-reduce runs in the forward and the recomputation
(its backward needs no communication). A step runs (v M + pp - 1) x L / (pp v) layers per device (the pipeline's ticks
times its chunk, bubble ticks included). Per tick one collective-permute over pp moves the fp32 residual
[B/(M dp ep), S/tp, D] to the next stage, and one more moves its gradient back. Gradient sums of replicated weights
run once per step each, outside every loop.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from moe_jax.config import Config, storage_model
from moe_jax.model.moe import capacity
from moe_jax.model.params import param_shards_for
from moe_jax.parallel.schedule import Schedule, schedule_of
from moe_jax.sharding import MESH_AXES, TOKEN_AXES, active_axes, expert_axes, resolve_exchange

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def local_sizes(cfg: Config) -> Mapping[str, int]:
    """Per device and microbatch: batch rows, sequence, tokens, expert capacity, stacked units, experts, heads, expert
    hidden, vocabulary. Read-only (cached: the layout search asks for it a hundred thousand times)."""
    return MappingProxyType(_local_sizes(cfg))


@functools.lru_cache(maxsize=4096)
def _local_sizes(cfg: Config) -> dict[str, int]:
    m, lay, run = cfg.model, cfg.layout, cfg.run
    b = run.batch // (lay.dp * lay.ep * lay.microbatches)
    s = run.seq_len // lay.tp
    return {
        "batch": b,
        "seq": s,
        "tokens": b * s,
        "capacity": capacity(m, b * s),
        "layers": storage_model(cfg).units // lay.pp,
        # folded (layout.expert_tp=1): E / (ep tp) whole experts per device; else E / ep, their hidden split over tp
        "experts": m.experts // (lay.ep * (lay.tp if lay.folded else 1)),
        "heads": m.heads // lay.tp,
        "hidden": m.expert_hidden // (1 if lay.folded else lay.tp),
        # the tp ranks whose tokens an expert's rows gather before its matmuls (folded: the all-to-all brings them)
        "expert_gather": 1 if lay.folded else lay.tp,
        # the vocabulary a device holds (embedding rows, head columns), and the sequence its head scores: split over
        # tp (layout.vocab_split=tp), V / tp of the padded vocabulary for the whole sequence; else V for its slice
        "vocab": storage_model(cfg).vocab // lay.vocab_shards,
        "head_seq": run.seq_len if lay.vocab_parallel else s,
    }


def expected_collectives(
    cfg: Config, step: str = "grad", lowered: bool = False, platform: str | None = None
) -> list[dict[str, Any]]:
    """Rows {kind, axes, bytes_per_device, count_per_step, what}, axes of size 1 left out (no collective runs there).
    step 'grad' is the loss and gradients (verify, hlo); 'train' adds the optimizer's gradient norm and overflow check:
    one all-reduce of 1 fp32 per weight per set of axes the parameters are split over (the update itself is
    elementwise);
    'prefill' and 'decode' are serving's (`expected_serving_collectives`). `lowered`: the program as JAX emits it,
    before XLA removes what no result needs; it differs for 1F1B only, whose backward slot computes (under jax.vjp)
    each segment's output, which nothing reads: XLA drops that output's last collectives, JAX's remat never emits
    them. `platform`: what the step is compiled for ('cpu', 'tpu'; default JAX's backend), which decides how ragged
    dispatch exchanges its rows (`sharding.resolve_exchange`)."""
    if step in ("prefill", "decode"):
        return expected_serving_collectives(cfg, step)
    m, lay, run = cfg.model, cfg.layout, cfg.run
    sizes = dict(zip(MESH_AXES, lay.shape, strict=True))
    loc = local_sizes(cfg)
    db = DTYPE_BYTES[run.dtype]
    d, e, c = m.d_model, m.experts, loc["capacity"]
    sched = schedule_of(cfg)
    one_f_one_b = lay.schedule == "1f1b"
    # Every tick every stage runs one chunk of U / (pp v) units, bubble ticks included: that many MoE layer runs,
    # each after its unit's moe_every - 1 dense layers. The dense first layers run once per microbatch on every stage.
    # 1F1B counts what its program holds: per tick a forward slot and a backward slot (the chunk's forward again under
    # jax.vjp, then its backward), each inside a cond that skips it where the slot is empty, so a slot's collectives
    # run at most once per tick; the embedding slot (the dense first layers) likewise, forward and backward.
    runs = sched.ticks * sched.layers_per_chunk
    dense_runs = runs * (m.moe_every - 1)
    prologue_runs = (sched.ticks if one_f_one_b else lay.microbatches) * m.dense_layers
    remat = lay.remat != "none"
    r = 3 if remat else 2
    fwd = r - 1  # forward, and its recomputation under remat (1F1B: the forward slot, and the backward slot's)
    fwd_prologue = 2 if lay.remat == "layer" or one_f_one_b else 1  # rematerialised per layer only (GPipe)
    rows: list[dict[str, Any]] = []
    add = _adder(rows, sizes)
    tp, ep = lay.tp, lay.ep

    def seq_parallel(name, n, forwards, backwards):
        """A tp-split matmul between a sequence all-gather and a reduce-scatter of fp32 partial sums."""
        add("all-gather", ("tp",), n * db, forwards, f"{name} input, tokens over tp")
        add("reduce-scatter", ("tp",), n * tp * 4, forwards, f"{name} output partial sums, fp32")
        add("all-gather", ("tp",), n * 4, backwards, f"backward of the {name} reduce-scatter, fp32")
        add("reduce-scatter", ("tp",), n * tp * db, backwards, f"backward of the {name} all-gather")

    attn_in = loc["batch"] * loc["seq"] * d  # elements one device gathers from
    layer_runs = [(runs + dense_runs, fwd), (prologue_runs, fwd_prologue)]  # (runs, forwards per run)
    for n_runs, f in layer_runs:
        seq_parallel("attention", attn_in, f * n_runs, n_runs)
        if m.qk_norm == "projection":  # the norm's sum of squares over every head: [B/(dp ep), S] fp32
            kv_split = m.n_kv_heads % tp == 0
            for _ in range(2 if kv_split else 1):
                add("all-reduce", ("tp",), loc["batch"] * run.seq_len * 4, (f + 1) * n_runs,
                    "QK-norm statistics over the heads (forward and backward)")  # fmt: skip
    # A recomputed forward skips what only feeds the end of its checkpoint (a residual add whose backward needs no
    # value): under remat 'layer', the dense FFN output reduce-scatter of a first layer and an ungated shared
    # expert's output reduce-scatter (a 'tick' checkpoint ends with the stage's send, which still needs them).
    seq_parallel("dense FFN", attn_in, fwd * dense_runs + prologue_runs, dense_runs + prologue_runs)
    if one_f_one_b and lowered:
        add("reduce-scatter", ("tp",), attn_in * tp * 4, prologue_runs, "dense FFN output partial sums (unread)")
    if fwd_prologue > 1:
        add("all-gather", ("tp",), attn_in * db, prologue_runs, "dense FFN input, tokens over tp (recomputed)")
    if m.shared_hidden:
        seq_parallel("shared expert", attn_in, 0, runs)
        add("all-gather", ("tp",), attn_in * db, fwd * runs, "shared expert input, tokens over tp")
        # 1F1B: a backward slot's recomputed segment (a unit under remat 'layer', the chunk under 'tick') never
        # needs its own output, so its last unit skips it likewise.
        segments = sched.ticks * (sched.layers_per_chunk if lay.remat == "layer" else 1)
        if m.shared_gate or (lowered and one_f_one_b):
            skipped = 0
        else:
            skipped = segments if one_f_one_b else runs if lay.remat == "layer" else 0
        add("reduce-scatter", ("tp",), attn_in * tp * 4, fwd * runs - skipped, "shared expert output partial sums")
    # Folded experts (whole on their device): the all-to-all spans (ep, tp) and no tp collective surrounds them.
    ex = expert_axes(lay)
    ragged = m.dispatch == "ragged" and active_axes(ex, sizes)
    exchange = resolve_exchange(lay.ragged_exchange, platform) if ragged else "padded"
    if exchange != "padded":
        # The ragged exchange (model/moe.py, ragged_exchange_ffn): each source's k T pairs sorted by expert; counts
        # [E] and block offsets [n] exchanged first (forward only); the rows out and back, as ragged all-to-alls
        # (their transposes in the backward pass) or emulated as padded ones ([n, min(k, E / n) T, D] each way);
        # unfolded, the received rows gathered over tp and their fp32 partial sums reduce-scattered.
        n, p = math.prod(sizes[a] for a in ex), loc["tokens"] * m.top_k
        b = min(m.top_k, e // n) * loc["tokens"]  # a source's block at a shard: no token sends one more
        add("all-to-all", ex, e * 4, fwd * runs, "ragged exchange: each source's row count per expert")
        if exchange == "ragged":  # and each source's block offsets, for the way back; the HLO's instruction is
            # sized by its output buffer: n blocks out (and in the backward pass back), k T rows back
            add("all-to-all", ex, n * 4, fwd * runs, "ragged exchange: each source's block offsets")
            add("all-to-all", ex, n * 4, 4 * runs, "ragged exchange's backward: JAX's transpose of each ragged "
                "all-to-all exchanges its input and output offsets")  # fmt: skip
            add("ragged-all-to-all", ex, n * b * d * db, r * runs, "ragged exchange: the routed rows out")
            add("ragged-all-to-all", ex, p * d * db, r * runs, "ragged exchange: the expert outputs back")
        else:
            add("all-to-all", ex, n * b * d * db, 2 * r * runs, "emulated ragged exchange: rows out and back, padded")
        if not lay.folded:
            seq_parallel("ragged expert", n * b * d, fwd * runs, runs)
            add("all-gather", ("tp",), e * 4, fwd * runs, "ragged exchange: the row counts over tp")
    else:
        if not lay.folded:
            seq_parallel("expert", loc["experts"] * ep * c * d, fwd * runs, runs)
        add("all-to-all", ex, e * c * d * db, 2 * r * runs, "expert dispatch and combine")
        if m.dispatch == "ragged":  # the sizes, exchanged before the rows (int32 [E] per source), forward only
            add("all-to-all", ex, e * 4, fwd * runs, "ragged dispatch: each source's row count per expert")
            if not lay.folded:
                add("all-gather", ("tp",), e * 4, fwd * runs, "ragged dispatch: the row counts over tp")
    # The router statistics: in the forward and its recomputation; 1F1B's forward slot does not use them (the
    # backward slot's recomputation gives the step's statistics and the load-balancing loss's gradient).
    add("all-reduce", TOKEN_AXES, (2 * e + 2) * 4, (2 if remat and not one_f_one_b else 1) * runs, "router statistics")
    add("collective-permute", ("pp",), attn_in * 4, 2 * sched.ticks, "stage to stage, fp32 residual (fwd and bwd)")
    if lay.vocab_parallel:
        _vocab_rows(add, cfg, loc, db)
    add("all-reduce", ("pp",), 4 * 4, 1, "router terms from every stage")
    add("all-reduce", MESH_AXES, 4, 1, "loss")

    rows += [
        dict(row) for row in _gradient_rows(storage_model(cfg), lay.shape, lay.zero, lay.folded, lay.vocab_split, step)
    ]
    return rows


def _vocab_rows(add, cfg: Config, loc: dict[str, int], db: int) -> None:
    """The vocabulary split over tp (layout.vocab_split=tp), T = B/(M dp ep) x S/tp tokens per microbatch:
    embedding  all-gather over tp of the token ids (int32 [T]); reduce-scatter over tp of the looked-up rows, fp32
               [tp T, D]; backward: all-gather of their gradient, fp32 [T, D]
    head       all-gather over tp of the targets (int32, every microbatch at once, once per step) and of the head
               input [T, D] (compute dtype); all-reduces over tp of [tp T] fp32: the max, the sum of exponentials and
               the target's logit, and in the backward pass the per-token losses' gradient (each rank summed its own
               sequence slice of the tp-invariant losses); backward: reduce-scatter of the input's gradient
    GPipe embeds every microbatch at once and rematerialises the head per microbatch: its input gather, the max and
    the sum run twice (the target's logit enters linearly: not recomputed). 1F1B embeds in its forward slot and
    again under jax.vjp in the backward slot (where the lookup's reduce-scatter is needed only as the dense first
    layers' input), and runs the head
    under jax.vjp in the backward slot, once per tick each.
    Split over pp as well (layout.vocab_split=tp_pp): the looked-up rows are summed over the stages too, and the last
    stage's outputs fp32 are summed to every stage before the head (each an all-reduce over pp, and one more each in
    the backward pass; GPipe every microbatch at once, 1F1B per tick); the cross-entropy's three statistics are
    reduced over (pp, tp); in the backward pass the per-token losses' gradient is summed over tp and, GPipe, the
    loss's over pp (one fp32)."""
    lay = cfg.layout
    t, d, tp, mb = loc["tokens"], cfg.model.d_model, lay.tp, lay.microbatches
    vocab_axes = lay.vocab_axes
    if lay.schedule == "1f1b":
        ticks = schedule_of(cfg).ticks
        lookups, embed_ids, heads, again = ticks, 2 * ticks, ticks, 0
        # the backward slot's lookup feeds the dense first layers' recomputation where there are some
        rows_summed = ticks * (2 if cfg.model.dense_layers else 1)
        ids = t
    else:
        lookups, embed_ids, heads, again = 1, 1, mb, 1
        rows_summed = 1
        ids = t * mb  # every microbatch at once
    add("all-gather", ("tp",), ids * 4, embed_ids, "embedding: token ids over tp")
    add("reduce-scatter", ("tp",), ids * tp * d * 4, rows_summed, "embedding rows from the ranks that hold them, fp32")
    add("all-gather", ("tp",), ids * d * 4, lookups, "backward of the embedding reduce-scatter, fp32")
    add("all-gather", ("tp",), t * mb * 4, 1, "head: the targets over tp, once")
    add("all-gather", ("tp",), t * d * db, (1 + again) * heads, "head input, tokens over tp")
    add("all-reduce", vocab_axes, t * tp * 4, (3 + 2 * again) * heads, "vocabulary-parallel cross-entropy: max, sum "
        "of exponentials, target logit")  # fmt: skip
    add("all-reduce", ("tp",), t * tp * 4, heads, "the per-token losses' gradient (each rank summed its own slice)")
    add("reduce-scatter", ("tp",), t * tp * d * db, heads, "backward of the head input all-gather")
    if "pp" in vocab_axes and lay.schedule == "1f1b":  # per tick, outside the slots (one_f_one_b.py)
        add(
            "all-reduce",
            ("pp",),
            t * d * 4,
            lookups * (3 if cfg.model.dense_layers else 2),
            "embedding rows "
            "summed over the stages, and their gradient (and again for the dense first layers' recomputation), fp32",
        )
        add("all-reduce", ("pp",), t * d * 4, 2 * heads, "the last stage's output to every stage's head, and its "
            "gradient, fp32")  # fmt: skip
    elif "pp" in vocab_axes:
        add("all-reduce", ("pp",), ids * d * 4, 2, "embedding rows summed over the stages, and their gradient, fp32")
        add("all-reduce", ("pp",), t * mb * d * 4, 2, "the last stage's outputs to every stage's head, and their "
            "gradient, fp32")  # fmt: skip
        add("all-reduce", ("pp",), 4, heads, "the loss's gradient over the stages")


@functools.lru_cache(maxsize=4096)
def _gradient_rows(
    model_cfg, shape: tuple[int, ...], zero: int, folded: bool, vocab: str, step: str
) -> tuple[dict, ...]:
    """Gradient sums: every parameter's gradient is summed over the mesh axes it is replicated over, once per step.
    ZeRO-1: reduce-scattered over its batch axes first, then all-reduced over the rest on the slice; the train step
    all-gathers each updated slice over the batch axes. (Cached: the layout search asks for thousands of layouts
    that share a model and a mesh shape.)"""
    rows: list[dict[str, Any]] = []
    add = _adder(rows, dict(zip(MESH_AXES, shape, strict=True)))
    shards = param_shards_for(model_cfg, shape, zero, folded, vocab)
    for p in shards:
        over = tuple(a for a in MESH_AXES if a not in p["split"] and a not in p["zero"])
        add("reduce-scatter", p["zero"], p["local"] * 4, 1, f"ZeRO-1 gradient sum: {p['path']}")
        add("all-reduce", over, p["zero_local"] * 4, 1, f"gradient sum: {p['path']}")
        if step == "train":
            add("all-gather", p["zero"], p["zero_local"] * 4, 1, f"ZeRO-1 updated slice: {p['path']}")
    if step == "train":
        for split in dict.fromkeys(p["zero_split"] for p in shards):  # first-seen order: a set's varies by process
            add(
                "all-reduce",
                split,
                4 * len(shards),
                1,
                "gradient norm, per weight (its finiteness is the overflow check, and names the weight)",
            )
    return tuple(rows)


def _adder(rows: list[dict[str, Any]], sizes: dict[str, int]):
    """add(kind, axes, bytes, count, what) appends a row, its axes in mesh order (as the HLO's replica groups name
    them) and those of size 1 left out; a row over no axis (it would span one device) or run zero times is dropped."""

    live = {a for a, n in sizes.items() if n > 1}

    def add(kind, axes, nbytes, count, what):
        axes = tuple(a for a in MESH_AXES if a in axes and a in live)
        if axes and count:
            rows.append({"kind": kind, "axes": list(axes), "bytes_per_device": nbytes, "count_per_step": count,
                         "what": what})  # fmt: skip

    return add


def expected_serving_collectives(cfg: Config, step: str) -> list[dict[str, Any]]:
    """What one prefill (run.seq_len new tokens) or decode (one token) step must run, rows as `expected_collectives`.

    Serving keeps the sequence whole on every tp rank (a decode token cannot be split), so the tp partial sums of the
    attention output and of the expert output are all-reduced in fp32 rather than reduce-scattered, and nothing is
    gathered. Routing is dropless: C = T = B/(M dp ep) x S rows per expert. Per tick one collective-permute moves the
    fp32 residual to the next stage (forward only); the last stage's logits [M, B/(M dp ep), V] are summed over pp
    once. Router statistics are not used, so none is reduced. With the vocabulary split over tp, the embedding's rows
    are summed over tp (each rank holds a slice of them) and the logits' columns gathered."""
    m, lay, run = cfg.model, cfg.layout, cfg.run
    sizes = dict(zip(MESH_AXES, lay.shape, strict=True))
    db = DTYPE_BYTES[run.dtype]
    s = run.seq_len if step == "prefill" else 1
    b = run.batch // (lay.dp * lay.ep * lay.microbatches)
    tokens = b * s
    sched = Schedule(lay.pp, lay.microbatches, lay.repeats, storage_model(cfg).units)
    runs = sched.ticks * sched.layers_per_chunk
    d, e = m.d_model, m.experts
    rows: list[dict[str, Any]] = []
    add = _adder(rows, sizes)

    dense_runs = runs * (m.moe_every - 1) + lay.microbatches * m.dense_layers  # units' dense layers, the first ones
    add("all-reduce", ("tp",), tokens * d * 4, runs + dense_runs, "attention output partial sums, fp32")
    if m.qk_norm == "projection":
        for _ in range(2 if m.n_kv_heads % lay.tp == 0 else 1):
            add("all-reduce", ("tp",), tokens * 4, runs + dense_runs, "QK-norm statistics over the heads")
    add("all-reduce", ("tp",), tokens * d * 4, dense_runs + (runs if m.shared_hidden else 0),
        "dense FFN and shared expert output partial sums, fp32")  # fmt: skip
    if not lay.folded:  # folded experts are whole: each tp rank's tokens go to them and come back complete
        add("all-reduce", ("tp",), e * tokens * d * 4, runs, "expert output partial sums, fp32")
    ex = expert_axes(lay)
    add("all-to-all", ex, e * tokens * d * db, 2 * runs, "expert dispatch and combine (dropless)")
    if lay.folded:  # each tp rank's result of its copy of a token: one (a max of equal values) makes it tp-invariant
        add("all-reduce", ("tp",), tokens * d * db, runs, "folded experts' combined output, the tp copies settled")
    add("collective-permute", ("pp",), tokens * d * 4, sched.ticks, "stage to stage, fp32 residual")
    vocab_axes = lay.vocab_axes
    if "pp" in vocab_axes:  # every stage computes its columns of the logits on the last stage's outputs
        add("all-reduce", ("pp",), lay.microbatches * b * d * 4, 1, "the last stage's last-position outputs to every "
            "stage, fp32")  # fmt: skip
    else:
        add("all-reduce", ("pp",), lay.microbatches * b * m.vocab * 4, 1, "last-position logits from the last stage")
    if lay.vocab_parallel:  # every rank looks up its rows for every token: one sum; the logits' columns gathered
        for axis in vocab_axes:
            add("all-reduce", (axis,), lay.microbatches * tokens * d * 4, 1, f"embedding rows from the ranks that "
                f"hold them, summed over {axis}, fp32")  # fmt: skip
        add("all-gather", vocab_axes, lay.microbatches * b * storage_model(cfg).vocab // lay.vocab_shards * 4, 1,
            "last-position logits, each rank's vocabulary columns")  # fmt: skip
    return rows


def aggregate(rows: list[dict[str, Any]]) -> dict[tuple[str, tuple[str, ...], int], int]:
    """(kind, axes, bytes per device) -> count per step."""
    out: dict[tuple[str, tuple[str, ...], int], int] = defaultdict(int)
    for row in rows:
        out[(row["kind"], tuple(row["axes"]), row["bytes_per_device"])] += row["count_per_step"]
    return dict(out)


def bytes_by_kind(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Bytes per device per step for each collective kind."""
    out: dict[str, int] = defaultdict(int)
    for row in rows:
        out[row["kind"]] += row["bytes_per_device"] * row["count_per_step"]
    return dict(out)
