"""The collectives one sharded train step must run, from the config alone: kind, mesh axes, bytes per device (what one
device puts in) and count per step. The HLO audit compares the compiled program with this list, and the planner
prices the same list, so the planner's communication bytes are the compiler's.

Per MoE layer run, with T = (B / (M dp ep)) x (S / tp) tokens per device and microbatch and C its expert capacity:
    attention  all-gather over tp of [B/(dp ep), S/tp, D]; reduce-scatter over tp of [B/(dp ep), S, D]
    experts    all-to-all over ep of [E, C, D] (dispatch) and [E/ep, ep C, D] (combine): E C D x dtype bytes each;
               all-gather over tp of [E/ep, ep C, D]; reduce-scatter over tp of [E/ep, tp ep C, D]
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

from collections import defaultdict
from typing import Any

from moe_jax.config import Config
from moe_jax.model.moe import capacity
from moe_jax.parallel.schedule import Schedule
from moe_jax.sharding import MESH_AXES, TOKEN_AXES, active_axes

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GRAD_AXES = {
    "attention": ("dp", "ep"),
    "replicated": ("dp", "ep", "tp"),
    "embedding": MESH_AXES,
    "experts": ("dp",),
}


def local_sizes(cfg: Config) -> dict[str, int]:
    m, lay, run = cfg.model, cfg.layout, cfg.run
    b = run.batch // (lay.dp * lay.ep * lay.microbatches)
    s = run.seq_len // lay.tp
    return {
        "batch": b,
        "seq": s,
        "tokens": b * s,
        "capacity": capacity(m, b * s),
        "layers": m.layers // lay.pp,
        "experts": m.experts // lay.ep,
        "heads": m.heads // lay.tp,
        "hidden": m.expert_hidden // lay.tp,
    }


def expected_collectives(cfg: Config, step: str = "grad") -> list[dict[str, Any]]:
    """Rows {kind, axes, bytes_per_device, count_per_step, what}, axes of size 1 left out (no collective runs there).
    step 'grad' is the loss and gradients (verify, hlo); 'train' adds the optimizer's gradient norm and overflow check:
    one all-reduce of 1 fp32 per set of axes the parameters are split over (the update itself is elementwise);
    'prefill' and 'decode' are serving's (`expected_serving_collectives`)."""
    if step in ("prefill", "decode"):
        return expected_serving_collectives(cfg, step)
    m, lay = cfg.model, cfg.layout
    sizes = dict(zip(MESH_AXES, lay.shape, strict=True))
    loc = local_sizes(cfg)
    db = DTYPE_BYTES[cfg.run.dtype]
    d, e, l_loc, c = m.d_model, m.experts, loc["layers"], loc["capacity"]
    sched = Schedule(lay.pp, lay.microbatches, lay.repeats, m.layers, lay.remat)
    # Every tick every stage runs one chunk of L / (pp v) layers, bubble ticks included: that many layer executions.
    runs = sched.ticks * sched.layers_per_chunk
    remat = lay.remat != "none"
    r = 3 if remat else 2
    rows: list[dict[str, Any]] = []
    add = _adder(rows, sizes)

    tp, ep = lay.tp, lay.ep
    fwd = r - 1  # forward, and its recomputation under remat
    attn_in = loc["batch"] * loc["seq"] * d  # elements one device gathers from
    moe_in = loc["experts"] * ep * c * d
    for name, n in (("attention", attn_in), ("expert", moe_in)):
        add("all-gather", ("tp",), n * db, fwd * runs, f"{name} input, tokens over tp")
        add("reduce-scatter", ("tp",), n * tp * 4, fwd * runs, f"{name} output partial sums, fp32")
        add("all-gather", ("tp",), n * 4, runs, f"backward of the {name} reduce-scatter, fp32")
        add("reduce-scatter", ("tp",), n * tp * db, runs, f"backward of the {name} all-gather")
    add("all-to-all", ("ep",), e * c * d * db, 2 * r * runs, "expert dispatch and combine")
    add("all-reduce", TOKEN_AXES, (2 * e + 2) * 4, (2 if remat else 1) * runs, "router statistics")
    add("collective-permute", ("pp",), attn_in * 4, 2 * sched.ticks, "stage to stage, fp32 residual (fwd and bwd)")
    add("all-reduce", ("pp",), 4 * 4, 1, "router terms from every stage")
    add("all-reduce", MESH_AXES, 4, 1, "loss")

    hk = loc["heads"] * m.head_dim
    for _ in range(4):
        add("all-reduce", GRAD_AXES["attention"], l_loc * d * hk * 4, 1, "gradient sum: q, k, v, o")
    add("all-reduce", GRAD_AXES["replicated"], l_loc * d * e * 4, 1, "gradient sum: router")
    for _ in range(2):
        add("all-reduce", GRAD_AXES["replicated"], l_loc * d * 4, 1, "gradient sum: block norms")
    add("all-reduce", GRAD_AXES["embedding"], d * 4, 1, "gradient sum: final norm")
    for _ in range(2):
        add("all-reduce", GRAD_AXES["embedding"], m.vocab * d * 4, 1, "gradient sum: embedding, head")
    for _ in range(3 if m.ffn == "swiglu" else 2):
        add("all-reduce", GRAD_AXES["experts"], l_loc * loc["experts"] * d * loc["hidden"] * 4, 1,
            "gradient sum: expert matrices")  # fmt: skip
    if step == "train":
        for split in {tuple(active_axes(a, sizes)) for a in (("pp", "ep", "tp"), ("pp", "tp"), ("pp",))}:
            add("all-reduce", split, 4, 1, "gradient norm (its finiteness is the overflow check)")
    return rows


def _adder(rows: list[dict[str, Any]], sizes: dict[str, int]):
    """add(kind, axes, bytes, count, what) appends a row, its axes of size 1 left out; a row over no axis (it would
    span one device) or run zero times is dropped."""

    def add(kind, axes, nbytes, count, what):
        axes = active_axes(axes, sizes)
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
    once. Router statistics are not used, so none is reduced."""
    m, lay, run = cfg.model, cfg.layout, cfg.run
    sizes = dict(zip(MESH_AXES, lay.shape, strict=True))
    db = DTYPE_BYTES[run.dtype]
    s = run.seq_len if step == "prefill" else 1
    b = run.batch // (lay.dp * lay.ep * lay.microbatches)
    tokens = b * s
    sched = Schedule(lay.pp, lay.microbatches, lay.repeats, m.layers)
    runs = sched.ticks * sched.layers_per_chunk
    d, e = m.d_model, m.experts
    rows: list[dict[str, Any]] = []
    add = _adder(rows, sizes)

    add("all-reduce", ("tp",), tokens * d * 4, runs, "attention output partial sums, fp32")
    add("all-reduce", ("tp",), e * tokens * d * 4, runs, "expert output partial sums, fp32")
    add("all-to-all", ("ep",), e * tokens * d * db, 2 * runs, "expert dispatch and combine (dropless)")
    add("collective-permute", ("pp",), tokens * d * 4, sched.ticks, "stage to stage, fp32 residual")
    add("all-reduce", ("pp",), lay.microbatches * b * m.vocab * 4, 1, "last-position logits from the last stage")
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
